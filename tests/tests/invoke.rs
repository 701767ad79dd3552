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
