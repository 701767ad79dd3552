//! A minimal A2A v1.0 agent over HTTP (JSON-RPC), for benchmarks: it serves its card at
//! `/.well-known/agent-card.json` and answers `SendMessage` with a message echoing the text of
//! the first part, costing next to nothing, so that a comparison measures the path to it. The
//! a2a-sdk agent of the tests is the realistic one; this one shows what the bridge itself costs.
//!
//! ```text
//! cargo run --release -p dmsc-a2a --example a2a_echo_agent -- --port 9998 --skill echo
//! ```

use std::net::SocketAddr;

use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
struct Args {
    /// Port on 127.0.0.1.
    #[arg(long)]
    port: u16,
    /// The skill (capability) it offers.
    #[arg(long, default_value = "echo")]
    skill: String,
}

async fn send_message(headers: HeaderMap, Json(request): Json<Value>) -> Json<Value> {
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let v1 = headers
        .get("a2a-version")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with('1'));
    if !v1 || request.get("method").and_then(Value::as_str) != Some("SendMessage") {
        return Json(json!({"jsonrpc": "2.0", "id": id,
                           "error": {"code": -32601, "message": "only SendMessage, A2A 1.0"}}));
    }
    let text = request["params"]["message"]["parts"][0]["text"].clone();
    Json(json!({"jsonrpc": "2.0", "id": id, "result": {"message": {
        "messageId": "echo", "role": "ROLE_AGENT", "parts": [{"text": text}],
    }}}))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let card = json!({
        "name": "bench-echo",
        "description": "echoes the first text part",
        "version": "1.0.0",
        "supportedInterfaces": [{"url": format!("http://{addr}/"), "protocolBinding": "JSONRPC",
                                 "protocolVersion": "1.0"}],
        "capabilities": {"streaming": false},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": [{"id": args.skill, "name": args.skill, "description": "echo", "tags": []}],
    });
    let app = Router::new()
        .route(
            "/.well-known/agent-card.json",
            get(move || {
                let card = card.clone();
                async move { Json(card) }
            }),
        )
        .route("/", post(send_message));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("a2a echo agent on http://{addr}");
    axum::serve(listener, app).await?;
    Ok(())
}
