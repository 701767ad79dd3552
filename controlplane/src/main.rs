//! `dmsc-control`: the DMSC control-plane command. All logic lives in the library; this file
//! only parses the command line, runs it and turns an error into an exit code: 64 for a
//! configuration to fix, 1 for anything else.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match dmsc_controlplane::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version succeed; any other command-line error is a usage error.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let mut stdout = std::io::stdout().lock();
    match dmsc_controlplane::run(cli, &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let _ = stdout.flush();
            eprintln!("dmsc-control: error: {error}");
            if error.is_usage() {
                ExitCode::from(64)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
