//! A minimal A2A v1.0 agent over HTTP (JSON-RPC), for benchmarks ([`dmsc_a2a::echo`]): it
//! answers `SendMessage` with a message echoing the text, costing next to nothing, so that a
//! comparison measures the path to it. The a2a-sdk agent of the tests is the realistic one;
//! this one shows what the bridge itself costs.
//!
//! ```text
//! cargo run --release -p dmsc-a2a --example a2a_echo_agent -- --port 9998 --skill echo
//! ```

use std::net::SocketAddr;

use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// Port on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// The skill (capability) it offers.
    #[arg(long, default_value = "echo")]
    skill: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let app = dmsc_a2a::echo::router(&format!("http://{addr}/"), &args.skill);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("a2a echo agent on http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
