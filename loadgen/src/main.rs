//! `dmsc-loadgen`: wiring only; the load generator is the `dmsc_loadgen` library.

use clap::Parser;

fn main() {
    let cli = dmsc_loadgen::cli::Cli::parse();
    let code = match dmsc_loadgen::main_with(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dmsc-loadgen: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
