//! Payload integrity, concurrency and load sharing through the gateway.

use std::collections::HashMap;
use std::time::Duration;

use dmsc_agent::Status;
use dmsc_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_arrive_byte_exact() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    let target = attach(&pki, gw.local_addr(), "target", &["echo"]).await;
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    assert_echoes_byte_exact(&caller, &[0, 1024, 1024 * 1024, 64 * 1024 * 1024]).await;
    target.detach().await.unwrap();
    caller.detach().await.unwrap();
    gw.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_in_flight_on_one_connection() {
    let pki = Pki::new();
    // The default allows 100 streams per connection (memory per idle agent); raise it.
    let gw = gateway(&pki, 1, |c| c.limits.max_streams_per_connection = 1024);
    let mut config = agent_config(&pki, gw.local_addr(), "target", card("target", &["sleep"]));
    config.max_concurrent = 1024;
    let target = dmsc_agent::Agent::attach(config, test_handlers("target"))
        .await
        .unwrap();
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    // Each request sleeps 300 ms in the target, so all 1,000 are in flight together.
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let caller = caller.clone();
            tokio::spawn(async move { caller.invoke("sleep", "300").await })
        })
        .collect();
    for t in tasks {
        let reply = t.await.unwrap().unwrap();
        assert_eq!(reply.status, Status::Ok, "{}", reply.message);
        assert_eq!(reply.payload, "slept");
    }
    // Sequentially they would take 300 s; concurrently, a few seconds.
    assert!(started.elapsed() < Duration::from_secs(60));
    target.detach().await.unwrap();
    caller.detach().await.unwrap();
    gw.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_offering_the_same_capability_share_the_load() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    let mut agents = Vec::new();
    for name in ["a1", "a2", "a3"] {
        agents.push(attach(&pki, gw.local_addr(), name, &["whoami", "sleep"]).await);
    }
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    let tasks: Vec<_> = (0..300)
        .map(|_| {
            let caller = caller.clone();
            tokio::spawn(async move { caller.invoke("whoami", "").await })
        })
        .collect();
    for t in tasks {
        let reply = t.await.unwrap().unwrap();
        assert_eq!(reply.status, Status::Ok);
        *counts
            .entry(String::from_utf8(reply.payload.to_vec()).unwrap())
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "every agent got requests: {counts:?}");
    for (name, n) in &counts {
        assert!(*n >= 30, "{name} got only {n} of 300: {counts:?}");
    }
    for a in agents {
        a.detach().await.unwrap();
    }
    gw.shutdown(Duration::from_secs(1));
}
