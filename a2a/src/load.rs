//! A closed-loop A2A load driver: `concurrency` workers each send A2A v1.0 JSON-RPC
//! `SendMessage` requests one after another to a URL (an agent's, or a front door's
//! `/a2a/c/<capability>`), the latencies of the measured window going into an HDR histogram.
//! Shared by the `a2a_load` example (benchmarks) and the load generator's A2A phase.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// What to drive.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The A2A JSON-RPC endpoint.
    pub url: String,
    /// Requests in flight.
    pub concurrency: usize,
    /// Unmeasured time first.
    pub warmup: Duration,
    /// Measured time.
    pub duration: Duration,
    /// Longest a request may take; longer is an error.
    pub timeout: Duration,
    /// Bytes of text in each message.
    pub text_bytes: usize,
    /// Whether an answer must be a message echoing the text (a trivial echo agent), rather
    /// than any JSON-RPC `result`.
    pub expect_echo: bool,
}

/// What the measured window saw.
#[derive(Debug)]
pub struct LoadResult {
    /// Latencies of the good answers, µs.
    pub latency: Histogram<u64>,
    /// Failed requests: an HTTP or JSON-RPC error, a wrong answer, a timeout.
    pub errors: u64,
    /// The first failure, for reports.
    pub first_error: Option<String>,
    /// The window's length.
    pub elapsed: Duration,
    /// CPU time (user and system) this process spent in the window, in seconds; 0 where
    /// `/proc/self/stat` cannot be read.
    pub cpu_seconds: f64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Runs the load described by `spec`.
pub async fn drive(spec: &LoadSpec) -> anyhow::Result<LoadResult> {
    let uri: hyper::Uri = spec.url.parse()?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(spec.concurrency)
        .build(connector);
    let text = "x".repeat(spec.text_bytes);
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::with_capacity(spec.concurrency);
    for w in 0..spec.concurrency {
        let (client, uri, text) = (client.clone(), uri.clone(), text.clone());
        let (measuring, stop) = (measuring.clone(), stop.clone());
        let (timeout, expect_echo) = (spec.timeout, spec.expect_echo);
        workers.push(tokio::spawn(async move {
            let mut latency = histogram();
            let (mut errors, mut first_error) = (0u64, None);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let start = Instant::now();
                let sent = call(&client, &uri, &text, w, n, expect_echo);
                let outcome = tokio::time::timeout(timeout, sent)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match outcome {
                    Ok(()) => {
                        let us = start.elapsed().as_micros().max(1) as u64;
                        let _ = latency.record(us.min(60_000_000));
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            (latency, errors, first_error)
        }));
    }
    tokio::time::sleep(spec.warmup).await;
    let cpu_start = cpu_seconds();
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(spec.duration).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let cpu = cpu_seconds() - cpu_start;
    stop.store(true, Ordering::Relaxed);
    let mut result = LoadResult {
        latency: histogram(),
        errors: 0,
        first_error: None,
        elapsed,
        cpu_seconds: cpu,
    };
    for worker in workers {
        let (latency, errors, first_error) = worker.await?;
        result.latency.add(&latency)?;
        result.errors += errors;
        if result.first_error.is_none() {
            result.first_error = first_error;
        }
    }
    Ok(result)
}

/// One `SendMessage`; `Ok` if the answer is a JSON-RPC result (echoing `text`, if asked).
async fn call(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &hyper::Uri,
    text: &str,
    worker: usize,
    n: u64,
    expect_echo: bool,
) -> Result<(), String> {
    let body = json!({
        "jsonrpc": "2.0", "id": n, "method": "SendMessage",
        "params": {"message": {"messageId": format!("m-{worker}-{n}"), "role": "ROLE_USER",
                               "parts": [{"text": text}]}},
    });
    let request = hyper::Request::post(uri.clone())
        .header("content-type", "application/json")
        .header("a2a-version", "1.0")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let answer: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("HTTP {status}: not JSON ({e})"))?;
    let good = match answer.get("result") {
        Some(result) if expect_echo => result["message"]["parts"][0]["text"] == text,
        Some(_) => true,
        None => false,
    };
    if good {
        Ok(())
    } else {
        Err(format!(
            "HTTP {status}: {}",
            answer.get("error").unwrap_or(&answer)
        ))
    }
}

/// User and system CPU time of this process, in seconds (`/proc/self/stat`, fields 14 and 15
/// in clock ticks of 1/100 s); 0 where it cannot be read.
fn cpu_seconds() -> f64 {
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
