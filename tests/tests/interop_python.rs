//! Interoperability with an independent agent: `interop/python/dmsc_agent.py`, written in
//! Python on aioquic from `docs/PROTOCOL.md` alone, against an in-process gateway.
//!
//! Needs `python3` with `aioquic` (`pip install aioquic`), so the tests are ignored by default:
//!
//! ```sh
//! cargo test -p dmsc-tests --test interop_python -- --ignored
//! ```
//!
//! `DMSC_PYTHON` overrides the interpreter (default `python3`).

use std::fs;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dmsc_agent::Status;
use dmsc_tests::python::PyProcess;
use dmsc_tests::{attach, gateway, Pki};

/// The Python agent.
fn script() -> PathBuf {
    dmsc_tests::python::script("dmsc_agent.py")
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("dmsc-interop-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes the CA and agent `name`'s certificate and key as PEM files; returns the Python
/// agent's connection arguments for `gateway`.
fn identity_args(pki: &Pki, scratch: &Scratch, name: &str, gateway: SocketAddr) -> Vec<String> {
    let id = pki.agent(name);
    let (cert, key, ca) = (
        scratch.path(&format!("{name}.pem")),
        scratch.path(&format!("{name}.key")),
        scratch.path("ca.pem"),
    );
    fs::write(&cert, &id.cert_pem).expect("write cert");
    fs::write(&key, &id.key_pem).expect("write key");
    fs::write(&ca, pki.ca.cert_pem()).expect("write ca");
    vec![
        "--gateway".into(),
        gateway.to_string(),
        "--cert".into(),
        cert.display().to_string(),
        "--key".into(),
        key.display().to_string(),
        "--ca".into(),
        ca.display().to_string(),
    ]
}

/// The Python agent attaches (with lanes: two workers), invokes its own `py_echo` through the
/// gateway, gets `NO_ROUTE` for a capability nobody offers, and checks the other behaviours of
/// its self-test (statuses, discovery, card update, detach).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with aioquic (.ci/run installs it)"]
async fn python_agent_selftest() {
    let pki = Pki::new();
    let gw = gateway(&pki, 2, |_| {});
    let scratch = Scratch::new("selftest");
    let mut args = identity_args(&pki, &scratch, "py-selftest", gw.local_addr());
    args.push("selftest".into());
    let mut py = PyProcess::spawn(&script(), &scratch.0, "selftest", &args);
    let status = py.wait(Duration::from_secs(90)).await;
    let output = py.output();
    assert!(
        status.success(),
        "python selftest failed ({status})\n{output}"
    );
    assert!(
        output.contains("PASS py_echo via primary is OK with the payload"),
        "{output}"
    );
    assert!(
        output.contains("PASS unknown capability is NO_ROUTE"),
        "{output}"
    );
    gw.shutdown(Duration::from_secs(1));
}

/// A Rust SDK agent invokes the Python agent's `py_upper`, and the Python agent invokes the
/// Rust agent's `echo`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with aioquic (.ci/run installs it)"]
async fn rust_and_python_agents_invoke_each_other() {
    let pki = Pki::new();
    let gw = gateway(&pki, 2, |_| {});
    let addr = gw.local_addr();
    let scratch = Scratch::new("pair");

    // The Python agent serves py_upper.
    let mut serve_args = identity_args(&pki, &scratch, "py-server", addr);
    serve_args.extend(["serve".into(), "--capability".into(), "py_upper".into()]);
    let mut server = PyProcess::spawn(&script(), &scratch.0, "serve", &serve_args);

    // The Rust agent serves echo (the harness's test handlers) and calls py_upper until the
    // Python agent has attached (NO_ROUTE until then).
    let rust = attach(&pki, addr, "rust-agent", &["echo"]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.exited() {
            panic!("python agent exited early ({status})\n{}", server.output());
        }
        match rust.invoke("py_upper", "hello from rust").await {
            Ok(reply) if reply.status == Status::Ok => {
                assert_eq!(&reply.payload[..], b"HELLO FROM RUST");
                assert_eq!(reply.content_type, "text/plain");
                break;
            }
            Ok(reply) if reply.status == Status::NoRoute && Instant::now() < deadline => {}
            Ok(reply) => panic!(
                "py_upper answered {:?} {:?}\n{}",
                reply.status,
                reply.message,
                server.output()
            ),
            Err(e) if Instant::now() < deadline => eprintln!("invoke py_upper: {e}; retrying"),
            Err(e) => panic!("invoke py_upper: {e}\n{}", server.output()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more, spread over the gateway's workers.
    for i in 0..20 {
        let text = format!("call {i}");
        let reply = rust.invoke("py_upper", text.clone()).await.expect("invoke");
        assert_eq!(reply.status, Status::Ok, "{}", reply.message);
        assert_eq!(&reply.payload[..], text.to_uppercase().as_bytes());
    }

    // The Python agent (another identity, its own process) invokes the Rust agent's echo.
    let mut invoke_args = identity_args(&pki, &scratch, "py-caller", addr);
    invoke_args.extend([
        "invoke".into(),
        "--capability".into(),
        "echo".into(),
        "--payload".into(),
        "hello from python".into(),
        "--retries".into(),
        "50".into(),
    ]);
    let mut caller = PyProcess::spawn(&script(), &scratch.0, "invoke", &invoke_args);
    let status = caller.wait(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "python invoke failed ({status})\n{}",
        caller.output()
    );
    assert_eq!(
        caller.stdout(),
        "OK\nhello from python\n",
        "{}",
        caller.output()
    );

    // The serving Python agent leaves gracefully: DETACH, DETACHED, close.
    let status = server.terminate(Duration::from_secs(15)).await;
    let output = server.output();
    assert!(
        status.is_some_and(|s| s.success()),
        "python agent did not leave cleanly ({status:?})\n{output}"
    );
    assert!(output.contains("detached=yes"), "{output}");
    // Every worker learns of the session's end moments later (PROTOCOL.md 6.4).
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = rust.invoke("py_upper", "anyone?").await.expect("invoke");
        if reply.status == Status::NoRoute {
            break;
        }
        assert!(
            Instant::now() < end,
            "py_upper still routed: {:?}",
            reply.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    rust.detach().await.expect("detach");
    gw.shutdown(Duration::from_secs(1));
}
