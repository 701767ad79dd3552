//! Statuses a caller can get, and the refusals, over real loopback QUIC. The statuses that depend
//! on timing (`DEADLINE_EXCEEDED`, `OVERLOADED`, a target that vanishes or fails after a hand-off
//! or mid-answer) are tested deterministically on the core's virtual clock instead
//! (`dataplane/src/core/tests/statuses.rs`).

use std::time::Duration;

use bytes::Bytes;
use dmsc_agent::{Agent, InvokeError, Status};
use dmsc_identity::{CertificateAuthority, IssuedIdentity, SpiffeId};
use dmsc_protocol::control::{ControlFrame, Refusal};
use dmsc_protocol::header::RequestHeader;
use dmsc_tests::*;

fn header(capability: &str, deadline_ms: u64, hop_count: u8) -> Vec<u8> {
    let mut out = Vec::new();
    RequestHeader {
        deadline_ms,
        hop_count,
        ..RequestHeader::new(capability)
    }
    .encode(&mut out)
    .unwrap();
    out
}

/// A raw agent attached with `capabilities`.
async fn raw_agent(pki: &Pki, gw: std::net::SocketAddr, name: &str, caps: &[&str]) -> RawClient {
    let client = RawClient::connect(gw, &pki.agent(name), &pki.ca)
        .await
        .unwrap();
    let (send, recv, answer) = client.attach(&card(name, caps)).await.unwrap();
    assert!(
        matches!(answer, ControlFrame::AttachOk { .. }),
        "{answer:?}"
    );
    // Keep the control stream open for the connection's life.
    std::mem::forget((send, recv));
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_route_application_error_and_ok() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    let target = attach(&pki, gw.local_addr(), "target", &["echo", "fail"]).await;
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    assert_eq!(caller.invoke("echo", "x").await.unwrap().status, Status::Ok);
    let reply = caller.invoke("nobody_offers_this", "x").await.unwrap();
    assert_eq!(reply.status, Status::NoRoute);
    assert!(!reply.message.is_empty());
    let reply = caller.invoke("fail", "x").await.unwrap();
    assert_eq!(reply.status, Status::ApplicationError);
    assert!(reply.message.contains("always fails"), "{}", reply.message);
    assert_eq!(gw.stats().answered(Status::NoRoute), 1);
    target.detach().await.unwrap();
    caller.detach().await.unwrap();
    gw.shutdown(Duration::from_secs(1));
}

/// The one real-QUIC target failure (the timing-dependent ones, deadlines, a vanishing or
/// handed-off target and `OVERLOADED`, are deterministic tests of the core:
/// `dataplane/src/core/tests/statuses.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_failed_when_the_target_resets() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    // A target that resets every request it is given.
    let resetter = raw_agent(&pki, gw.local_addr(), "resetter", &["reset_me"]).await;
    let conn = resetter.conn.clone();
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let mut buf = [0u8; 64];
            let _ = recv.read(&mut buf).await;
            let _ = send.reset(2u32.into());
            let _ = recv.stop(2u32.into());
        }
    });
    let reply = caller.invoke("reset_me", "x").await.unwrap();
    assert_eq!(reply.status, Status::TargetFailed);
    assert_eq!(gw.stats().answered(Status::TargetFailed), 1);
    gw.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_header_gets_bad_request_and_the_connection_lives_on() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    let _target = attach(&pki, gw.local_addr(), "target", &["echo"]).await;
    let caller = raw_agent(&pki, gw.local_addr(), "caller", &["x"]).await;

    // A slow valid request in flight on another stream while the bad ones arrive.
    let mut good = header("echo", 0, 0);
    good.extend_from_slice(b"still here");
    let cases: [&[u8]; 4] = [
        &[0x05, 0xff, 0xff, 0xff, 0xff, 0xff], // capability length beyond the block
        &[0x03, 0x02, 0xff, 0xfe],             // capability not UTF-8
        &[0x7f, 0xff],                         // header block over the limit
        &[0x1d, 0x00],                         // stream ends inside the header
    ];
    for raw in cases {
        let (status, message, _) = caller.request_raw(raw).await.unwrap();
        assert_eq!(status, Status::BadRequest, "{raw:?}: {message}");
    }
    let (status, _, payload) = caller.request_raw(&good).await.unwrap();
    assert_eq!(status, Status::Ok);
    assert_eq!(payload, Bytes::from_static(b"still here"));
    assert!(
        caller.conn.close_reason().is_none(),
        "connection still open"
    );
    gw.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_limit_gives_loop_detected() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |c| c.limits.max_hops = 4);
    let _target = attach(&pki, gw.local_addr(), "target", &["echo", "caller"]).await;
    let caller = raw_agent(&pki, gw.local_addr(), "caller", &["x"]).await;
    let (status, _, _) = caller.request_raw(&header("echo", 0, 4)).await.unwrap();
    assert_eq!(status, Status::LoopDetected);
    let (status, _, _) = caller.request_raw(&header("echo", 0, 3)).await.unwrap();
    assert_eq!(status, Status::Ok);
    // Whatever a caller writes in the caller field, the gateway stamps the verified identity.
    let mut spoof = Vec::new();
    RequestHeader {
        caller: "spiffe://test.local/agent/admin",
        ..RequestHeader::new("caller")
    }
    .encode(&mut spoof)
    .unwrap();
    let (status, _, payload) = caller.request_raw(&spoof).await.unwrap();
    assert_eq!(status, Status::Ok);
    assert_eq!(
        payload,
        Bytes::from_static(b"spiffe://test.local/agent/caller")
    );
    gw.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_and_non_agent_certificates_are_refused_at_the_handshake() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    // Chains to another CA (the client trusts the real CA for the server side).
    let other = CertificateAuthority::generate(DOMAIN).unwrap();
    let stranger = other
        .issue(&SpiffeId::agent(DOMAIN, "stranger").unwrap(), &[])
        .unwrap();
    let refused = match RawClient::connect(gw.local_addr(), &stranger, &pki.ca).await {
        Err(_) => true,
        // TLS 1.3 client auth fails after the client's handshake completes: the first use fails.
        Ok(c) => c.attach(&card("s", &["x"])).await.is_err(),
    };
    assert!(refused, "a certificate from another CA must be refused");
    // A valid certificate of the domain, but not an agent's.
    let gw_id = pki
        .ca
        .issue(&SpiffeId::gateway(DOMAIN, "impostor").unwrap(), &[])
        .unwrap();
    let refused = match RawClient::connect(gw.local_addr(), &gw_id, &pki.ca).await {
        Err(_) => true,
        Ok(c) => c.attach(&card("s", &["x"])).await.is_err(),
    };
    assert!(refused, "a non-agent SPIFFE ID must be refused");
    assert_eq!(gw.stats().agents, 0);
    gw.shutdown(Duration::from_secs(1));
}

/// The `CRYPTO_ERROR` code (`0x0100` + TLS alert) of the gateway's close of a connection whose
/// client certificate it refuses. With TLS 1.3 the client's handshake completes first, so the
/// close arrives after the agent has sent `ATTACH` (docs/PROTOCOL.md section 2.4).
async fn refusal_code(pki: &Pki, gw: std::net::SocketAddr, id: &IssuedIdentity) -> u64 {
    let error = match RawClient::connect(gw, id, &pki.ca).await {
        Ok(c) => {
            assert!(
                c.attach(&card("s", &["x"])).await.is_err(),
                "the gateway must not answer the ATTACH"
            );
            c.conn.closed().await
        }
        Err(e) => e
            .downcast::<quinn::ConnectionError>()
            .expect("a QUIC connection error"),
    };
    match error {
        quinn::ConnectionError::ConnectionClosed(close) => u64::from(close.error_code),
        other => panic!("expected a transport close, got {other:?}"),
    }
}

/// Like [`refusal_code`], for a client that presents no certificate.
async fn no_certificate_code(pki: &Pki, gw: std::net::SocketAddr) -> u64 {
    handshake_close_code(pki, gw, None, dmsc_protocol::ALPN_AGENT).await
}

/// Connects with a plain rustls client (a certificate if `identity` is given, and ALPN `alpn`)
/// and returns the transport close code the handshake ends with.
async fn handshake_close_code(
    pki: &Pki,
    gw: std::net::SocketAddr,
    identity: Option<&IssuedIdentity>,
    alpn: &[u8],
) -> u64 {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.cert_der()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some(me) => builder
            .with_client_auth_cert(me.cert_chain(), me.private_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    let connecting = endpoint.connect(gw, "localhost").unwrap();
    let error = match tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .expect("the handshake ends within 5 s")
    {
        Ok(conn) => conn.closed().await,
        Err(e) => e,
    };
    match error {
        quinn::ConnectionError::ConnectionClosed(close) => u64::from(close.error_code),
        other => panic!("expected a transport close, got {other:?}"),
    }
}

/// A client offering an ALPN other than `dmsc/1` (with a valid certificate) is refused in the
/// handshake with `no_application_protocol` (alert 120), as section 2.2 says, and the gateway
/// counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_alpn_is_refused_with_no_application_protocol() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    let me = pki.agent("alpn");
    let code = handshake_close_code(&pki, gw.local_addr(), Some(&me), b"dmsc/2").await;
    assert_eq!(code, 0x178);
    assert_eq!(gw.stats().handshakes_refused, 1);
    gw.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_client_certificates_close_with_the_documented_alerts() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    // Another CA: unknown_ca (48).
    let foreign = CertificateAuthority::generate("other.example").unwrap();
    let stranger = foreign
        .issue(&SpiffeId::agent("other.example", "stranger").unwrap(), &[])
        .unwrap();
    assert_eq!(refusal_code(&pki, gw.local_addr(), &stranger).await, 0x130);
    // A CA with the trusted CA's name but another key: its signature fails, decrypt_error (51).
    let lookalike = CertificateAuthority::generate(DOMAIN).unwrap();
    let stranger = lookalike
        .issue(&SpiffeId::agent(DOMAIN, "stranger").unwrap(), &[])
        .unwrap();
    assert_eq!(refusal_code(&pki, gw.local_addr(), &stranger).await, 0x133);
    let gw_id = pki
        .ca
        .issue(&SpiffeId::gateway(DOMAIN, "impostor").unwrap(), &[])
        .unwrap();
    // certificate_unknown (46): the SPIFFE ID does not name an agent.
    assert_eq!(refusal_code(&pki, gw.local_addr(), &gw_id).await, 0x12e);
    // No certificate at all: certificate_required (116).
    assert_eq!(no_certificate_code(&pki, gw.local_addr()).await, 0x174);
    assert_eq!(gw.stats().agents, 0);
    gw.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_card_is_refused_with_the_field_named() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    let client = RawClient::connect(gw.local_addr(), &pki.agent("bad"), &pki.ca)
        .await
        .unwrap();
    let (mut send, mut recv) = client.conn.open_bi().await.unwrap();
    let frame = ControlFrame::Attach {
        max_concurrent: 0,
        card: br#"{"name":"bad","skills":[{"name":"no id"}]}"#.to_vec(),
    };
    send.write_all(&frame.to_bytes().unwrap()).await.unwrap();
    match read_frame(&mut recv).await.unwrap() {
        ControlFrame::AttachRefused { refusal, reason } => {
            assert_eq!(refusal, Refusal::BadCard);
            assert!(reason.contains("skills[0].id"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Then the gateway closes the connection with ATTACH_REFUSED (0x3).
    let closed = tokio::time::timeout(Duration::from_secs(5), client.conn.closed())
        .await
        .unwrap();
    assert!(closed.to_string().contains("attach refused"), "{closed}");
    // The SDK reports the same refusal as an error naming the field.
    let config = agent_config(&pki, gw.local_addr(), "sdk", card("sdk", &["ok"]));
    let mut config = config;
    config.card.skills[0].id = "has space".into();
    match Agent::attach(config, test_handlers("sdk")).await {
        Err(e) => assert!(e.to_string().contains("skills[0].id"), "{e}"),
        Ok(_) => panic!("attach with an invalid card must fail"),
    }
    let _ = InvokeError::Closed;
    gw.shutdown(Duration::from_secs(1));
}

/// An `UPDATE_CARD` frame carrying `len` bytes of card, built by hand (the encoder refuses cards
/// over the protocol ceiling).
fn update_card_frame(len: usize) -> Vec<u8> {
    let mut payload = Vec::new();
    dmsc_protocol::varint::encode(len as u64, &mut payload);
    payload.resize(payload.len() + len, b' ');
    let mut wire = vec![0x06];
    dmsc_protocol::varint::encode(payload.len() as u64, &mut wire);
    wire.extend_from_slice(&payload);
    wire
}

/// Attaches, sends an `UPDATE_CARD` with a card of `len` bytes, and returns the application
/// error code the gateway closes the connection with.
async fn update_card_close_code(pki: &Pki, gw: std::net::SocketAddr, len: usize) -> u64 {
    let client = RawClient::connect(gw, &pki.agent("big"), &pki.ca)
        .await
        .unwrap();
    let (mut send, _recv, answer) = client.attach(&card("big", &["big"])).await.unwrap();
    assert!(
        matches!(answer, ControlFrame::AttachOk { .. }),
        "{answer:?}"
    );
    send.write_all(&update_card_frame(len)).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), client.conn.closed())
        .await
        .unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => close.error_code.into_inner(),
        other => panic!("expected an application close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_cards_get_bad_card_or_a_close_as_section_5_4_says() {
    let pki = Pki::new();
    // Default limits.max_card_bytes = 65536: frame limit 66560.
    let gw = gateway(&pki, 1, |_| {});
    let protocol_violation = dmsc_protocol::ConnectionCode::ProtocolViolation.code();
    let frame_too_large = dmsc_protocol::ConnectionCode::FrameTooLarge.code();
    assert_eq!(
        update_card_close_code(&pki, gw.local_addr(), 65_537).await,
        protocol_violation
    );
    assert_eq!(
        update_card_close_code(&pki, gw.local_addr(), 66_556).await,
        protocol_violation
    );
    assert_eq!(
        update_card_close_code(&pki, gw.local_addr(), 66_557).await,
        frame_too_large
    );
    gw.shutdown(Duration::from_secs(1));

    // limits.max_card_bytes = 4096: frame limit 5120.
    let gw = gateway(&pki, 1, |c| c.limits.max_card_bytes = 4096);
    let client = RawClient::connect(gw.local_addr(), &pki.agent("big"), &pki.ca)
        .await
        .unwrap();
    let (mut send, mut recv, answer) = client.attach(&card("big", &["big"])).await.unwrap();
    assert!(
        matches!(answer, ControlFrame::AttachOk { .. }),
        "{answer:?}"
    );
    send.write_all(&update_card_frame(5_000)).await.unwrap();
    match read_frame(&mut recv).await.unwrap() {
        ControlFrame::UpdateResult { refusal, reason } => {
            assert_eq!(refusal, Some(Refusal::BadCard));
            assert_eq!(
                reason,
                "card is 5000 bytes, over the gateway's limit of 4096 (limits.max_card_bytes)"
            );
        }
        other => panic!("expected UPDATE_RESULT, got {other:?}"),
    }
    // The connection stays: the largest refusable card still gets an answer...
    send.write_all(&update_card_frame(5_118)).await.unwrap();
    assert!(matches!(
        read_frame(&mut recv).await.unwrap(),
        ControlFrame::UpdateResult {
            refusal: Some(Refusal::BadCard),
            ..
        }
    ));
    // ...and one byte more closes it.
    send.write_all(&update_card_frame(5_119)).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), client.conn.closed())
        .await
        .unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code.into_inner(), frame_too_large)
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    gw.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_calling_each_other_in_a_circle_end_with_loop_detected() {
    use dmsc_agent::{HandlerError, Handlers, Request, Response};
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |c| c.limits.max_hops = 4);
    // "ping" calls "pong" and "pong" calls "ping", each on behalf of the request it serves,
    // and answers with whatever status its own call got.
    let relay = |next: &'static str| {
        Handlers::new().on(
            if next == "pong" { "ping" } else { "pong" },
            move |req: Request| async move {
                let agent = req.agent().expect("served by an agent").clone();
                let reply = agent.request(next).caused_by(&req).send("").await;
                let status = match reply {
                    Ok(r) => r.status,
                    Err(e) => e.status(),
                };
                Ok::<_, HandlerError>(Response::error(status, format!("{next} answered {status}")))
            },
        )
    };
    let a = Agent::attach(
        agent_config(&pki, gw.local_addr(), "a", card("a", &["ping"])),
        relay("pong"),
    )
    .await
    .unwrap();
    let b = Agent::attach(
        agent_config(&pki, gw.local_addr(), "b", card("b", &["pong"])),
        relay("ping"),
    )
    .await
    .unwrap();
    let caller = attach(&pki, gw.local_addr(), "caller", &["x"]).await;
    let reply = caller.invoke("ping", "").await.unwrap();
    assert_eq!(reply.status, Status::LoopDetected, "{}", reply.message);
    assert_eq!(gw.stats().answered(Status::LoopDetected), 1);
    drop((a, b));
    gw.shutdown(Duration::from_secs(1));
}
