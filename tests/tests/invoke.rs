//! Attach and invoke through a real gateway over loopback QUIC.

use std::time::Duration;

use dmsc_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_and_invoke_by_capability() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    let target = attach(&pki, gw.local_addr(), "target", &["echo", "caller"]).await;
    let caller = attach(&pki, gw.local_addr(), "caller", &["unrelated"]).await;
    let reply = caller.invoke("echo", "hello").await.unwrap();
    assert_eq!(reply.status, dmsc_agent::Status::Ok);
    assert_eq!(reply.payload, "hello");
    // The gateway stamps the verified caller identity.
    let reply = caller.invoke("caller", "").await.unwrap();
    assert_eq!(reply.payload, "spiffe://test.local/agent/caller");
    let stats = gw.stats();
    assert_eq!(stats.agents, 2);
    assert!(stats.requests >= 2);
    target.detach().await.unwrap();
    caller.detach().await.unwrap();
    gw.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_session_reaches_that_agent_and_no_other() {
    let pki = Pki::new();
    let gw = gateway(&pki, 2, |_| {});
    let a = attach(&pki, gw.local_addr(), "a", &["whoami"]).await;
    let b = attach(&pki, gw.local_addr(), "b", &["whoami"]).await;
    let caller = attach(&pki, gw.local_addr(), "caller", &["echo"]).await;
    let whoami_at = |session| {
        let request = caller.request("whoami").target_session(session);
        async move { request.send("").await.unwrap() }
    };
    for (agent, name) in [(&a, "a"), (&b, "b")] {
        let session = agent.session().expect("attached");
        for _ in 0..20 {
            let reply = whoami_at(session).await;
            assert_eq!(reply.into_result().unwrap(), name);
        }
    }
    // A session that does not offer the capability, or is gone: NO_ROUTE, never another agent.
    let reply = whoami_at(caller.session().unwrap()).await;
    assert_eq!(reply.status, dmsc_protocol::Status::NoRoute);
    let gone = a.session().unwrap();
    a.detach().await.unwrap();
    let reply = whoami_at(gone).await;
    assert_eq!(
        reply.status,
        dmsc_protocol::Status::NoRoute,
        "{}",
        reply.message
    );
    // Without a target, the remaining agent still serves.
    assert_eq!(caller.invoke("whoami", "").await.unwrap().payload, "b");
}
