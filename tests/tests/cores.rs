//! Thread-per-core behaviour: with lanes, requests stay on the core they arrived on; without
//! lanes, cross-core hand-offs still deliver every request.

use std::time::Duration;

use dmsc_agent::{Agent, Status};
use dmsc_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lanes_keep_requests_on_core_and_both_workers_carry_traffic() {
    let pki = Pki::new();
    let gw = gateway(&pki, 2, |_| {});
    let target = attach(&pki, gw.local_addr(), "target", &["echo"]).await;
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    for agent in [&target, &caller] {
        assert!(
            eventually(Duration::from_secs(5), || agent.lanes() == 1).await,
            "each agent opens a lane to the other worker"
        );
    }
    assert!(eventually(Duration::from_secs(5), || gw.stats().lanes == 2).await);
    let tasks: Vec<_> = (0..400)
        .map(|i| {
            let caller = caller.clone();
            tokio::spawn(async move { caller.invoke("echo", format!("m{i}")).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let reply = t.await.unwrap().unwrap();
        assert_eq!(reply.status, Status::Ok);
        assert_eq!(reply.payload, format!("m{i}"));
    }
    let stats = gw.stats();
    assert_eq!(stats.per_worker_requests.len(), 2);
    for (w, n) in stats.per_worker_requests.iter().enumerate() {
        assert!(*n >= 50, "worker {w} carried only {n} of 400: {stats:?}");
    }
    // Near zero: lanes are up before the load starts, so no request needs another core.
    assert!(stats.handoffs <= 4, "hand-offs: {stats:?}");
    assert!(stats.forwarded_local >= 396, "{stats:?}");
    target.detach().await.unwrap();
    caller.detach().await.unwrap();
    gw.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_lanes_requests_cross_cores_and_all_arrive() {
    let pki = Pki::new();
    let gw = gateway(&pki, 2, |c| c.lanes = false);
    let _target = attach(&pki, gw.local_addr(), "target", &["echo"]).await;
    // Ten callers, and more until one sits on the other worker than the target: the kernel's
    // SO_REUSEPORT hash decides, so keep attaching (2^-64 odds of never getting there).
    let home = |name: &str| {
        let id = format!("spiffe://{DOMAIN}/agent/{name}");
        gw.snapshot()
            .iter()
            .flat_map(|w| w.agents.iter())
            .find(|a| a.identity == id)
            .map(|a| a.home_worker)
    };
    let target_home = home("target").expect("the target is attached");
    let mut callers: Vec<Agent> = Vec::new();
    let mut elsewhere = false;
    for i in 0..64 {
        let name = format!("caller{i}");
        callers.push(attach(&pki, gw.local_addr(), &name, &["x"]).await);
        elsewhere |= home(&name).is_some_and(|w| w != target_home);
        if i >= 9 && elsewhere {
            break;
        }
    }
    assert!(
        elsewhere,
        "no caller landed on the other worker in 64 attaches"
    );
    let body: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut tasks = Vec::new();
    for (i, caller) in callers.iter().enumerate() {
        for j in 0..10 {
            let caller = caller.clone();
            let payload = if j == 0 {
                body.clone()
            } else {
                format!("{i}-{j}").into_bytes()
            };
            tasks.push(tokio::spawn(async move {
                let reply = caller
                    .request("echo")
                    .deadline(Duration::from_secs(30))
                    .send(payload.clone())
                    .await
                    .unwrap();
                (reply, payload)
            }));
        }
    }
    for t in tasks {
        let (reply, payload) = t.await.unwrap();
        assert_eq!(reply.status, Status::Ok, "{}", reply.message);
        assert!(reply.payload == payload);
    }
    let stats = gw.stats();
    assert!(
        stats.handoffs > 0,
        "some callers sit on the other worker: {stats:?}"
    );
    let sent = callers.len() as u64 * 10;
    assert_eq!(stats.handoffs + stats.forwarded_local, sent, "{stats:?}");
    gw.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polling_workers_serve_as_sleeping_ones_do() {
    let pki = Pki::new();
    let gw = gateway(&pki, 2, |c| c.busy_poll_us = 50);
    let _target = attach(&pki, gw.local_addr(), "target", &["echo"]).await;
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    for i in 0..50 {
        let body = format!("b{i}");
        let reply = caller.invoke("echo", body.clone()).await.unwrap();
        assert_eq!(reply.status, Status::Ok);
        assert_eq!(reply.payload, body.as_bytes());
    }
    gw.shutdown(std::time::Duration::from_secs(1));
}
