//! A closed-loop A2A load driver: `--concurrency` workers each send A2A v1.0 JSON-RPC
//! `SendMessage` requests one after another to `--url` for `--duration`, after `--warmup`, and
//! the latencies go into an HDR histogram. Every answer must be a JSON-RPC `result`; anything
//! else counts as an error. Used by `benches/scripts/a2a_compare.sh` to compare an agent called
//! directly with the same agent called through the front door, gateway and adapter.
//!
//! ```text
//! cargo run --release -p dmsc-a2a --example a2a_load -- --url http://127.0.0.1:8080/a2a/c/echo \
//!     --concurrency 64 --duration-ms 5000 --warmup-ms 1000 --text-bytes 100
//! ```
//!
//! Prints one JSON object: requests per second, errors, latency percentiles in microseconds,
//! and the driver's own CPU time per request (to show it is not the bottleneck).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

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

fn cpu_seconds() -> f64 {
    // utime + stime of this process, from /proc/self/stat (fields 14 and 15, in clock ticks).
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let uri: hyper::Uri = args.url.parse()?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(args.concurrency)
        .build(connector);
    let text = "x".repeat(args.text_bytes);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let (client, uri, text) = (client.clone(), uri.clone(), text.clone());
        let (measuring, stop, errors) = (measuring.clone(), stop.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = json!({
                    "jsonrpc": "2.0", "id": n, "method": "SendMessage",
                    "params": {"message": {
                        "messageId": format!("m-{w}-{n}"), "role": "ROLE_USER",
                        "parts": [{"text": text}],
                    }},
                });
                let request = hyper::Request::post(uri.clone())
                    .header("content-type", "application/json")
                    .header("a2a-version", "1.0")
                    .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
                    .unwrap();
                let start = Instant::now();
                let ok = match client.request(request).await {
                    Ok(response) => match response.into_body().collect().await {
                        Ok(bytes) => serde_json::from_slice::<Value>(&bytes.to_bytes())
                            .is_ok_and(|v| v.get("result").is_some()),
                        Err(_) => false,
                    },
                    Err(_) => false,
                };
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        let us = start.elapsed().as_micros().max(1) as u64;
                        let _ = histogram.record(us);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            histogram
        }));
    }
    tokio::time::sleep(Duration::from_millis(args.warmup_ms)).await;
    let cpu_start = cpu_seconds();
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(args.duration_ms)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_start;
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for worker in workers {
        all.add(worker.await?)?;
    }
    let requests = all.len();
    let report = json!({
        "url": args.url,
        "concurrency": args.concurrency,
        "requests": requests,
        "errors": errors.load(Ordering::Relaxed),
        "rps": requests as f64 / elapsed,
        "p50_us": all.value_at_quantile(0.50),
        "p90_us": all.value_at_quantile(0.90),
        "p99_us": all.value_at_quantile(0.99),
        "p999_us": all.value_at_quantile(0.999),
        "driver_cpu_us_per_request": if requests > 0 { cpu * 1e6 / requests as f64 } else { 0.0 },
    });
    println!("{report}");
    Ok(())
}
