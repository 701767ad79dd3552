//! The main job's A2A phase: an A2A v1.0 client (HTTP, JSON-RPC `SendMessage`) drives the
//! path through the front door, the gateway and the adapter to a trivial A2A agent
//! (`serve-a2a`), closed loop, and checks every answer is a JSON-RPC `result` echoing the text.

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

/// Requests in flight in the A2A phase.
pub const CONCURRENCY: usize = 16;

/// What the A2A phase measured.
#[derive(Debug)]
pub struct A2aResult {
    /// Answers that were a JSON-RPC result echoing the request.
    pub requests: u64,
    /// Anything else: an HTTP or JSON-RPC error, a wrong answer, a timeout.
    pub errors: u64,
    /// The first error, for the report.
    pub first_error: Option<String>,
    /// How long it ran.
    pub elapsed: Duration,
    /// Latencies of the good answers, µs.
    pub latency: Histogram<u64>,
}

impl A2aResult {
    /// One line for the report.
    pub fn text(&self) -> String {
        let rps = self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9);
        let mut line = format!(
            "a2a path (A2A client -> front door -> gateway -> adapter -> A2A agent, {CONCURRENCY} \
             in flight): {} requests in {:.1}s ({rps:.0} req/s), p50 {} us, p99 {} us, errors {}",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.latency.value_at_quantile(0.5),
            self.latency.value_at_quantile(0.99),
            self.errors,
        );
        if let Some(e) = &self.first_error {
            line.push_str(&format!(" (first: {e})"));
        }
        line
    }

    /// The JSON summary's `a2a` member.
    pub fn to_json(&self) -> Value {
        json!({
            "concurrency": CONCURRENCY,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": self.elapsed.as_secs_f64(),
            "p50_us": self.latency.value_at_quantile(0.5),
            "p99_us": self.latency.value_at_quantile(0.99),
        })
    }
}

/// Drives `url` (a front door's `/a2a/c/<capability>`) for `duration`, each request bounded
/// by `timeout`.
pub fn drive(url: &str, duration: Duration, timeout: Duration) -> anyhow::Result<A2aResult> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let uri: hyper::Uri = url.parse()?;
    runtime.block_on(async move {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut workers = Vec::with_capacity(CONCURRENCY);
        for w in 0..CONCURRENCY {
            let (client, uri, stop) = (client.clone(), uri.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                    .expect("valid histogram bounds");
                let (mut errors, mut first_error) = (0u64, None);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let text = format!("loadgen {w} {n}");
                    let start = Instant::now();
                    let outcome =
                        tokio::time::timeout(timeout, call(&client, &uri, &text, n)).await;
                    match outcome {
                        Ok(Ok(())) => {
                            let us = start.elapsed().as_micros().max(1) as u64;
                            let _ = latency.record(us.min(60_000_000));
                        }
                        Ok(Err(e)) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                        Err(_) => {
                            errors += 1;
                            first_error.get_or_insert(format!("no answer within {timeout:?}"));
                        }
                    }
                }
                (latency, errors, first_error)
            }));
        }
        tokio::time::sleep(duration).await;
        stop.store(true, Ordering::Relaxed);
        let mut result = A2aResult {
            requests: 0,
            errors: 0,
            first_error: None,
            elapsed: Duration::ZERO,
            latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        };
        for worker in workers {
            let (latency, errors, first_error) = worker.await?;
            result.latency.add(&latency)?;
            result.errors += errors;
            if result.first_error.is_none() {
                result.first_error = first_error;
            }
        }
        result.elapsed = started.elapsed();
        result.requests = result.latency.len();
        Ok(result)
    })
}

/// One `SendMessage`; `Ok` if the answer is a JSON-RPC result whose message echoes `text`.
async fn call(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: &hyper::Uri,
    text: &str,
    id: u64,
) -> Result<(), String> {
    let body = json!({
        "jsonrpc": "2.0", "id": id, "method": "SendMessage",
        "params": {"message": {"messageId": format!("m{id}"), "role": "ROLE_USER",
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
    match answer["result"]["message"]["parts"][0]["text"].as_str() {
        Some(echoed) if echoed == text => Ok(()),
        _ => Err(format!(
            "HTTP {status}: {}",
            answer.get("error").unwrap_or(&answer)
        )),
    }
}
