//! The DMSC control plane.
//!
//! - [`config`]: the domain configuration (`domain.toml`), its validation, and the embedded
//!   development domain.
//! - [`compile`]: the table compiler, a pure function from a configuration to a
//!   [`Table`](dmsc_protocol::table::Table) generation.
//! - [`pki`]: the `dmsc-control` command's development PKI: creating a CA for a trust domain,
//!   issuing SPIFFE identities to agents and gateways, and listing them.
//!
//! It does not yet push tables to gateways, collect their registrations or serve anything (see
//! `docs/CONTROL.md`, "What is not built yet").

#![forbid(unsafe_code)]

use std::io::Write;

use clap::{Parser, Subcommand};

pub mod compile;
pub mod config;
pub mod pki;

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
}

impl CommandError {
    /// Whether the error is the user's input (a configuration to fix): exit code 64.
    pub fn is_usage(&self) -> bool {
        matches!(self, CommandError::Config(_) | CommandError::Compile(_))
    }
}

/// Runs a parsed command line, writing its report to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), CommandError> {
    match cli.command {
        Command::Pki(command) => Ok(pki::run(command, out)?),
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
