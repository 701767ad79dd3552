//! The main job's A2A phase: A2A v1.0 clients (HTTP, JSON-RPC `SendMessage`) drive the path
//! through the front door, the gateway and the adapter to a trivial A2A agent (`serve-a2a`),
//! closed loop, with the A2A crate's driver ([`dmsc_a2a::load`]); every answer must be a
//! JSON-RPC `result` echoing the request's text.

use std::time::Duration;

use dmsc_a2a::load::{drive as drive_load, LoadResult, LoadSpec};
use serde_json::{json, Value};

/// Requests in flight in the A2A phase.
pub const CONCURRENCY: usize = 16;

/// What the A2A phase measured.
#[derive(Debug)]
pub struct A2aResult(LoadResult);

impl A2aResult {
    /// Answers that were a JSON-RPC result echoing the request.
    pub fn requests(&self) -> u64 {
        self.0.latency.len()
    }

    /// Requests that failed.
    pub fn errors(&self) -> u64 {
        self.0.errors
    }

    /// One line for the report.
    pub fn text(&self) -> String {
        let r = &self.0;
        let rps = self.requests() as f64 / r.elapsed.as_secs_f64().max(1e-9);
        let mut line = format!(
            "a2a path (A2A client -> front door -> gateway -> adapter -> A2A agent, {CONCURRENCY} \
             in flight): {} requests in {:.1}s ({rps:.0} req/s), p50 {} us, p99 {} us, errors {}",
            self.requests(),
            r.elapsed.as_secs_f64(),
            r.latency.value_at_quantile(0.5),
            r.latency.value_at_quantile(0.99),
            r.errors,
        );
        if let Some(e) = &r.first_error {
            line.push_str(&format!(" (first: {e})"));
        }
        line
    }

    /// The JSON summary's `a2a` member.
    pub fn to_json(&self) -> Value {
        let r = &self.0;
        json!({
            "concurrency": CONCURRENCY,
            "requests": self.requests(),
            "errors": r.errors,
            "seconds": r.elapsed.as_secs_f64(),
            "p50_us": r.latency.value_at_quantile(0.5),
            "p99_us": r.latency.value_at_quantile(0.99),
        })
    }
}

/// Drives `url` (a front door's `/a2a/c/<capability>`) for `duration`, each request bounded
/// by `timeout`.
pub fn drive(url: &str, duration: Duration, timeout: Duration) -> anyhow::Result<A2aResult> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let spec = LoadSpec {
        url: url.to_owned(),
        concurrency: CONCURRENCY,
        warmup: Duration::ZERO,
        duration,
        timeout,
        text_bytes: 32,
        expect_echo: true,
    };
    runtime.block_on(drive_load(&spec)).map(A2aResult)
}
