//! Interoperability of the trunk between gateways (`dmsc-peer/1`) with an independent peer:
//! `interop/python/dmsc_trunk_peer.py`, written in Python on aioquic from `docs/TRUNK.md` (and
//! the parts of `docs/PROTOCOL.md` it builds on) alone, acting as gateway `gw1` against a real
//! gateway `gw2` of a domain (control plane and gateways as processes on loopback).
//!
//! Needs `python3` with `aioquic` (`pip install aioquic`) and the workspace's binaries, so the
//! test is ignored by default:
//!
//! ```sh
//! cargo build --workspace --bins
//! cargo test -p dmsc-tests --test interop_trunk -- --ignored
//! ```
//!
//! `DMSC_PYTHON` overrides the interpreter (default `python3`).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dmsc_agent::{Agent, HandlerError, Handlers, Request, Response};
use dmsc_identity::{IssuedIdentity, SpiffeId};
use dmsc_tests::cluster::{Domain, OPEN_DOMAIN};
use dmsc_tests::python::PyProcess;
use dmsc_tests::{agent_config, attach, card, DOMAIN};

/// The Python peer gateway.
fn script() -> PathBuf {
    dmsc_tests::python::script("dmsc_trunk_peer.py")
}

/// Writes `id`'s certificate and key as `<name>.pem` and `<name>.key` under `dir`; returns
/// their paths as strings.
fn write_identity(dir: &Path, name: &str, id: &IssuedIdentity) -> (String, String) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    fs::write(&cert, &id.cert_pem).expect("write cert");
    fs::write(&key, &id.key_pem).expect("write key");
    (cert.display().to_string(), key.display().to_string())
}

/// An agent offering `far.probe`, which answers `key=value` lines describing the request as it
/// arrived (what the gateways stamped and carried), with content type `text/plain`.
async fn attach_probe(domain: &Domain, gateway: std::net::SocketAddr) -> Agent {
    let config = agent_config(
        &domain.pki,
        gateway,
        "far-probe",
        card("far-probe", &["far.probe"]),
    );
    let handlers = Handlers::new().on("far.probe", |req: Request| async move {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let text = format!(
            "caller={}\nvia={}\nhop={}\ncontent_type={}\ntrace={}\nspan={}\nflags={}\ndeadline_ms={}\n",
            req.caller,
            req.via,
            req.hop_count,
            req.content_type,
            hex(&req.trace.trace_id),
            hex(&req.trace.span_id),
            req.trace.flags,
            req.deadline.map_or(0, |d| d.as_millis()),
        );
        Ok::<_, HandlerError>(Response::ok(text).with_content_type("text/plain"))
    });
    Agent::attach(config, handlers)
        .await
        .expect("probe agent attaches")
}

/// A control plane and gateways `gw2` and `gw3` of [`OPEN_DOMAIN`]; `gw2` has an agent with
/// `echo` and `caller`, `gw3` one with `far.probe`. The Python peer connects to `gw2`'s first
/// trunk address as gateway `gw1` (listed in the table, not running) and runs its checks: echo
/// and the stamped caller, loops (visited, hop limit), malformed peer headers, `NO_ROUTE`,
/// forwarding on to `gw3`, refused handshakes, and the worked example of TRUNK.md section 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs python3 with aioquic and the built binaries (.ci/run provides both)"]
async fn python_peer_gateway_over_a_trunk() {
    let domain = Domain::new("interop-trunk", OPEN_DOMAIN);
    let cp = domain.control_plane(None);
    let (_gw2_proc, gw2) = domain.gateway("gw2", cp.ctl, &[], Duration::from_secs(30));
    let gw2 = gw2.expect("gw2 started");
    let (_gw3_proc, gw3) = domain.gateway("gw3", cp.ctl, &[], Duration::from_secs(30));
    let gw3 = gw3.expect("gw3 started");
    assert!(!gw2.trunks.is_empty(), "gw2 reports no trunk address");

    let target = attach(&domain.pki, gw2.addr, "target2", &["echo", "caller"]).await;
    let session = target.session().expect("target2 attached").0;
    let _probe = attach_probe(&domain, gw3.addr).await;

    // Certificates as PEM files: the peer's (gw1), a gateway the table does not list (gw9),
    // an agent's, and the CA.
    let dir = domain.dir.0.join("python-peer");
    fs::create_dir_all(&dir).expect("python-peer dir");
    let ca = &domain.pki.ca;
    let gateway_id = |id: &str| {
        ca.issue(&SpiffeId::gateway(DOMAIN, id).expect("gateway id"), &[])
            .expect("issue gateway")
    };
    let (gw1_cert, gw1_key) = write_identity(&dir, "gw1", &gateway_id("gw1"));
    let (gw9_cert, gw9_key) = write_identity(&dir, "gw9", &gateway_id("gw9"));
    let (agent_cert, agent_key) = write_identity(&dir, "agent", &domain.pki.agent("not-a-gateway"));
    let ca_path = dir.join("ca.pem");
    fs::write(&ca_path, ca.cert_pem()).expect("write ca");

    let session = session.to_string();
    let args: Vec<String> = [
        "--trunk",
        &gw2.trunks[0].to_string(),
        "--peer-id",
        "gw2",
        "--cert",
        &gw1_cert,
        "--key",
        &gw1_key,
        "--ca",
        &ca_path.display().to_string(),
        "--gateway-id",
        "gw1",
        "--caller",
        "spiffe://test.local/agent/someone",
        "--far-capability",
        "far.probe",
        "--far-gateway",
        "gw3",
        "--stranger-cert",
        &gw9_cert,
        "--stranger-key",
        &gw9_key,
        "--agent-cert",
        &agent_cert,
        "--agent-key",
        &agent_key,
        "--agent-addr",
        &gw2.addr.to_string(),
        "--target-session",
        &session,
        "--timeout",
        "150",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut peer = PyProcess::spawn(&script(), &dir, "peer", &args);
    let status = peer.wait(Duration::from_secs(180)).await;
    let output = peer.output();
    eprintln!("{output}");
    assert!(status.success(), "python peer failed ({status})\n{output}");
    for line in [
        "PASS (a) echo: OK and the payload echoed byte-exact",
        "PASS (b) the target sees the stamped caller",
        "PASS (c) visited holding the receiving gateway (ingress) is LOOP_DETECTED",
        "PASS (d) hop_count 8 (limits.max_hops) is LOOP_DETECTED",
        "PASS (e) the trunk keeps working after malformed headers",
        "PASS (f) a capability nobody offers is NO_ROUTE",
        "PASS (g) TRUNK.md 10 example decodes to the documented values",
        "all checks passed",
    ] {
        assert!(output.contains(line), "missing {line:?}\n{output}");
    }
}
