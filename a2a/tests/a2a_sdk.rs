//! Stock a2a-sdk 1.3.0 clients and agents through the front door, a real gateway (with its
//! control plane) and the adapter, all separate processes on loopback.
//!
//! Needs `python3` with `a2a-sdk[http-server]==1.3.0` and `uvicorn` (CI installs them; see
//! `.ci/run`), hence ignored by default:
//!
//! ```sh
//! pip install "a2a-sdk[http-server]==1.3.0" uvicorn
//! cargo test -p dmsc-a2a --test a2a_sdk -- --ignored
//! ```

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dmsc_a2a::binding::{Call, CONTENT_TYPE, STREAM_CONTENT_TYPE};
use dmsc_agent::{Agent, AgentConfig, HandlerError, Handlers, Request, Response};
use dmsc_identity::DevPki;
use dmsc_tests::card;
use dmsc_tests::cluster::{binary, Domain, Proc};
use serde_json::json;

/// Every agent may do everything, except that the front door may not invoke `secret`.
const DOMAIN_CONFIG: &str = r#"
[domain]
name = "test.local"
trust_anchor = "{ca}"

[[gateway]]
id = "gw1"

[groups.agents]
members = ["spiffe://test.local/agent/*"]
advertise = ["*"]
discover = ["*"]

[groups.front]
members = ["spiffe://test.local/agent/a2a-front"]

[[invoke]]
effect = "allow"
groups = ["agents"]
capabilities = ["*"]

[[invoke]]
effect = "deny"
groups = ["front"]
capabilities = ["secret"]
"#;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(name)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs `client.py` with `args`; returns its stdout, failing the test if it failed.
fn client(args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(script("client.py"))
        .args(args)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client.py {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn wait_http(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {addr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A native `dmsc/1` agent speaking the A2A binding: answers `SendMessage` with a message and
/// `SendStreamingMessage` with one streamed message event.
fn native_handlers() -> Handlers {
    Handlers::new().fallback(|mut req: Request| async move {
        let body = req.payload().await?;
        let call = Call::decode(&body).map_err(|(e, _)| HandlerError::new(e.message))?;
        let text = call.params["message"]["parts"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let result = json!({"message": {
            "messageId": "native-1", "role": "ROLE_AGENT",
            "parts": [{"text": format!("native: {text}")}],
        }});
        let answer = json!({"jsonrpc": "2.0", "id": call.id, "result": result});
        let mut bytes = serde_json::to_vec(&answer).unwrap();
        if call.method.is_streaming() {
            bytes.push(b'\n');
            Ok::<_, HandlerError>(Response::ok(bytes).with_content_type(STREAM_CONTENT_TYPE))
        } else {
            Ok(Response::ok(bytes).with_content_type(CONTENT_TYPE))
        }
    })
}

#[test]
#[ignore = "needs python3 with a2a-sdk[http-server]==1.3.0 and uvicorn (CI installs them)"]
fn stock_a2a_sdk_clients_and_agents_through_the_gateway() {
    let domain = Domain::new("a2a", DOMAIN_CONFIG);
    let control = domain.control_plane(None);
    let (_gw, addrs) = domain.gateway("gw1", control.ctl, &[], Duration::from_secs(30));
    let gateway = addrs.expect("the gateway takes its table").addr;
    let dev = DevPki::new(domain.dir.0.join("pki"));
    let ca = dev.load_ca().expect("CA");
    let ca_path = dev.ca_cert_path().display().to_string();
    let identity = |name: &str| {
        let (cert, key) = dev.ensure_agent(&ca, name).expect("identity");
        (cert.display().to_string(), key.display().to_string())
    };

    // A stock a2a-sdk agent, and the adapter beside it.
    let start_agent = |name: &str| -> (Proc, Proc) {
        let port = free_port();
        let upstream = Proc::spawn(
            &format!("a2a-sdk agent {name}"),
            Path::new("python3"),
            &[
                script("agent_server.py").display().to_string(),
                "--port".into(),
                port.to_string(),
                "--name".into(),
                name.into(),
            ],
        );
        wait_http(SocketAddr::from(([127, 0, 0, 1], port)));
        let (cert, key) = identity(&format!("{name}-adapter"));
        let mut adapter = Proc::spawn(
            &format!("adapter {name}"),
            &binary("dmsc-a2a"),
            &[
                "adapt".into(),
                "--gateway".into(),
                gateway.to_string(),
                "--cert".into(),
                cert,
                "--key".into(),
                key,
                "--ca".into(),
                ca_path.clone(),
                "--agent-url".into(),
                format!("http://127.0.0.1:{port}"),
                "--card-interval-ms".into(),
                "200".into(),
                "--unhealthy-after".into(),
                "2".into(),
            ],
        );
        let attached = adapter.expect_line("dmsc-a2a adapt: attached:");
        assert_eq!(attached, "echo", "the card's skills become capabilities");
        (upstream, adapter)
    };
    let (_a1, mut adapter1) = start_agent("a1");

    // The front door.
    let (cert, key) = identity("a2a-front");
    let mut front = Proc::spawn(
        "front door",
        &binary("dmsc-a2a"),
        &[
            "front".into(),
            "--gateway".into(),
            gateway.to_string(),
            "--cert".into(),
            cert,
            "--key".into(),
            key,
            "--ca".into(),
            ca_path.clone(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
    );
    let line = front.expect_line("dmsc-a2a front listening on");
    let url = line.split_whitespace().next().expect("URL").to_owned();

    // A native dmsc/1 agent offering `native` and `secret` on the binding.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pki = &domain.pki;
    let native: Agent = runtime.block_on(async {
        let id = pki.agent("native");
        let config = AgentConfig::new(
            gateway,
            id.cert_chain(),
            id.private_key(),
            vec![pki.ca.cert_der()],
            card("native", &["native", "secret"]),
        );
        Agent::attach(config, native_handlers())
            .await
            .expect("native agent")
    });

    let matrix = client(&["matrix", "--front", &url, "--cap", "echo", "--agent", "a1"]);
    // Seven checks per case, and one more (events streamed) in the three streaming cases.
    assert_eq!(
        matrix.lines().filter(|l| l.starts_with("ok ")).count(),
        6 * 7 + 3
    );
    client(&[
        "errors", "--front", &url, "--cap", "echo", "--denied", "secret",
    ]);
    client(&["native", "--front", &url, "--cap", "native"]);

    // A second instance of `echo`: tasks spread over both, and every follow-up (GetTask, a
    // message on the task) reaches the instance holding the task.
    let (_a2, mut adapter2) = start_agent("a2");
    let spread = client(&[
        "affinity", "--front", &url, "--cap", "echo", "--agents", "a1,a2",
    ]);
    assert!(
        spread.contains("ok tasks were spread over ['a1', 'a2']"),
        "{spread}"
    );

    // An agent dies mid-stream: the caller's stream ends with an error event, its adapter
    // withdraws the capability, and the other instance and everything else keep working.
    client(&["die", "--front", &url, "--cap", "echo"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let survivor = loop {
        let step = Duration::from_millis(100);
        if adapter1
            .wait_line("dmsc-a2a adapt: withdrawn", step)
            .is_some()
        {
            break "a2";
        }
        if adapter2
            .wait_line("dmsc-a2a adapt: withdrawn", step)
            .is_some()
        {
            break "a1";
        }
        assert!(
            Instant::now() < deadline,
            "no adapter withdrew its dead agent"
        );
    };
    for _ in 0..5 {
        let answer = client(&["send", "--front", &url, "--cap", "echo", "--text", "again"]);
        assert_eq!(answer.trim(), format!("text {survivor}: again"));
    }
    client(&["native", "--front", &url, "--cap", "native"]);
    assert!(!front.exited(), "the front door keeps serving");
    runtime.block_on(native.detach()).unwrap();
}
