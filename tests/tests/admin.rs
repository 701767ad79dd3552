//! The admin endpoint: Prometheus metrics merged from every worker, and the agents view.

use std::io::{Read, Write};
use std::time::Duration;

use dmsc_agent::Status;
use dmsc_tests::*;

fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_agents_are_served() {
    let pki = Pki::new();
    let gw = gateway(&pki, 2, |_| {});
    let admin = gw.admin_addr().unwrap();
    let _target = attach(&pki, gw.local_addr(), "target", &["echo", "fail"]).await;
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    for _ in 0..20 {
        assert_eq!(caller.invoke("echo", "m").await.unwrap().status, Status::Ok);
    }
    assert_eq!(
        caller.invoke("fail", "m").await.unwrap().status,
        Status::ApplicationError
    );
    assert_eq!(
        caller.invoke("nobody", "m").await.unwrap().status,
        Status::NoRoute
    );

    let (status, body) = get(admin, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    // Counted on whichever worker served them, merged on read.
    let ok = value(
        &body,
        "dmsc_responses_total{capability=\"echo\",status=\"OK\"}",
    );
    assert_eq!(ok, 20.0);
    let failed = value(
        &body,
        "dmsc_responses_total{capability=\"fail\",status=\"APPLICATION_ERROR\"}",
    );
    assert_eq!(failed, 1.0);
    assert_eq!(
        value(&body, "dmsc_gateway_answers_total{status=\"NO_ROUTE\"}"),
        1.0
    );
    assert_eq!(
        value(&body, "dmsc_residence_seconds_count{capability=\"echo\"}"),
        20.0
    );
    assert_eq!(
        value(
            &body,
            "dmsc_request_duration_seconds_count{capability=\"echo\"}"
        ),
        20.0
    );
    assert_eq!(
        value(
            &body,
            "dmsc_residence_seconds_bucket{le=\"+Inf\",capability=\"echo\"}"
        ),
        20.0
    );
    assert!(
        body.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF"
    );
    assert_eq!(value(&body, "dmsc_attached_agents"), 2.0);
    assert_eq!(value(&body, "dmsc_table_generation{worker=\"0\"}"), 0.0);
    // Unrouted capability names never become label values (bounded cardinality).
    assert!(!body.contains("capability=\"nobody\""));

    let (status, body) = get(admin, "/agents");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let agents: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = agents
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["identity"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"spiffe://test.local/agent/target"), "{body}");
    assert!(ids.contains(&"spiffe://test.local/agent/caller"), "{body}");

    // Later scrapes carry only what changed from the workers, and still add up: the handle's
    // snapshots and the endpoint's share one cache.
    for _ in 0..5 {
        assert_eq!(caller.invoke("echo", "m").await.unwrap().status, Status::Ok);
    }
    let _ = gw.snapshot();
    let (_, body) = get(admin, "/metrics");
    assert_eq!(
        value(
            &body,
            "dmsc_responses_total{capability=\"echo\",status=\"OK\"}"
        ),
        25.0
    );
    assert_eq!(
        value(
            &body,
            "dmsc_responses_total{capability=\"fail\",status=\"APPLICATION_ERROR\"}"
        ),
        1.0
    );
    let (_, again) = get(admin, "/metrics");
    assert_eq!(
        value(
            &again,
            "dmsc_request_duration_seconds_count{capability=\"echo\"}"
        ),
        25.0
    );
    assert!(value(&again, "dmsc_wakeups_total") > 0.0);
    assert!(value(&again, "dmsc_datagrams_received_total") > 0.0);

    assert_eq!(get(admin, "/healthz").0, "HTTP/1.1 200 OK");
    assert_eq!(get(admin, "/nope").0, "HTTP/1.1 404 Not Found");
    gw.shutdown(Duration::from_secs(1));
}

/// Sends `request` on a fresh connection and returns the status line, waiting at most 5 s.
fn exchange(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("no answer to {request:?} within 5 s: {e}"));
    out.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn idle_connections_do_not_delay_other_requests() {
    let pki = Pki::new();
    let gw = gateway(&pki, 2, |_| {});
    let admin = gw.admin_addr().unwrap();
    // Ten clients that connect and send nothing.
    let idle: Vec<std::net::TcpStream> = (0..10)
        .map(|_| std::net::TcpStream::connect(admin).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));

    assert_eq!(
        exchange(admin, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"),
        "HTTP/1.1 200 OK"
    );
    let (status, body) = get(admin, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(value(&body, "dmsc_attached_agents"), 0.0);
    assert_eq!(
        exchange(
            admin,
            "POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n"
        ),
        "HTTP/1.1 405 Method Not Allowed"
    );
    // A head that never ends is cut at 8 KiB (9 KiB sent, which the server reads whole before
    // answering, so that closing does not reset the connection under the answer).
    let mut long = String::from("GET /healthz HTTP/1.1\r\nx: ");
    long.push_str(&"a".repeat(9 * 1024 - long.len()));
    assert_eq!(
        exchange(admin, &long),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );
    drop(idle);
    gw.shutdown(Duration::from_secs(1));
}

#[test]
fn connections_beyond_the_limit_get_503_and_silent_ones_are_closed() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    let admin = gw.admin_addr().unwrap();
    let mut idle: Vec<std::net::TcpStream> = (0..16)
        .map(|_| std::net::TcpStream::connect(admin).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        exchange(admin, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"),
        "HTTP/1.1 503 Service Unavailable",
        "a 17th connection is turned away"
    );
    // A client that sends no head within 2 s is closed, and its place freed.
    let mut buf = [0u8; 256];
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.read(&mut buf);
    }
    assert_eq!(
        exchange(admin, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"),
        "HTTP/1.1 200 OK"
    );
    gw.shutdown(Duration::from_secs(1));
}
