//! The DMSC control plane.
//!
//! - [`config`]: the domain configuration (`domain.toml`), its validation, and the embedded
//!   development domain.
//! - [`compile`]: the table compiler, a pure function from a configuration to a
//!   [`Table`](dmsc_protocol::table::Table) generation.
//! - [`pki`]: the `dmsc-control` command's development PKI: creating a CA for a trust domain,
//!   issuing SPIFFE identities to agents and gateways, and listing them.
//!
//! - [`serve`]: `dmsc-control serve`, the server: `dmsc-ctl/1` sessions with the listed
//!   gateways, pushing the compiled table to each, and the admin endpoint (`/status`,
//!   `/metrics`, `POST /apply`).
//! - [`routes`]: the domain's routes, compiled from what the gateways report of their agents
//!   and pushed to every gateway (sans-IO; the server does the timing).
//! - [`cli`]: `dmsc-control apply` and `status`, clients of that admin endpoint.

#![forbid(unsafe_code)]

use std::io::Write;

use clap::{Parser, Subcommand};

mod admin;
pub mod cli;
pub mod compile;
pub mod config;
mod metrics;
pub mod pki;
pub mod routes;
pub mod serve;

pub use pki::PkiError;

/// The `dmsc-control` command line.
#[derive(Debug, Parser)]
#[command(name = "dmsc-control", version, about = "DMSC control plane", long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The top-level subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the development PKI (CA and SPIFFE identities for agents and gateways).
    #[command(subcommand)]
    Pki(pki::PkiCommand),
    /// Check a domain configuration and compile it: print the table generation it yields (the
    /// SHA-256 of the table's canonical encoding) and its size, or the error with its file,
    /// line and key. With no `--config`, the embedded development domain.
    Compile {
        /// The domain configuration (`domain.toml`, see docs/CONTROL.md).
        #[arg(long, short = 'c')]
        config: Option<std::path::PathBuf>,
    },
    /// Run the control plane: compile the configuration, keep a dmsc-ctl/1 session with every
    /// listed gateway and push it the compiled table; reload on `dmsc-control apply` or SIGHUP.
    /// With no `--config`, the embedded development domain and the development PKI under
    /// `--state-dir` (created on first run, shared with a gateway using the same directory).
    Serve(cli::ServeArgs),
    /// Reload the running control plane's configuration file and wait until every connected
    /// gateway has acknowledged (or rejected) the new generation.
    Apply(cli::ApplyArgs),
    /// Show each gateway: connected or not, the generation it acknowledged, its agents, and any
    /// rejection with its reason.
    Status(cli::StatusArgs),
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The PKI command failed.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The domain configuration could not be read or is not valid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The configuration did not compile.
    #[error(transparent)]
    Compile(#[from] compile::CompileError),
    /// Writing the report failed.
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
    /// The server could not start.
    #[error(transparent)]
    Serve(#[from] serve::ServeError),
    /// The control plane's identity could not be loaded or issued.
    #[error("control-plane identity: {0}")]
    Identity(#[from] dmsc_identity::IdentityError),
    /// Talking to a running control plane failed.
    #[error("{0}")]
    Admin(String),
    /// `apply` was refused: the configuration has an error (the running generation stays).
    #[error("configuration refused: {0}")]
    Refused(String),
    /// `apply` succeeded but not every gateway acknowledged the new generation.
    #[error("{0}")]
    NotAcknowledged(String),
}

impl CommandError {
    /// Whether the error is the user's input (a configuration to fix): exit code 64.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            CommandError::Config(_) | CommandError::Compile(_) | CommandError::Refused(_)
        )
    }
}

/// Runs a parsed command line, writing its report to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CommandError> {
    match cli.command {
        Command::Pki(command) => Ok(pki::run(command, out)?),
        Command::Serve(args) => cli::serve(args, out),
        Command::Apply(args) => cli::apply(args, out),
        Command::Status(args) => cli::status(args, out),
        Command::Compile { config } => {
            let domain = match &config {
                Some(path) => config::DomainConfig::load(path)?,
                None => config::DomainConfig::development(),
            };
            let table = compile::compile(&domain)?;
            let parts = table.parts();
            writeln!(out, "generation   {}", table.generation())?;
            writeln!(out, "domain       {}", parts.domain)?;
            writeln!(out, "bytes        {}", table.encoded().len())?;
            writeln!(out, "groups       {}", parts.groups.len())?;
            writeln!(out, "members      {}", parts.members.len())?;
            writeln!(out, "capabilities {}", parts.capabilities.len())?;
            writeln!(
                out,
                "rules        {} exact, {} wildcard",
                parts.exact_rules.len(),
                parts.wildcard_rules.len()
            )?;
            writeln!(out, "rate limits  {}", parts.rate_limits.len())?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn issue_requires_exactly_one_target() {
        assert!(Cli::try_parse_from(["dmsc-control", "pki", "issue"]).is_err());
        assert!(Cli::try_parse_from([
            "dmsc-control",
            "pki",
            "issue",
            "--agent",
            "a",
            "--gateway",
            "g"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["dmsc-control", "pki", "issue", "--agent", "a"]).is_ok());
    }

    #[test]
    fn every_flag_has_help() {
        fn check(command: &clap::Command) {
            for arg in command.get_arguments() {
                assert!(
                    arg.get_help().is_some(),
                    "{} --{:?} has no help",
                    command.get_name(),
                    arg.get_long()
                );
            }
            for sub in command.get_subcommands() {
                assert!(sub.get_about().is_some(), "{} has no about", sub.get_name());
                check(sub);
            }
        }
        check(&Cli::command());
    }
}
