//! `dmsc-loadgen`: a load generator for the DMSC gateway.
//!
//! It measures what the gateway costs: throughput, latency percentiles (HdrHistogram, no
//! coordinated omission in open loop) and CPU per request of each role, for requests sent
//! through the gateway or straight to the same agents. By default it is self-contained: it
//! creates a throwaway PKI and starts a gateway and echo agents as separate processes (this
//! executable again, with the hidden `serve-gateway` and `serve-agents` commands), so the CPU
//! of each role can be read from `/proc`. It can also drive an existing gateway.
//!
//! With `attach` it measures something else: the gateway's attach rate, and its resident
//! memory per idle attached agent, with thousands of agent connections made from this process.
//!
//! What it does not do: start agents for an external gateway, retry failed requests, or
//! assert on timings (it reports; the exit code only says whether every request succeeded).
//!
//! Layout: [`cli`] (flags and their validation), [`run`] (orchestration), [`caller`] (the
//! caller threads and the per-request path), [`attach`] (the `attach` command, whole),
//! [`serve`] (the child processes), [`report`], [`output`] and [`svg`] (what is printed and
//! written), [`children`], [`pki`], [`tls`], [`cpu`], [`memory`] and [`units`] (helpers). The
//! user's guide is `docs/LOADGEN.md`.

#![forbid(unsafe_code)]

pub mod a2a;
pub mod affinity;
pub mod attach;
pub mod caller;
pub mod children;
pub mod cli;
pub mod counters;
pub mod cpu;
pub mod memory;
pub mod output;
pub mod pki;
pub mod report;
pub mod run;
pub mod serve;
pub mod svg;
pub mod tls;
pub mod units;

use cli::{AttachPlan, Cli, Command, Plan};

/// Exit code of a command-line usage error (as clap's own).
pub const EXIT_USAGE: i32 = 2;
/// Exit code when the run completed but a request failed, none completed, or the gateway or
/// agents process died.
pub const EXIT_REQUESTS_FAILED: i32 = 3;

/// Runs the command line; returns the process exit code. Errors (exit code 1) are for the
/// caller to print.
pub fn main_with(cli: Cli) -> anyhow::Result<i32> {
    let plan = match &cli.command {
        Some(Command::ServeGateway(args)) => return serve::gateway(args).map(|()| 0),
        Some(Command::ServeAgents(args)) => return serve::agents(args).map(|()| 0),
        Some(Command::ServeControl(args)) => return serve::control(args).map(|()| 0),
        Some(Command::ServeA2a(args)) => return serve::a2a(args).map(|()| 0),
        Some(Command::Attach(args)) => {
            return match AttachPlan::new(args) {
                Ok(plan) => run_attach(&plan),
                Err(e) => {
                    eprintln!("dmsc-loadgen: error: {e:#}");
                    Ok(EXIT_USAGE)
                }
            }
        }
        Some(Command::Compare(args)) => Plan::compare(args),
        None => Plan::single(&cli.load, &cli.external, cli.mode),
    };
    let plan = match plan {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("dmsc-loadgen: error: {e:#}");
            return Ok(EXIT_USAGE);
        }
    };
    init_logging();
    eprintln!("{}", run::banner(&plan));
    let verdict = run::run(&plan)?;
    if verdict.passed() {
        return Ok(0);
    }
    if verdict.failed > 0 {
        eprintln!(
            "dmsc-loadgen: FAILED: {} request(s) failed (see the errors above)",
            units::thousands(verdict.failed)
        );
    }
    if verdict.failed_swaps > 0 {
        eprintln!(
            "dmsc-loadgen: FAILED: {} table swap(s) were not acknowledged by the gateway",
            verdict.failed_swaps
        );
    }
    if let Some((answered, failed)) = verdict.a2a {
        if failed > 0 || answered == 0 {
            eprintln!(
                "dmsc-loadgen: FAILED: the A2A path answered {answered} request(s) and failed {failed} \
                 (see the a2a path line)"
            );
        }
    }
    for role in &verdict.died {
        eprintln!("dmsc-loadgen: FAILED: the {role} process exited during the run");
    }
    for (route, completed) in &verdict.completed {
        if *completed == 0 {
            eprintln!(
                "dmsc-loadgen: FAILED: no request completed in {} mode",
                route.name()
            );
        }
    }
    Ok(EXIT_REQUESTS_FAILED)
}

/// `attach`: runs it, says why it failed if it did, and returns the exit code.
fn run_attach(plan: &AttachPlan) -> anyhow::Result<i32> {
    init_logging();
    eprintln!("{}", attach::banner(plan));
    let verdict = attach::run(plan)?;
    if verdict.passed() {
        return Ok(0);
    }
    if verdict.failed > 0 {
        eprintln!(
            "dmsc-loadgen: FAILED: {} agent(s) did not attach or did not stay attached (see \
             the failures above)",
            units::thousands(verdict.failed)
        );
    }
    if verdict.gateway_died {
        eprintln!("dmsc-loadgen: FAILED: the gateway process exited during the run");
    }
    Ok(EXIT_REQUESTS_FAILED)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DMSC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
