//! Domain routes (`docs/CONTROL.md` section 7) against an in-process `dmsc-control serve`: fake
//! gateways speak `dmsc-ctl/1` by hand over loopback QUIC, report agents and read the `ROUTES`
//! and `REPORT_REJECTED` frames they are sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmsc_controlplane::cli::StatusArgs;
use dmsc_controlplane::config::DomainConfig;
use dmsc_controlplane::routes::Limits;
use dmsc_controlplane::serve::{RoutesSettings, ServeSettings, Server};
use dmsc_identity::{CertificateAuthority, Credentials, PrincipalKind, Resumption, SpiffeVerifier};
use dmsc_protocol::ctl::{decode_frame, encode_frame, CloseCode, Frame, Hello, VERSION};
use dmsc_protocol::domain::{
    AgentChange, AgentReport, Report, ReportRejected, Routes, Skill, TrunkFigures, Trunks,
};
use dmsc_protocol::spiffe::SpiffeId;
use dmsc_protocol::table::Generation;

const DOMAIN: &str = "dmsc.local";

/// A control plane serving a domain that lists `gateways`, on loopback ports.
struct ControlPlane {
    server: Server,
    ca: CertificateAuthority,
    started: Instant,
    run: tokio::task::JoinHandle<()>,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.server.hub.shut_down();
        self.run.abort();
    }
}

impl ControlPlane {
    async fn start(gateways: &[&str], routes: RoutesSettings) -> Self {
        let mut toml = format!("[domain]\nname = \"{DOMAIN}\"\ntrust_anchor = \"unused.pem\"\n");
        for g in gateways {
            toml.push_str(&format!("\n[[gateway]]\nid = \"{g}\"\n"));
        }
        let config = DomainConfig::from_toml("test.toml", &toml).expect("valid configuration");
        let ca = CertificateAuthority::generate(DOMAIN).unwrap();
        let control = ca.issue(&SpiffeId::control(DOMAIN).unwrap(), &[]).unwrap();
        let settings = ServeSettings {
            config_path: None,
            config,
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            credentials: Credentials {
                cert_chain: control.cert_chain(),
                private_key: control.private_key(),
            },
            trust_anchors: vec![ca.cert_der()],
            debounce: Duration::from_millis(10),
            routes,
        };
        let started = Instant::now();
        let (server, run) = dmsc_controlplane::serve::start(settings)
            .await
            .expect("server starts");
        let run = tokio::spawn(run);
        Self {
            server,
            ca,
            started,
            run,
        }
    }

    fn status(&self) -> serde_json::Value {
        serde_json::to_value(self.server.hub.status()).unwrap()
    }

    fn gateway_status(&self, id: &str) -> serde_json::Value {
        let status = self.status();
        status["gateways"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} in status: {status}"))
    }

    /// `dmsc-control status` as printed.
    async fn status_text(&self) -> String {
        let admin = self.server.admin;
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            dmsc_controlplane::cli::status(StatusArgs { admin, json: false }, &mut out)
                .expect("status");
            String::from_utf8(out).unwrap()
        })
        .await
        .unwrap()
    }

    /// `GET /metrics` from the admin endpoint.
    async fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.server.admin);
        tokio::task::spawn_blocking(move || {
            ureq::get(&url)
                .call()
                .expect("metrics")
                .body_mut()
                .read_to_string()
                .expect("metrics body")
        })
        .await
        .unwrap()
    }
}

/// What a fake gateway received.
#[derive(Debug)]
enum Got {
    Routes(Routes),
    Rejected(ReportRejected),
    Other(String),
}

/// A gateway speaking `dmsc-ctl/1` by hand.
struct Gateway {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    _endpoint: quinn::Endpoint,
}

impl Gateway {
    /// Connects as `id`, sends `HELLO` and acknowledges the table pushed: the session is
    /// established.
    async fn connect(cp: &ControlPlane, id: &str) -> Self {
        let mut gw = Self::open(cp, id).await;
        gw.send(&Frame::Hello(Hello {
            version: VERSION,
            gateway_id: id.into(),
            domain: DOMAIN.into(),
            held: None,
            sections: vec![],
        }))
        .await;
        let (nonce, generation) = gw.push().await;
        gw.send(&Frame::Ack { nonce, generation }).await;
        gw
    }

    /// Connects as `id` and opens the stream; sends nothing.
    async fn open(cp: &ControlPlane, id: &str) -> Self {
        let issued = cp
            .ca
            .issue(&SpiffeId::gateway(DOMAIN, id).unwrap(), &[])
            .unwrap();
        let verifier =
            SpiffeVerifier::new(&[cp.ca.cert_der()], &[PrincipalKind::Control], &[DOMAIN]).unwrap();
        let crypto = dmsc_identity::client_config(
            dmsc_protocol::ALPN_CONTROL,
            Credentials {
                cert_chain: issued.cert_chain(),
                private_key: issued.private_key(),
            },
            Arc::new(verifier),
            Resumption::Off,
        )
        .unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let ctl: SocketAddr = cp.server.listen;
        let conn = endpoint
            .connect(ctl, "localhost")
            .unwrap()
            .await
            .expect("handshake");
        let (send, recv) = conn.open_bi().await.unwrap();
        Self {
            conn,
            send,
            recv,
            buf: Vec::new(),
            _endpoint: endpoint,
        }
    }

    async fn send(&mut self, frame: &Frame<'_>) {
        let mut out = Vec::new();
        encode_frame(frame, &mut out);
        self.send.write_all(&out).await.expect("send");
    }

    async fn report(&mut self, report: Report) {
        self.send(&Frame::Report(report)).await;
    }

    /// Reads until a whole frame is buffered, at most until `deadline`; `Ok(false)` on timeout.
    async fn fill(&mut self, deadline: tokio::time::Instant) -> bool {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            if decode_frame(&self.buf).expect("valid frames").is_some() {
                return true;
            }
            match tokio::time::timeout_at(deadline, self.recv.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(read) => {
                    let n = read.expect("stream open").expect("stream not finished");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    /// The next table push: its nonce and generation.
    async fn push(&mut self) -> (u64, Generation) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        assert!(self.fill(deadline).await, "a PUSH within 10 s");
        let (frame, used) = decode_frame(&self.buf).unwrap().unwrap();
        let Frame::Push(p) = frame else {
            panic!("expected PUSH, got {frame:?}")
        };
        let answer = (p.nonce, p.generation);
        self.buf.drain(..used);
        answer
    }

    /// The next frame other than a `PUSH` within `wait`, or `None`.
    async fn next(&mut self, wait: Duration) -> Option<Got> {
        let deadline = tokio::time::Instant::now() + wait;
        if !self.fill(deadline).await {
            return None;
        }
        let (frame, used) = decode_frame(&self.buf).unwrap().unwrap();
        let got = match frame {
            Frame::Routes(r) => Got::Routes(r),
            Frame::ReportRejected(r) => Got::Rejected(r),
            Frame::Push(p) => panic!("unexpected PUSH {}", p.nonce),
            other => Got::Other(format!("{other:?}")),
        };
        self.buf.drain(..used);
        Some(got)
    }

    /// The next `ROUTES` within `wait` (failing on anything else), or `None`.
    async fn routes(&mut self, wait: Duration) -> Option<Routes> {
        match self.next(wait).await? {
            Got::Routes(r) => Some(r),
            other => panic!("expected ROUTES, got {other:?}"),
        }
    }

    /// The first `ROUTES` within `wait` for which `done` holds, skipping earlier ones.
    async fn routes_until(&mut self, wait: Duration, done: impl Fn(&Routes) -> bool) -> Routes {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self
                .routes(left)
                .await
                .expect("the expected routes in time");
            if done(&r) {
                return r;
            }
        }
    }

    /// The application close code the control plane closed the connection with.
    async fn closed_with(&self) -> Option<u64> {
        let e = tokio::time::timeout(Duration::from_secs(10), self.conn.closed())
            .await
            .expect("the control plane closes the connection");
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
            _ => None,
        }
    }
}

fn up(session: u64, skills: &[&str]) -> AgentChange {
    AgentChange::Up(AgentReport {
        session,
        identity: format!("spiffe://{DOMAIN}/agent/a{session}"),
        card_digest: [1; 32],
        card_bytes: 500,
        load: 1,
        limit: 8,
        skills: skills
            .iter()
            .map(|s| Skill {
                id: (*s).into(),
                description: format!("does {s}"),
                ..Default::default()
            })
            .collect(),
    })
}

fn full(address: &str, changes: Vec<AgentChange>) -> Report {
    Report {
        reset: true,
        more: false,
        addresses: vec![address.into()],
        changes,
    }
}

fn names(r: &Routes) -> Vec<&str> {
    r.capabilities.iter().map(|c| c.skill.id.as_str()).collect()
}

fn gateway_ids(r: &Routes) -> Vec<&str> {
    r.gateways.iter().map(|g| g.id.as_str()).collect()
}

fn settings(interval_ms: u64, grace_ms: u64) -> RoutesSettings {
    RoutesSettings {
        interval: Duration::from_millis(interval_ms),
        grace: Duration::from_millis(grace_ms),
        limits: Limits::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_attaches_are_a_handful_of_pushes() {
    const AGENTS: u64 = 10_000;
    const PER_FRAME: u64 = 10;
    let interval = Duration::from_millis(20);
    let cp = ControlPlane::start(&["gw1"], settings(20, 5000)).await;
    let mut gw = Gateway::connect(&cp, "gw1").await;
    let started = Instant::now();
    // One attach after another: each REPORT frame ends its batch, so each alone would be
    // worth a push.
    for first in (0..AGENTS).step_by(PER_FRAME as usize) {
        let changes = (first..first + PER_FRAME)
            .map(|i| up(i + 1, &[&format!("cap-{i:05}")]))
            .collect();
        gw.report(Report {
            reset: first == 0,
            more: false,
            addresses: vec!["127.0.0.1:5000".into()],
            changes,
        })
        .await;
    }
    let mut pushes = 0u64;
    let last = loop {
        let r = gw
            .routes(Duration::from_secs(30))
            .await
            .expect("ROUTES with every agent within 30 s");
        pushes += 1;
        assert!(
            pushes <= AGENTS / PER_FRAME,
            "one push per report: no coalescing"
        );
        if r.capabilities.len() as u64 == AGENTS {
            break r;
        }
    };
    let elapsed = started.elapsed();
    // At most one push per interval, plus the first one.
    let bound = (elapsed.as_millis() / interval.as_millis()) as u64 + 2;
    assert!(
        pushes <= bound,
        "{pushes} pushes in {elapsed:?}, at most {bound} allowed"
    );
    assert!(pushes < 100, "{pushes} pushes for 1,000 reports");
    assert_eq!(gateway_ids(&last), ["gw1"]);
    assert_eq!(last.gateways[0].addresses, ["127.0.0.1:5000"]);
    for (i, c) in last.capabilities.iter().enumerate() {
        assert_eq!(c.skill.id, format!("cap-{i:05}"));
        assert_eq!(c.skill.description, format!("does cap-{i:05}"));
        assert_eq!(c.providers.len(), 1);
        assert_eq!((c.providers[0].agents, c.providers[0].load), (1, 1));
    }
    // Nothing more changes: nothing more is pushed.
    assert!(gw.routes(Duration::from_millis(200)).await.is_none());
    let status = cp.status();
    assert_eq!(status["routes"]["version"], last.version);
    assert_eq!(status["routes"]["agents"], AGENTS);
    assert_eq!(status["routes"]["pushes"], pushes);
    let g = cp.gateway_status("gw1");
    assert_eq!(g["report"]["agents"], AGENTS);
    assert_eq!(g["report"]["capability_count"], AGENTS);
    assert_eq!(g["report"]["capabilities"].as_array().unwrap().len(), 1024);
    let metrics = cp.metrics().await;
    for line in [
        format!("dmsc_control_reports_total {}", AGENTS / PER_FRAME),
        format!("dmsc_control_routes_pushes_total {pushes}"),
        format!("dmsc_control_domain_agents {AGENTS}"),
        format!("dmsc_control_routes_version {}", last.version),
    ] {
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    assert!(metrics.contains("dmsc_control_routes_compiles_total"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_over_a_limit_are_refused_and_the_rest_stay_routed() {
    let mut routes = settings(5, 5000);
    routes.limits = Limits {
        agents_per_gateway: 3,
        skills_per_agent: 2,
        card_bytes: 1000,
    };
    let cp = ControlPlane::start(&["gw1"], routes).await;
    let mut gw = Gateway::connect(&cp, "gw1").await;
    let AgentChange::Up(mut big_card) = up(3, &["x"]) else {
        unreachable!()
    };
    big_card.card_bytes = 1001;
    gw.report(full(
        "127.0.0.1:5000",
        vec![
            up(1, &["a"]),
            up(2, &["a", "b", "c"]),
            AgentChange::Up(big_card),
            up(4, &["b"]),
            up(5, &["c"]),
            up(6, &["d"]),
        ],
    ))
    .await;
    let mut refused = Vec::new();
    let r = loop {
        match gw.next(Duration::from_secs(10)).await.expect("frames") {
            Got::Rejected(x) => refused.push(x.session),
            Got::Routes(r) => break r,
            Got::Other(f) => panic!("unexpected frame {f}"),
        }
    };
    assert_eq!(refused, [2, 3, 6], "refused one by one, in order");
    assert_eq!(names(&r), ["a", "b", "c"]);
    // The session stays up and later changes apply.
    gw.report(Report {
        changes: vec![AgentChange::Down { session: 1 }, up(7, &["e"])],
        ..Default::default()
    })
    .await;
    let r = gw
        .routes_until(Duration::from_secs(10), |r| names(r) == ["b", "c", "e"])
        .await;
    assert_eq!(r.version, 2);
    let g = cp.gateway_status("gw1");
    assert_eq!(g["connected"], true);
    assert_eq!(g["report"]["rejections"], 3);
    assert_eq!(g["report"]["state"], "complete");
    let metrics = cp.metrics().await;
    for reason in ["agent_skills", "card_bytes", "agents_per_gateway"] {
        let line = format!("dmsc_control_report_rejections_total{{reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    // TRUNKS: the status shows what it holds and how stale that is.
    gw.send(&Frame::Trunks(Trunks {
        routes_epoch: r.epoch,
        routes_version: r.version,
        trunks: vec![TrunkFigures {
            gateway: "gw2".into(),
            connected: 2,
            requests: 10,
            errors: 1,
        }],
    }))
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let g = loop {
        let g = cp.gateway_status("gw1");
        if g["routes_version"] == r.version || Instant::now() > deadline {
            break g;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(g["routes_version"], r.version);
    assert_eq!(g["routes_current"], true);
    assert_eq!(g["routes_behind_ms"], 0);
    assert_eq!(g["trunks"][0]["peer"], "gw2");
    assert_eq!(g["trunks"][0]["connected"], 2);
    assert_eq!(g["trunks"][0]["requests"], 10);
    assert_eq!(g["trunks"][0]["errors"], 1);
    let text = cp.status_text().await;
    for line in [
        "routes      version 2 (epoch ",
        "    reported 3 agents (complete), 3 refused; capabilities: b c e",
        "    routes   holds version 2, current",
        "    trunk    gw2              2 connected, 10 requests, 1 errors",
    ] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
    // A new version it has not reported holding: behind since that version was published.
    gw.report(Report {
        changes: vec![AgentChange::Down { session: 4 }, up(8, &["f"])],
        ..Default::default()
    })
    .await;
    gw.routes(Duration::from_secs(10)).await.expect("ROUTES v3");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let g = cp.gateway_status("gw1");
    assert_eq!(g["routes_current"], false);
    assert!(g["routes_behind_ms"].as_u64().unwrap() >= 50, "{g}");
    let text = cp.status_text().await;
    assert!(
        text.contains("    routes   holds version 2, current is 3: behind for "),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_gateway_leaves_the_routes_after_the_grace_period() {
    let grace = Duration::from_millis(400);
    let cp = ControlPlane::start(&["gw1", "gw2"], settings(5, 400)).await;
    let mut gw1 = Gateway::connect(&cp, "gw1").await;
    let mut gw2 = Gateway::connect(&cp, "gw2").await;
    gw1.report(full("127.0.0.1:5001", vec![up(1, &["a"])]))
        .await;
    gw2.report(full("127.0.0.1:5002", vec![up(1, &["a", "b"])]))
        .await;
    let r = gw1
        .routes_until(Duration::from_secs(10), |r| r.gateways.len() == 2)
        .await;
    assert_eq!(names(&r), ["a", "b"]);
    assert_eq!(r.capabilities[0].providers.len(), 2);
    // gw2's connection goes (not with SHUTTING_DOWN).
    gw2.conn.close(0u32.into(), b"gone");
    let gone = Instant::now();
    let deadline = gone + Duration::from_secs(5);
    loop {
        let g = cp.gateway_status("gw2");
        if g["connected"] == false {
            assert_eq!(g["report"]["state"], "grace", "{g}");
            break;
        }
        assert!(Instant::now() < deadline, "gw2 still connected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = gw1
        .routes_until(Duration::from_secs(10), |r| r.gateways.len() == 1)
        .await;
    assert!(
        gone.elapsed() >= grace,
        "removed after {:?}, before the grace period",
        gone.elapsed()
    );
    assert_eq!(gateway_ids(&r), ["gw1"]);
    assert_eq!(names(&r), ["a"]);
    assert_eq!(cp.gateway_status("gw2")["report"]["state"], "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_shutting_down_leaves_at_once_and_a_new_session_gets_the_routes() {
    // A grace period far longer than the test: only SHUTTING_DOWN can remove gw2 in time.
    let cp = ControlPlane::start(&["gw1", "gw2"], settings(5, 60_000)).await;
    let mut gw1 = Gateway::connect(&cp, "gw1").await;
    let mut gw2 = Gateway::connect(&cp, "gw2").await;
    gw1.report(full("127.0.0.1:5001", vec![up(1, &["a"])]))
        .await;
    gw2.report(full("127.0.0.1:5002", vec![up(1, &["b"])]))
        .await;
    gw1.routes_until(Duration::from_secs(10), |r| r.gateways.len() == 2)
        .await;
    gw2.conn
        .close(CloseCode::ShuttingDown.code().into(), b"gateway stopping");
    let r = gw1
        .routes_until(Duration::from_secs(10), |r| r.gateways.len() == 1)
        .await;
    assert_eq!(names(&r), ["a"]);
    // gw2 comes back: right after its table push, the current routes.
    let mut again = Gateway::connect(&cp, "gw2").await;
    let first = again
        .routes(Duration::from_secs(10))
        .await
        .expect("the current routes");
    assert_eq!(first, r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_routes_until_every_listed_gateway_reported() {
    let cp = ControlPlane::start(&["gw1", "gw2"], settings(5, 60_000)).await;
    let mut gw1 = Gateway::connect(&cp, "gw1").await;
    gw1.report(full("127.0.0.1:5001", vec![up(1, &["a"])]))
        .await;
    assert!(
        gw1.routes(Duration::from_millis(500)).await.is_none(),
        "routes sent while gw2 has not reported"
    );
    let status = cp.status();
    assert_eq!(status["routes"]["held"], true);
    assert_eq!(status["routes"]["waiting_for"][0], "gw2");
    let mut gw2 = Gateway::connect(&cp, "gw2").await;
    // A batch that has not ended is not a complete report.
    gw2.report(Report {
        reset: true,
        more: true,
        addresses: vec!["127.0.0.1:5002".into()],
        changes: vec![up(1, &["b"])],
    })
    .await;
    assert!(gw1.routes(Duration::from_millis(300)).await.is_none());
    gw2.report(Report {
        changes: vec![up(2, &["c"])],
        ..Default::default()
    })
    .await;
    // Released by the reports, long before the grace period.
    let r = gw1.routes(Duration::from_secs(10)).await.expect("routes");
    assert_eq!(gateway_ids(&r), ["gw1", "gw2"]);
    assert_eq!(names(&r), ["a", "b", "c"]);
    assert_eq!(r.version, 1);
    assert_ne!(r.epoch, 0);
    assert_eq!(gw2.routes(Duration::from_secs(10)).await, Some(r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_go_out_when_the_grace_period_passes_after_start() {
    let grace = Duration::from_millis(800);
    let cp = ControlPlane::start(&["gw1", "gw2"], settings(5, 800)).await;
    let mut gw1 = Gateway::connect(&cp, "gw1").await;
    gw1.report(full("127.0.0.1:5001", vec![up(1, &["a"])]))
        .await;
    let r = gw1.routes(Duration::from_secs(10)).await.expect("routes");
    assert!(
        cp.started.elapsed() >= grace,
        "routes after {:?}",
        cp.started.elapsed()
    );
    assert_eq!(gateway_ids(&r), ["gw1"]);
    assert_eq!(cp.status()["routes"]["held"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_before_hello_and_routes_from_a_gateway_are_unexpected() {
    let cp = ControlPlane::start(&["gw1"], settings(5, 100)).await;
    let mut gw = Gateway::open(&cp, "gw1").await;
    gw.report(full("127.0.0.1:5001", vec![])).await;
    assert_eq!(
        gw.closed_with().await,
        Some(CloseCode::UnexpectedFrame.code().into())
    );
    let mut gw = Gateway::connect(&cp, "gw1").await;
    gw.send(&Frame::Routes(Routes::default())).await;
    assert_eq!(
        gw.closed_with().await,
        Some(CloseCode::UnexpectedFrame.code().into())
    );
    let mut gw = Gateway::connect(&cp, "gw1").await;
    gw.send(&Frame::ReportRejected(ReportRejected::default()))
        .await;
    assert_eq!(
        gw.closed_with().await,
        Some(CloseCode::UnexpectedFrame.code().into())
    );
}
