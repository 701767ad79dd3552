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

[[gateway]]
id = "gw2"

[groups.agents]
members = ["spiffe://test.local/agent/*"]
advertise = ["*"]
discover = ["*"]

# The front doors are bridges: their requests carry their HTTP clients' identities, which
# policy judges instead of theirs.
[groups.front]
members = ["spiffe://test.local/agent/a2a-front*"]
bridge = true

[groups.mallory]
members = ["spiffe://test.local/agent/mallory"]

[groups.throttled]
members = ["spiffe://test.local/agent/a2a-front-slow"]
rate_limit = { per_second = 1, burst = 1 }

[[invoke]]
effect = "allow"
groups = ["agents"]
capabilities = ["*"]

[[invoke]]
effect = "deny"
groups = ["front"]
capabilities = ["secret"]

[[invoke]]
effect = "deny"
groups = ["mallory"]
capabilities = ["whoami"]
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
        // `whoami` answers who the gateway says is calling, and through which bridge.
        let answer = if req.capability == "whoami" {
            format!("{} via {}", req.caller, req.via)
        } else {
            format!("native: {text}")
        };
        let result = json!({"message": {
            "messageId": "native-1", "role": "ROLE_AGENT",
            "parts": [{"text": answer}],
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
    let pki = &domain.pki;
    let identity = |name: &str| {
        let (cert, key) = dev.ensure_agent(&ca, name).expect("identity");
        (cert.display().to_string(), key.display().to_string())
    };

    // A second gateway of the domain: agents adapted there are reached over a trunk.
    let (_gw2, addrs2) = domain.gateway("gw2", control.ctl, &[], Duration::from_secs(30));
    let gateway2 = addrs2.expect("the second gateway takes its table").addr;

    // `dmsc-a2a <command>` attached to gateway `at` as agent `name`.
    let attach_to = |at: SocketAddr, command: &str, name: &str| -> Vec<String> {
        let (cert, key) = identity(name);
        vec![
            command.into(),
            "--gateway".into(),
            at.to_string(),
            "--cert".into(),
            cert,
            "--key".into(),
            key,
            "--ca".into(),
            ca_path.clone(),
        ]
    };

    let attach_args = |command: &str, name: &str| attach_to(gateway, command, name);

    // A stock a2a-sdk agent, and the adapter beside it (attached to gateway `at`).
    let start_agent_at =
        |at: SocketAddr, name: &str, skill: &str, extra: &[&str]| -> (Proc, Proc) {
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
                    "--skill".into(),
                    skill.into(),
                    "--extra-skills".into(),
                    domain
                        .dir
                        .0
                        .join(format!("{name}.skills"))
                        .display()
                        .to_string(),
                ]
                .into_iter()
                .chain(extra.iter().map(|s| s.to_string()))
                .collect::<Vec<_>>(),
            );
            wait_http(SocketAddr::from(([127, 0, 0, 1], port)));
            let mut args = attach_to(at, "adapt", &format!("{name}-adapter"));
            args.extend([
                "--agent-url".into(),
                format!("http://127.0.0.1:{port}"),
                "--card-interval-ms".into(),
                "200".into(),
                "--unhealthy-after".into(),
                "2".into(),
            ]);
            let mut adapter = Proc::spawn(&format!("adapter {name}"), &binary("dmsc-a2a"), &args);
            let attached = adapter.expect_line("dmsc-a2a adapt: attached:");
            assert_eq!(attached, skill, "the card's skills become capabilities");
            (upstream, adapter)
        };
    let start_agent =
        |name: &str, skill: &str, extra: &[&str]| start_agent_at(gateway, name, skill, extra);
    let (_a1, mut adapter1) = start_agent("a1", "echo", &[]);

    // The front door, and variants of it for the client-identity modes.
    let start_front = |name: &str, extra: &[&str]| -> (Proc, String) {
        let mut args = attach_args("front", name);
        args.extend(["--listen".into(), "127.0.0.1:0".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut front = Proc::spawn(name, &binary("dmsc-a2a"), &args);
        let line = front.expect_line("dmsc-a2a front listening on");
        let url = line.split_whitespace().next().expect("URL").to_owned();
        (front, url)
    };
    let (mut front, url) = start_front("a2a-front", &[]);

    // A native dmsc/1 agent offering `native` and `secret` on the binding.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let native: Agent = runtime.block_on(async {
        let id = pki.agent("native");
        let config = AgentConfig::new(
            gateway,
            id.cert_chain(),
            id.private_key(),
            vec![pki.ca.cert_der()],
            card("native", &["native", "secret", "whoami"]),
        );
        Agent::attach(config, native_handlers())
            .await
            .expect("native agent")
    });

    // Seven checks per case, and one more (events streamed) in the three streaming cases.
    let full_matrix = |cap: &str, agent: &str| {
        let matrix = client(&["matrix", "--front", &url, "--cap", cap, "--agent", agent]);
        let ok = matrix.lines().filter(|l| l.starts_with("ok ")).count();
        assert_eq!(ok, 6 * 7 + 3, "{cap}: {matrix}");
    };
    full_matrix("echo", "a1");
    // The whole matrix again with the agent behind the other gateway: every call, and every
    // task follow-up (which names the agent's session), crosses the trunk from gw1 to gw2.
    let (_far, _far_adapter) = start_agent_at(gateway2, "af", "far-echo", &[]);
    let front_addr: SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("front door address");
    let until = Instant::now() + Duration::from_secs(20);
    while !dmsc_tests::cluster::http(
        front_addr,
        "GET",
        "/a2a/c/far-echo/.well-known/agent-card.json",
    )
    .contains("far-echo")
    {
        assert!(
            Instant::now() < until,
            "far-echo never reached gw1's routes"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    full_matrix("far-echo", "af");
    // The same matrix against an agent that speaks only A2A 0.3 (it refuses v1.0 methods): the
    // adapter converts each call and answer.
    let (_old, _old_adapter) = start_agent("a0", "old-echo", &["--v03-only"]);
    full_matrix("old-echo", "a0");
    // ... and against one that offers only HTTP+JSON: the adapter calls its routes.
    let (_rest, _rest_adapter) = start_agent("ar", "rest-echo", &["--rest-only"]);
    full_matrix("rest-echo", "ar");
    client(&[
        "errors", "--front", &url, "--cap", "echo", "--denied", "secret",
    ]);
    client(&["native", "--front", &url, "--cap", "native"]);

    // Who policy judges. Without a client identity: the front door itself (denied `secret`,
    // above), stamped as the caller.
    let whoami = |url: &str, tls: &[&str]| {
        let mut args = vec!["send", "--front", url, "--cap", "whoami"];
        args.extend_from_slice(tls);
        client(&args).trim().to_owned()
    };
    let id = |name: &str| format!("spiffe://test.local/agent/{name}");
    assert_eq!(whoami(&url, &[]), format!("text {} via", id("a2a-front")));
    // Development mode: every client of the loopback listener is alice; the front door is a
    // bridge, so policy judges alice (who may invoke `secret`) and the agent sees both.
    let (_dev, dev_url) = start_front(
        "a2a-front-dev",
        &[
            "--client-identity",
            &id("alice"),
            "--request-timeout-ms",
            "1000",
        ],
    );
    assert_eq!(
        whoami(&dev_url, &[]),
        format!("text {} via {}", id("alice"), id("a2a-front-dev"))
    );
    let secret = client(&["send", "--front", &dev_url, "--cap", "secret"]);
    assert_eq!(
        secret.trim(),
        "text native: hello",
        "alice may invoke secret"
    );
    // An agent that hangs: the caller gets DEADLINE_EXCEEDED after the front door's 1 s.
    let started = Instant::now();
    let hung = client(&[
        "send", "--front", &dev_url, "--cap", "echo", "--text", "hang",
    ]);
    // (Whether the gateway's timer or the front door's own fires first, it is -32065.)
    assert!(hung.contains("-32065"), "{hung}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "answered at the deadline"
    );
    let (_mal, mal_url) = start_front("a2a-front-mallory", &["--client-identity", &id("mallory")]);
    let denied = whoami(&mal_url, &[]);
    assert!(
        denied.contains("policy denies"),
        "mallory is denied: {denied}"
    );
    // HTTPS: each client is the identity of its certificate.
    let tls_dir = domain.dir.0.join("https");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let server = pki
        .ca
        .issue(
            &dmsc_identity::SpiffeId::agent("test.local", "a2a-front-tls").unwrap(),
            &["localhost", "127.0.0.1"],
        )
        .unwrap();
    let (server_cert, server_key) = (tls_dir.join("server.pem"), tls_dir.join("server.key"));
    std::fs::write(&server_cert, &server.cert_pem).unwrap();
    std::fs::write(&server_key, &server.key_pem).unwrap();
    let (_tls, tls_url) = start_front(
        "a2a-front-tls",
        &[
            "--tls-cert",
            &server_cert.display().to_string(),
            "--tls-key",
            &server_key.display().to_string(),
        ],
    );
    assert!(tls_url.starts_with("https://"), "{tls_url}");
    let ca_file = dev.ca_cert_path().display().to_string();
    for (who, expect_denied) in [("alice", false), ("mallory", true)] {
        let (cert, key) = identity(who);
        let answer = whoami(
            &tls_url,
            &["--cert", &cert, "--key", &key, "--ca", &ca_file],
        );
        if expect_denied {
            assert!(answer.contains("policy denies"), "{who}: {answer}");
        } else {
            assert_eq!(
                answer,
                format!("text {} via {}", id(who), id("a2a-front-tls"))
            );
        }
    }
    let anonymous = whoami(&tls_url, &["--ca", &ca_file]);
    assert!(
        anonymous.starts_with("error") && anonymous.contains("certificate required"),
        "no client certificate: {anonymous}"
    );

    // Every error mapping the gateway originates: over a rate limit (the throttled front
    // door's own), and over the front door's concurrency limit.
    let (_slow, slow_url) = start_front("a2a-front-slow", &[]);
    let burst = client(&[
        "send",
        "--front",
        &slow_url,
        "--cap",
        "native",
        "--count",
        "6",
        "--parallel",
    ]);
    assert!(burst.contains("RATE_LIMITED"), "{burst}");
    assert!(burst.contains("text native: hello"), "{burst}");
    let (_busy, busy_url) = start_front(
        "a2a-front-busy",
        &["--max-concurrent", "1", "--request-timeout-ms", "3000"],
    );
    let crowd = client(&[
        "send",
        "--front",
        &busy_url,
        "--cap",
        "echo",
        "--text",
        "hang",
        "--count",
        "3",
        "--parallel",
    ]);
    assert_eq!(crowd.matches("-32063").count(), 2, "{crowd}");
    assert_eq!(crowd.matches("-32065").count(), 1, "{crowd}");

    // The agent's card changes: the adapter sees it (ETag) and updates the capabilities.
    std::fs::write(domain.dir.0.join("a1.skills"), "extra\n").unwrap();
    let updated = adapter1.expect_line("dmsc-a2a adapt: card updated:");
    assert_eq!(updated, "echo extra");
    let extra = client(&["send", "--front", &url, "--cap", "extra"]);
    assert_eq!(extra.trim(), "text a1: hello");

    // A second instance of `echo`: tasks spread over both, and every follow-up (GetTask, a
    // message on the task) reaches the instance holding the task.
    let (_a2, mut adapter2) = start_agent("a2", "echo", &[]);
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
