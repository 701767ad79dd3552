//! Draining and restarting the gateway: in-flight requests finish, SDK agents re-attach, and
//! no request is silently lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dmsc_agent::Status;
use dmsc_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_in_flight_requests_finish() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    let _target = attach(&pki, gw.local_addr(), "target", &["sleep", "echo"]).await;
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    let slow = {
        let caller = caller.clone();
        tokio::spawn(async move { caller.invoke("sleep", "500").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.drain(Duration::from_secs(3));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // New work is refused while draining (UNAVAILABLE, or the SDK already stopped using the
    // draining gateway), never accepted and dropped.
    match caller
        .request("echo")
        .deadline(Duration::from_millis(300))
        .send("x")
        .await
    {
        Ok(reply) => assert_eq!(reply.status, Status::Unavailable),
        Err(e) => assert_ne!(e.status(), Status::Ok),
    }
    let reply = slow.await.unwrap().unwrap();
    assert_eq!(
        reply.status,
        Status::Ok,
        "the in-flight request completes during the drain"
    );
    assert!(eventually(Duration::from_secs(5), || gw.is_finished()).await);
    gw.join();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_survive_a_gateway_restart_and_nothing_is_silently_lost() {
    let pki = Pki::new();
    // The first gateway picks a free port; the second binds the same address (no probe of a
    // "free" port that someone else could take in between).
    let gw = gateway(&pki, 2, |_| {});
    let listen = gw.local_addr();
    let target = attach(&pki, gw.local_addr(), "target", &["echo"]).await;
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    assert_eq!(
        caller.invoke("echo", "before").await.unwrap().status,
        Status::Ok
    );

    // Requests keep flowing through the restart; every one must come back answered or failed
    // with a status, within its deadline.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let caller = caller.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) && i < 2000 {
                i += 1;
                let body = format!("r{i}");
                let started = tokio::time::Instant::now();
                let outcome = tokio::time::timeout(
                    Duration::from_secs(10),
                    caller
                        .request("echo")
                        .deadline(Duration::from_secs(2))
                        .send(body.clone()),
                )
                .await
                .expect("no request may hang past its deadline");
                let status = match outcome {
                    Ok(reply) => {
                        if reply.status == Status::Ok {
                            assert_eq!(reply.payload, body);
                        }
                        reply.status
                    }
                    Err(e) => e.status(),
                };
                outcomes.push(status);
                if started.elapsed() < Duration::from_millis(5) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            outcomes
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.shutdown(Duration::from_millis(500));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gw = gateway(&pki, 2, |c| c.listen = listen);
    for agent in [&target, &caller] {
        assert!(
            agent.wait_attached(Duration::from_secs(15)).await,
            "agent re-attaches"
        );
    }
    let mut ok_after = false;
    for _ in 0..50 {
        if caller
            .invoke("echo", "after")
            .await
            .is_ok_and(|r| r.status == Status::Ok)
        {
            ok_after = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok_after, "requests flow again after the restart");
    stop.store(true, Ordering::Relaxed);
    let outcomes = load.await.unwrap();
    assert!(
        outcomes.iter().filter(|s| **s == Status::Ok).count() > 5,
        "{outcomes:?}"
    );
    // Every outcome is a defined status (answered or failed), none unknown.
    assert!(
        outcomes.iter().all(|s| !matches!(s, Status::Unknown(_))),
        "{outcomes:?}"
    );
    gw.shutdown(Duration::from_secs(1));
}
