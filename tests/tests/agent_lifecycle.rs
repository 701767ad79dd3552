//! How an SDK agent stays attached while idle, and how it leaves: against a real gateway.

use std::time::{Duration, Instant};

use dmsc_agent::{Agent, Status};
use dmsc_tests::*;

/// With a gateway idle timeout far below the SDK's default keep-alive (5 s), an agent
/// configured with that idle timeout stays attached, on the same connections, through several
/// idle periods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_stays_attached_under_a_short_gateway_idle_timeout() {
    const IDLE: Duration = Duration::from_millis(1000);
    let pki = Pki::new();
    let gw = gateway(&pki, 2, |c| {
        c.limits.idle_timeout_ms = IDLE.as_millis() as u64;
    });
    let mut config = agent_config(&pki, gw.local_addr(), "idler", card("idler", &["echo"]));
    config.idle_timeout = IDLE;
    let agent = Agent::attach(config, test_handlers("idler"))
        .await
        .expect("agent attaches");
    assert!(
        eventually(Duration::from_secs(5), || agent.lanes() == 1).await,
        "the lane to the second worker opens"
    );
    let session = agent.session().expect("attached");

    // Four idle periods with no invocation. The primary or the lane timing out would show as a
    // new session or a missing lane; check often, since a lane is reopened within 100 ms.
    let end = Instant::now() + 4 * IDLE;
    while Instant::now() < end {
        assert_eq!(agent.session(), Some(session), "the agent re-attached");
        assert_eq!(agent.lanes(), 1, "the lane closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Still reachable through the gateway, over both connections.
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    for _ in 0..4 {
        let reply = caller.invoke("echo", "still here").await.expect("answer");
        assert_eq!(reply.status, Status::Ok);
    }
    assert_eq!(agent.session(), Some(session));
}

/// `Agent::serve_until_signal` (what the echo example ends with) detaches on SIGTERM and on
/// SIGINT: the gateway answers NO_ROUTE at once instead of routing to a vanished agent.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_termination_signal_detaches_the_agent() {
    use tokio::signal::unix::{signal, SignalKind};

    // This process must survive the signals it sends itself: listen before sending any.
    let _terminate = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let _interrupt = signal(SignalKind::interrupt()).expect("SIGINT handler");

    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    for (name, signal) in [("term", "TERM"), ("int", "INT")] {
        let agent = attach(&pki, gw.local_addr(), name, &["echo"]).await;
        let reply = caller.invoke("echo", name).await.expect("answer");
        assert_eq!(reply.status, Status::Ok);

        let started = Instant::now();
        let serving = tokio::spawn(agent.serve_until_signal(Duration::from_secs(2)));
        // A signal only reaches listeners installed before it: repeat until the agent leaves.
        while !serving.is_finished() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "SIG{signal} did not make the agent leave"
            );
            let sent = std::process::Command::new("kill")
                .args(["-s", signal, &std::process::id().to_string()])
                .status()
                .expect("run kill");
            assert!(sent.success());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        serving.await.unwrap().expect("detached");

        // Nobody offers `echo` any more, and the gateway knows it at once.
        let reply = caller
            .request("echo")
            .deadline(Duration::from_secs(2))
            .send(name)
            .await
            .expect("answer");
        assert_eq!(reply.status, Status::NoRoute);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
}
