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
