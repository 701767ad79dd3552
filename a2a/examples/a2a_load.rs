//! A closed-loop A2A load driver ([`dmsc_a2a::load`]): `--concurrency` workers each send A2A
//! v1.0 JSON-RPC `SendMessage` requests one after another to `--url` for `--duration-ms`, after
//! `--warmup-ms`. Every answer must be a JSON-RPC `result`; anything else counts as an error.
//! Used by `benches/scripts/a2a_compare.sh` to compare an agent called directly with the same
//! agent called through the front door, gateway and adapter.
//!
//! ```text
//! cargo run --release -p dmsc-a2a --example a2a_load -- --url http://127.0.0.1:8080/a2a/c/echo \
//!     --concurrency 64 --duration-ms 5000 --warmup-ms 1000 --text-bytes 100
//! ```
//!
//! Prints one JSON object: requests per second, errors, latency percentiles in microseconds,
//! and the driver's own CPU time per request (to show it is not the bottleneck).

use std::time::Duration;

use clap::Parser;
use dmsc_a2a::load::{drive, LoadSpec};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// The A2A JSON-RPC endpoint (an agent's, or a front door's `/a2a/c/<capability>`).
    #[arg(long)]
    url: String,
    /// Requests in flight.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Measured time, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    duration_ms: u64,
    /// Unmeasured time before it, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,
    /// Bytes of text in each message.
    #[arg(long, default_value_t = 100)]
    text_bytes: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let result = drive(&LoadSpec {
        url: args.url.clone(),
        concurrency: args.concurrency.max(1),
        warmup: Duration::from_millis(args.warmup_ms),
        duration: Duration::from_millis(args.duration_ms),
        timeout: Duration::from_secs(60),
        text_bytes: args.text_bytes,
        expect_echo: false,
    })
    .await?;
    let requests = result.latency.len();
    let q = |quantile| result.latency.value_at_quantile(quantile);
    let report = json!({
        "url": args.url,
        "concurrency": args.concurrency,
        "requests": requests,
        "errors": result.errors,
        "rps": requests as f64 / result.elapsed.as_secs_f64(),
        "p50_us": q(0.50),
        "p90_us": q(0.90),
        "p99_us": q(0.99),
        "p999_us": q(0.999),
        "driver_cpu_us_per_request": if requests > 0 {
            result.cpu_seconds * 1e6 / requests as f64
        } else {
            0.0
        },
    });
    println!("{report}");
    Ok(())
}
