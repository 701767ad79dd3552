//! A trivial A2A v1.0 agent over HTTP (JSON-RPC): its card at `/.well-known/agent-card.json`,
//! and `SendMessage` answered with a message echoing the text of the first part. It costs next
//! to nothing, so measurements through the bridge show the bridge's own cost. Used by the
//! `a2a_echo_agent` example and the load generator's A2A phase.

use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// The agent's routes; its card names `url` as its JSON-RPC endpoint and `skill` as its one
/// skill.
pub fn router(url: &str, skill: &str) -> Router {
    let card = json!({
        "name": "echo",
        "description": "echoes the first text part",
        "version": "1.0.0",
        "supportedInterfaces": [{"url": url, "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}],
        "capabilities": {"streaming": false},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": [{"id": skill, "name": skill, "description": "echo", "tags": []}],
    });
    Router::new()
        .route(
            "/.well-known/agent-card.json",
            get(move || {
                let card = card.clone();
                async move { Json(card) }
            }),
        )
        .route("/", post(send_message))
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

/// Serves the agent on `listener` (its card names the listener's address) until the task is
/// dropped.
pub async fn serve(listener: tokio::net::TcpListener, skill: &str) -> std::io::Result<()> {
    let url = format!("http://{}/", listener.local_addr()?);
    axum::serve(listener, router(&url, skill)).await
}
