//! The front door and the adapter in process, against a real gateway and the trivial A2A agent
//! (`dmsc_a2a::echo`), driven with a plain HTTP client: the request path in each A2A dialect
//! and the front door's own answers (versions, malformed input, limits, cards, the catalog).
//! Runs in the default test suite; the stock a2a-sdk matrix is `a2a_sdk.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use dmsc_a2a::adapt::{self, AdaptConfig};
use dmsc_a2a::front::{self, FrontConfig};
use dmsc_agent::Agent;
use dmsc_tests::{agent_config, gateway, Pki};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (u16, hyper::HeaderMap, Bytes) {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request.body(Full::new(body.into())).unwrap();
        let response = self.client.request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status.as_u16(), parts.headers, bytes)
    }

    async fn json(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Value,
    ) -> (u16, Value) {
        let (status, _, bytes) = self.send(method, path, headers, body.to_string()).await;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {bytes:?}"));
        (status, value)
    }
}

const V1: [(&str, &str); 2] = [("a2a-version", "1.0"), ("content-type", "application/json")];

fn send_message(method: &str, text: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": {"message": {
        "messageId": "m1", "role": "ROLE_USER", "parts": [{"text": text}],
    }}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_door_routes_every_dialect_and_answers_bad_input_itself() {
    let pki = std::sync::Arc::new(Pki::new());
    let gw = gateway(&pki, 2, |_| {});
    let gw_addr = gw.local_addr();

    // The trivial A2A agent and its adapter.
    let agent_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_url = format!("http://{}", agent_listener.local_addr().unwrap());
    tokio::spawn(dmsc_a2a::echo::serve(agent_listener, "a2a-echo"));
    let mut adapt_config = AdaptConfig::new(agent_url);
    adapt_config.card_interval = Duration::from_millis(100);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let adapter_pki = pki.clone();
    let adapter = tokio::spawn(adapt::run(
        adapt_config,
        move |card| Ok(agent_config(&adapter_pki, gw_addr, "echo-adapter", card)),
        async move {
            let _ = stopped.await;
        },
    ));

    // The front door, with a small body limit.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let base = format!("http://{addr}");
    let front_agent = Agent::attach(
        agent_config(&pki, gw_addr, "a2a-front", front::own_card()),
        front::own_handlers(),
    )
    .await
    .unwrap();
    let mut config = FrontConfig::new(base.clone());
    config.max_body_bytes = 4096;
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = format!("http://{}", admin_listener.local_addr().unwrap());
    let admin_routes = front::admin_router(config.metrics.clone(), front_agent.clone());
    tokio::spawn(async move { axum::serve(admin_listener, admin_routes).await });
    tokio::spawn(front::serve(
        listener,
        None,
        front_agent.clone(),
        config,
        std::future::pending(),
    ));
    let http = Http {
        client: Client::builder(TokioExecutor::new()).build_http(),
        base,
    };

    // Wait for the adapter's capability to be routable.
    let mut ready = false;
    for _ in 0..100 {
        let (status, _, _) = http
            .send(
                "GET",
                "/a2a/c/a2a-echo/.well-known/agent-card.json",
                &[],
                "",
            )
            .await;
        if status == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "the adapted agent's capability never appeared");

    // v1.0 JSON-RPC.
    let rpc = "/a2a/c/a2a-echo";
    let (status, answer) = http
        .json("POST", rpc, &V1, send_message("SendMessage", "hi"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["id"], 7);
    assert_eq!(answer["result"]["message"]["parts"][0]["text"], "hi");
    // v0.3 JSON-RPC, no version header: converted both ways.
    let v03 = json!({"jsonrpc": "2.0", "id": "x", "method": "message/send", "params": {"message": {
        "kind": "message", "messageId": "m2", "role": "user", "parts": [{"kind": "text", "text": "old"}],
    }}});
    let (_, answer) = http
        .json("POST", rpc, &[("content-type", "application/json")], v03)
        .await;
    let result = &answer["result"];
    assert_eq!(
        (result["kind"].as_str(), result["role"].as_str()),
        (Some("message"), Some("agent")),
        "{answer}"
    );
    assert_eq!(result["parts"][0], json!({"kind": "text", "text": "old"}));
    // v1.0 HTTP+JSON.
    let (status, answer) = http
        .json(
            "POST",
            "/a2a/c/a2a-echo/rest/message:send",
            &V1,
            send_message("SendMessage", "rest")["params"].clone(),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer["message"]["parts"][0]["text"], "rest");
    // The agent does not stream: a streaming request gets its JSON-RPC error, not a hang.
    let (_, answer) = http
        .json("POST", rpc, &V1, send_message("SendStreamingMessage", "s"))
        .await;
    assert_eq!(answer["error"]["code"], -32601, "{answer}");

    // The front door's own answers.
    let rpc_error = |answer: &Value| answer["error"]["code"].as_i64();
    let (_, a) = http
        .json(
            "POST",
            "/a2a/c/nobody",
            &V1,
            send_message("SendMessage", "x"),
        )
        .await;
    assert_eq!(rpc_error(&a), Some(-32060), "{a}");
    assert_eq!(a["error"]["data"][0]["reason"], "CAPABILITY_NOT_FOUND");
    let (status, a) = http
        .json(
            "POST",
            "/a2a/c/nobody/rest/message:send",
            &V1,
            json!({"message": {}}),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(a["error"]["details"][0]["reason"], "CAPABILITY_NOT_FOUND");
    let (_, a) = http
        .json("POST", rpc, &[], send_message("SendMessage", "x"))
        .await;
    assert_eq!(rpc_error(&a), Some(-32009), "no A2A-Version");
    let (_, _, body) = http.send("POST", rpc, &V1, "{nope").await;
    let a: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(rpc_error(&a), Some(-32700));
    let (status, _, _) = http.send("POST", rpc, &V1, vec![b'x'; 8192]).await;
    assert_eq!(status, 413, "over --max-body-bytes");
    let (_, a) = http
        .json(
            "POST",
            rpc,
            &V1,
            json!({"jsonrpc": "2.0", "id": 1, "method": "Explode"}),
        )
        .await;
    assert_eq!(rpc_error(&a), Some(-32601));

    // Cards and the catalog.
    let (status, headers, body) = http
        .send(
            "GET",
            "/a2a/c/a2a-echo/.well-known/agent-card.json",
            &[],
            "",
        )
        .await;
    assert_eq!(status, 200);
    let card: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(card["skills"][0]["id"], "a2a-echo");
    assert_eq!(card["url"], format!("{}/a2a/c/a2a-echo", http.base));
    let etag = headers["etag"].to_str().unwrap().to_owned();
    let (status, _, _) = http
        .send(
            "GET",
            "/a2a/c/a2a-echo/.well-known/agent-card.json",
            &[("if-none-match", &etag)],
            "",
        )
        .await;
    assert_eq!(status, 304);
    let (_, catalog) = http
        .json("GET", "/.well-known/api-catalog", &[], Value::Null)
        .await;
    let items: Vec<&str> = catalog["linkset"][0]["item"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["title"].as_str())
        .collect();
    assert_eq!(items, ["a2a-echo"], "front doors' own skill is hidden");

    // What the admin endpoint counted.
    let admin = Http {
        client: http.client.clone(),
        base: admin,
    };
    let (status, _, body) = admin.send("GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    let text = String::from_utf8_lossy(&body);
    for line in [
        r#"dmsc_a2a_front_requests_total{dialect="jsonrpc-1.0",method="SendMessage",outcome="OK"} 1"#,
        r#"dmsc_a2a_front_requests_total{dialect="jsonrpc-0.3",method="SendMessage",outcome="OK"} 1"#,
        r#"dmsc_a2a_front_requests_total{dialect="http+json-1.0",method="SendMessage",outcome="OK"} 1"#,
        r#"dmsc_a2a_front_requests_total{dialect="jsonrpc-1.0",method="SendStreamingMessage",outcome="AGENT_ERROR"} 1"#,
        r#"dmsc_a2a_front_requests_total{dialect="jsonrpc-1.0",method="SendMessage",outcome="CAPABILITY_NOT_FOUND"} 1"#,
        r#"dmsc_a2a_front_requests_total{dialect="unknown",method="SendMessage",outcome="VERSION_NOT_SUPPORTED"} 1"#,
        r#"dmsc_a2a_front_requests_total{dialect="unknown",method="unknown",outcome="INVALID_REQUEST"} 1"#,
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    let (status, _, _) = admin.send("GET", "/healthz", &[], "").await;
    assert_eq!(status, 200);

    let _ = stop.send(());
    adapter.await.unwrap().unwrap();
    front_agent.detach().await.unwrap();
    gw.shutdown(Duration::from_secs(1));
}
