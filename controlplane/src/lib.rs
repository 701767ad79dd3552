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
}

/// Runs a parsed command line, writing its report to `out`.
pub fn run(cli: Cli, out: &mut dyn Write) -> Result<(), PkiError> {
    match cli.command {
        Command::Pki(command) => pki::run(command, out),
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
