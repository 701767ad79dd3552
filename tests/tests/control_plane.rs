//! The control plane and gateways as real processes on loopback: tables pushed and
//! acknowledged, policy changed live under load, a bad configuration refused, fail static
//! across control-plane and gateway restarts, unlisted gateways refused. Run with
//! `cargo test --workspace` (the tests start the built `dmsc-control` and `dmsc-gateway`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmsc_agent::{Agent, Status};
use dmsc_tests::cluster::{http, Domain, OPEN_DOMAIN};
use dmsc_tests::*;

const GATEWAYS: [&str; 3] = ["gw1", "gw2", "gw3"];

/// Everyone may do everything.
const OPEN: &str = OPEN_DOMAIN;

/// `whoami` denied to callers; callers see only `echo` in discovery.
const CLOSED: &str = dmsc_tests::test_domain!(
    r#"
[groups.agents]
members = ["spiffe://test.local/agent/target*"]
advertise = ["*"]
discover = ["*"]

[groups.callers]
members = ["spiffe://test.local/agent/caller*"]
advertise = ["x"]
discover = ["echo"]

[[invoke]]
effect = "allow"
groups = ["agents"]
capabilities = ["*"]

[[invoke]]
effect = "allow"
groups = ["callers"]
capabilities = ["*"]

[[invoke]]
effect = "deny"
groups = ["callers"]
capabilities = ["whoami"]
"#
);

/// Steady load on `echo`, one request at a time, until [`Load::assert_no_failures`].
struct Load {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, Vec<String>)>,
}

impl Load {
    fn start(caller: Agent) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            let mut i = 0u32;
            while !flag.load(Ordering::Relaxed) && i < 20_000 {
                i += 1;
                let body = format!("r{i}");
                match caller
                    .request("echo")
                    .deadline(Duration::from_secs(5))
                    .send(body.clone())
                    .await
                {
                    Ok(r) if r.status == Status::Ok && r.payload == body.as_bytes() => ok += 1,
                    Ok(r) => failed.push(format!("{:?} {}", r.status, r.message)),
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        });
        Load { stop, task }
    }

    /// Lets the load run a little longer, stops it, and asserts that it ran and that no
    /// request failed.
    async fn assert_no_failures(self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.stop.store(true, Ordering::Relaxed);
        let (ok, failed) = self.task.await.unwrap();
        assert!(ok > 10, "the load ran ({ok} requests)");
        assert!(
            failed.is_empty(),
            "{} requests failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
    }
}

fn gen_of_gateway(admin: std::net::SocketAddr) -> Vec<String> {
    http(admin, "GET", "/metrics")
        .lines()
        .filter(|l| l.starts_with("dmsc_table_info"))
        .filter_map(|l| l.split("generation=\"").nth(1))
        .map(|g| g.split('"').next().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_tables_enforce_policy_and_change_live_without_failed_requests() {
    let domain = Domain::new("cp-live", OPEN);
    let cp = domain.control_plane(None);
    let mut gws = Vec::new();
    for id in GATEWAYS {
        let (proc, addrs) = domain.gateway(id, cp.ctl, &[], Duration::from_secs(30));
        gws.push((proc, addrs.expect("gateway starts on the pushed table")));
    }
    let open = cp.wait_in_sync(&GATEWAYS, Duration::from_secs(10));
    for (_, a) in &gws {
        assert_eq!(
            a.table, open,
            "each gateway started on the pushed generation"
        );
        assert_eq!(gen_of_gateway(a.admin), vec![open.clone(), open.clone()]);
    }

    let gw1 = gws[0].1.addr;
    let target = attach(&domain.pki, gw1, "target", &["echo", "whoami"]).await;
    assert!(target.refused().is_empty());
    let caller = attach(&domain.pki, gw1, "caller", &["x"]).await;
    let first = caller.invoke("whoami", "s").await.unwrap();
    assert_eq!(
        first.status,
        Status::Ok,
        "{} {}",
        first.message,
        http(gws[0].1.admin, "GET", "/agents")
    );

    // Change the policy while requests flow.
    let running = Load::start(caller.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    domain.write_config(CLOSED);
    let (code, out) = tokio::task::block_in_place(|| cp.command(&["apply"]));
    assert_eq!(code, 0, "apply: {out}");
    for id in GATEWAYS {
        assert!(
            out.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == [id, "acked"]),
            "{out}"
        );
    }
    let closed = cp.status()["generation"].as_str().unwrap().to_owned();
    assert_ne!(closed, open);
    // Acknowledged means every worker holds it: the new policy is in force at once.
    let denied = caller.invoke("whoami", "s").await.unwrap();
    assert_eq!(denied.status, Status::Denied, "{}", denied.message);
    let seen: Vec<String> = caller
        .discover("", "")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.capability)
        .collect();
    assert_eq!(
        seen,
        vec!["echo".to_owned()],
        "exposure follows the new table"
    );
    running.assert_no_failures().await;
    for (_, a) in &gws {
        assert_eq!(
            gen_of_gateway(a.admin),
            vec![closed.clone(), closed.clone()]
        );
    }

    // `status` shows every gateway in sync, and its agents.
    let status = cp.wait_in_sync(&GATEWAYS, Duration::from_secs(10));
    assert_eq!(status, closed);
    let (code, text) = cp.command(&["status"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("gw1") && text.contains("connected"), "{text}");
    let agents_reported = (0..100).any(|_| {
        let s = cp.status();
        let gw1 = s["gateways"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"] == "gw1")
            .cloned()
            .unwrap();
        if gw1["agents"] == 2 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
        false
    });
    assert!(
        agents_reported,
        "gw1 reports its two agents: {:#}",
        cp.status()
    );

    // A configuration with an error is refused with file, line and key; nothing changes.
    domain.write_config(&CLOSED.replace("effect = \"deny\"", "effect = \"maybe\""));
    let (code, out) = cp.command(&["apply"]);
    assert_eq!(code, 64, "{out}");
    assert!(
        out.contains("domain.toml:") && out.contains("effect"),
        "{out}"
    );
    assert_eq!(cp.status()["generation"], closed.as_str());
    assert!(cp.status()["last_error"].as_str().is_some());
    assert_eq!(
        caller.invoke("whoami", "s").await.unwrap().status,
        Status::Denied
    );
    // SIGHUP reloads too: back to the open policy.
    domain.write_config(OPEN);
    cp.proc.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || cp.status()["generation"]
            == open.as_str())
        .await,
        "SIGHUP applied the open policy"
    );
    cp.wait_in_sync(&GATEWAYS, Duration::from_secs(10));
    assert_eq!(
        caller.invoke("whoami", "s").await.unwrap().status,
        Status::Ok
    );

    // Admission and rate limits, pushed live: agents may now advertise only `echo` and `x`
    // (the target's `whoami` is withdrawn), and each may make 1 request per second.
    let limited = OPEN.replace(
        "advertise = [\"*\"]",
        "advertise = [\"echo\", \"x\"]\nrate_limit = { per_second = 1, burst = 2 }",
    );
    domain.write_config(&limited);
    let (code, out) = cp.command(&["apply"]);
    assert_eq!(code, 0, "{out}");
    let withdrawn = caller.invoke("whoami", "s").await.unwrap();
    assert_eq!(withdrawn.status, Status::NoRoute, "{}", withdrawn.message);
    // The attached agent was told (CAPABILITIES_REFUSED); a new one learns it in ATTACH_OK;
    // one offering nothing it may advertise is refused.
    assert!(
        eventually(Duration::from_secs(5), || target.refused() == ["whoami"]).await,
        "{:?}",
        target.refused()
    );
    let late = attach(&domain.pki, gw1, "target-late", &["echo", "whoami"]).await;
    assert_eq!(late.refused(), ["whoami"]);
    let config = agent_config(
        &domain.pki,
        gw1,
        "target-none",
        card("target-none", &["whoami"]),
    );
    let refused = dmsc_agent::Agent::attach(config, test_handlers("target-none")).await;
    assert!(
        refused.is_err(),
        "an agent with no capability it may advertise is refused"
    );
    let mut statuses = Vec::new();
    for i in 0..10 {
        statuses.push(caller.invoke("echo", format!("{i}")).await.unwrap().status);
    }
    assert!(statuses.contains(&Status::Ok), "{statuses:?}");
    assert!(
        statuses.contains(&Status::RateLimited),
        "ten requests at once exceed 1/s with a burst of 2: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_fail_static_and_resync_when_the_control_plane_returns() {
    let domain = Domain::new("cp-static", CLOSED);
    let mut cp = domain.control_plane(None);
    let ctl = cp.ctl;
    let (_gw1, a1) = domain.gateway("gw1", ctl, &[], Duration::from_secs(30));
    let a1 = a1.expect("gw1 starts");
    let (mut gw2, a2) = domain.gateway("gw2", ctl, &[], Duration::from_secs(30));
    a2.expect("gw2 starts");
    let closed = cp.wait_in_sync(&["gw1", "gw2"], Duration::from_secs(10));

    let _target = attach(&domain.pki, a1.addr, "target", &["echo", "whoami"]).await;
    let caller = attach(&domain.pki, a1.addr, "caller", &["x"]).await;
    let running = Load::start(caller.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The control plane dies under load: traffic continues on the installed tables.
    cp.proc.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        caller.invoke("whoami", "s").await.unwrap().status,
        Status::Denied
    );

    // A gateway restarted meanwhile serves its saved table.
    gw2.kill();
    let (gw2b, a2b) = tokio::task::block_in_place(|| {
        domain.gateway(
            "gw2",
            ctl,
            &["--control-timeout-ms", "500"],
            Duration::from_secs(20),
        )
    });
    let a2b = a2b.expect("gw2 starts from its saved table with the control plane down");
    assert_eq!(a2b.table, closed);
    let target2 = attach(&domain.pki, a2b.addr, "target2", &["whoami"]).await;
    let caller2 = attach(&domain.pki, a2b.addr, "caller2", &["x"]).await;
    assert_eq!(
        caller2.invoke("whoami", "s").await.unwrap().status,
        Status::Denied,
        "the saved policy is enforced"
    );

    // The control plane returns on the same address: both gateways resync, traffic unharmed.
    let cp2 = domain.control_plane(Some(ctl));
    let again =
        tokio::task::block_in_place(|| cp2.wait_in_sync(&["gw1", "gw2"], Duration::from_secs(20)));
    assert_eq!(
        again, closed,
        "the same configuration names the same generation after a restart"
    );
    running.assert_no_failures().await;
    drop((gw2b, target2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlisted_gateway_is_refused() {
    let domain = Domain::new("cp-unlisted", OPEN);
    let cp = domain.control_plane(None);
    let (_gw9, ready) =
        tokio::task::block_in_place(|| domain.gateway("gw9", cp.ctl, &[], Duration::from_secs(3)));
    assert!(
        ready.is_none(),
        "a gateway not in domain.toml gets no table"
    );
    let metrics = http(cp.admin, "GET", "/metrics");
    let refused: u64 = metrics
        .lines()
        .find(|l| l.starts_with("dmsc_control_refused_sessions_total{reason=\"not_listed\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        refused >= 2,
        "it kept retrying and was refused each time: {metrics}"
    );

    // A gateway whose certificate comes from another CA fails the handshake.
    let foreign = Domain::new("cp-foreign", OPEN);
    let (_intruder, ready) = tokio::task::block_in_place(|| {
        // The foreign domain's own CA and gateway identity, pointed at this control plane.
        foreign.gateway("gw1", cp.ctl, &[], Duration::from_secs(3))
    });
    assert!(ready.is_none(), "a gateway of another CA gets no table");
    let metrics = http(cp.admin, "GET", "/metrics");
    assert!(
        metrics.lines().any(|l| l
            .starts_with("dmsc_control_refused_sessions_total{reason=\"handshake\"}")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    let status = cp.status();
    assert!(
        !status["gateways"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["id"] == "gw9" && g["connected"] == true),
        "{status:#}"
    );
}
