//! `dmsc-ctl/1` spoken by hand against the real processes: a fake gateway against
//! `dmsc-control serve` (deltas against a base nobody holds, malformed, oversized and
//! out-of-order frames, a lying HELLO), and a fake control plane against `dmsc-gateway`
//! (a delta with a wrong base, a table for another domain, garbage).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use dmsc_identity::{
    load_cert_chain, load_private_key, Credentials, DevPki, PrincipalKind, Resumption, SpiffeId,
    SpiffeVerifier,
};
use dmsc_protocol::ctl::{
    decode_frame, encode_frame, CloseCode, Frame, Hello, NackCode, Push, PushBody, VERSION,
};
use dmsc_protocol::table::sections::{diff, section_version, SectionRef};
use dmsc_protocol::table::{section, Generation, Table, TableParts};
use dmsc_tests::cluster::{http, Domain, OPEN_DOMAIN};
use dmsc_tests::DOMAIN;

/// Every agent may do everything; gateways gw1 to gw3 are listed.
const CONFIG: &str = OPEN_DOMAIN;

fn credentials(domain: &Domain, id: &SpiffeId) -> Credentials {
    let dev = DevPki::new(domain.dir.0.join("pki"));
    let ca = dev.load_ca().expect("CA");
    let (cert, key) = dev.ensure(&ca, id).expect("identity");
    Credentials {
        cert_chain: load_cert_chain(&cert).unwrap(),
        private_key: load_private_key(&key).unwrap(),
    }
}

/// One side of a session, speaking frames by hand.
struct Peer {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    _endpoint: quinn::Endpoint,
}

impl Peer {
    async fn send(&mut self, frame: &Frame<'_>) {
        let mut out = Vec::new();
        encode_frame(frame, &mut out);
        self.send.write_all(&out).await.expect("send");
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        self.send.write_all(bytes).await.expect("send");
    }

    /// The next frame, as owned parts: (frame with borrowed bodies copied into `keep`).
    async fn next(&mut self) -> anyhow::Result<(Frame<'static>, Vec<u8>)> {
        loop {
            if let Some((_, used)) = decode_frame(&self.buf)? {
                let bytes: Vec<u8> = self.buf.drain(..used).collect();
                let leaked: &'static [u8] = Box::leak(bytes.clone().into_boxed_slice());
                let (frame, _) = decode_frame(leaked)?.context("whole frame")?;
                return Ok((frame, bytes));
            }
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(Duration::from_secs(10), self.recv.read(&mut chunk))
                .await
                .context("no frame within 10 s")??
                .ok_or_else(|| anyhow!("stream finished"))?;
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame that is not a `STATUS`.
    async fn answer(&mut self) -> anyhow::Result<Frame<'static>> {
        loop {
            match self.next().await?.0 {
                // What a gateway reports besides answers (its agents, trunks, routes held).
                Frame::Status(_) | Frame::Report(_) | Frame::Trunks(_) => continue,
                // What a control plane sends besides pushes (the domain routes).
                Frame::Routes(_) => continue,
                other => return Ok(other),
            }
        }
    }

    /// Waits for the connection to close; returns the application close code the peer sent.
    async fn closed_with(&self) -> Option<u64> {
        let e = tokio::time::timeout(Duration::from_secs(10), self.conn.closed())
            .await
            .expect("the peer closes the connection");
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
            _ => None,
        }
    }
}

/// A fake gateway `id` connected to the control plane at `ctl`, stream open.
async fn fake_gateway(domain: &Domain, ctl: SocketAddr, id: &str) -> Peer {
    let creds = credentials(domain, &SpiffeId::gateway(DOMAIN, id).unwrap());
    let verifier = SpiffeVerifier::new(
        &[domain.pki.ca.cert_der()],
        &[PrincipalKind::Control],
        &[DOMAIN],
    )
    .unwrap();
    let crypto = dmsc_identity::client_config(
        dmsc_protocol::ALPN_CONTROL,
        creds,
        Arc::new(verifier),
        Resumption::Off,
    )
    .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(ctl, "localhost")
        .unwrap()
        .await
        .expect("handshake");
    let (send, recv) = conn.open_bi().await.unwrap();
    Peer {
        conn,
        send,
        recv,
        buf: Vec::new(),
        _endpoint: endpoint,
    }
}

fn hello(id: &str, held: Option<Generation>, sections: Vec<(u64, [u8; 32])>) -> Frame<'static> {
    Frame::Hello(Hello {
        version: VERSION,
        gateway_id: id.into(),
        domain: DOMAIN.into(),
        held,
        sections,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_against_a_base_the_gateway_lacks_is_answered_with_a_snapshot() {
    let domain = Domain::new("ctl-base", CONFIG);
    let cp = domain.control_plane(None);
    let current = cp.status()["generation"].as_str().unwrap().to_owned();
    // The same configuration compiles to the same table here as in the control plane.
    let config = dmsc_controlplane::config::DomainConfig::load(&domain.config_path()).unwrap();
    let compiled = dmsc_controlplane::compile::compile(&config).unwrap();
    assert_eq!(compiled.generation().to_string(), current);
    let mut gw = fake_gateway(&domain, cp.ctl, "gw1").await;
    // Claim to hold a generation nobody compiled, with every section of the current one but
    // GROUPS: the control plane sends a delta carrying GROUPS only.
    let held: Vec<(u64, [u8; 32])> = compiled
        .section_versions()
        .into_iter()
        .map(|(ty, v)| {
            (
                ty,
                if ty == section::GROUPS {
                    section_version(b"x")
                } else {
                    v
                },
            )
        })
        .collect();
    gw.send(&hello("gw1", Some(Generation([7; 32])), held))
        .await;
    let (first, _) = gw.next().await.unwrap();
    let Frame::Push(Push {
        nonce: 1,
        generation,
        body: PushBody::Delta { base, upserts, .. },
    }) = first
    else {
        panic!("expected a delta with nonce 1, got {first:?}");
    };
    assert_eq!(base, Generation([7; 32]));
    assert_eq!(generation.to_string(), current);
    assert_eq!(
        upserts.iter().map(|s| s.ty).collect::<Vec<_>>(),
        vec![section::GROUPS],
        "held sections are not resent"
    );
    gw.send(&Frame::Nack {
        nonce: 1,
        generation,
        code: NackCode::BaseMismatch,
        rejections: vec![],
    })
    .await;
    let (second, _) = gw.next().await.unwrap();
    let Frame::Push(Push {
        nonce: 2,
        generation: g2,
        body: PushBody::Snapshot(bytes),
    }) = second
    else {
        panic!("expected a snapshot with nonce 2, got {second:?}");
    };
    let table = Table::decode(bytes).expect("a valid table");
    assert_eq!(table.generation(), g2);
    assert_eq!(g2.to_string(), current);
    gw.send(&Frame::Ack {
        nonce: 2,
        generation: g2,
    })
    .await;
    tokio::task::block_in_place(|| cp.wait_in_sync(&["gw1"], Duration::from_secs(10)));

    // A gateway that holds the current generation gets an empty delta confirming it.
    let mut again = fake_gateway(&domain, cp.ctl, "gw2").await;
    again
        .send(&hello("gw2", Some(g2), table.section_versions()))
        .await;
    let (confirm, _) = again.next().await.unwrap();
    assert!(
        matches!(&confirm, Frame::Push(Push { body: PushBody::Delta { base, upserts, removes }, generation, .. })
            if *base == g2 && *generation == g2 && upserts.is_empty() && removes.is_empty()),
        "{confirm:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_out_of_order_frames_close_with_their_codes() {
    let domain = Domain::new("ctl-bad", CONFIG);
    let cp = domain.control_plane(None);

    // An unknown frame type below 0x20.
    let mut gw = fake_gateway(&domain, cp.ctl, "gw1").await;
    gw.send(&hello("gw1", None, vec![])).await;
    let _ = gw.next().await.unwrap();
    gw.send_raw(&[0x1f, 0x00]).await;
    assert_eq!(
        gw.closed_with().await,
        Some(CloseCode::ProtocolViolation.code().into())
    );

    // A frame announcing more than its limit, before its bytes are sent.
    let mut gw = fake_gateway(&domain, cp.ctl, "gw1").await;
    gw.send(&hello("gw1", None, vec![])).await;
    gw.send_raw(&[0x03, 0x80, 0x01, 0x00, 0x01]).await; // ACK of 65,537 bytes
    assert_eq!(
        gw.closed_with().await,
        Some(CloseCode::FrameTooLarge.code().into())
    );

    // An ACK for a push that was never sent.
    let mut gw = fake_gateway(&domain, cp.ctl, "gw1").await;
    gw.send(&hello("gw1", None, vec![])).await;
    let _ = gw.next().await.unwrap();
    gw.send(&Frame::Ack {
        nonce: 9,
        generation: Generation([1; 32]),
    })
    .await;
    assert_eq!(
        gw.closed_with().await,
        Some(CloseCode::UnexpectedFrame.code().into())
    );

    // A HELLO naming another gateway than the certificate.
    let mut gw = fake_gateway(&domain, cp.ctl, "gw1").await;
    gw.send(&hello("gw2", None, vec![])).await;
    assert_eq!(
        gw.closed_with().await,
        Some(CloseCode::IdentityMismatch.code().into())
    );

    // A PUSH from a gateway.
    let mut gw = fake_gateway(&domain, cp.ctl, "gw1").await;
    gw.send(&hello("gw1", None, vec![])).await;
    let _ = gw.next().await.unwrap();
    gw.send(&Frame::Push(Push {
        nonce: 1,
        generation: Generation([1; 32]),
        body: PushBody::Snapshot(b"x"),
    }))
    .await;
    assert_eq!(
        gw.closed_with().await,
        Some(CloseCode::UnexpectedFrame.code().into())
    );

    // Nothing at all: the HELLO timeout.
    let gw = fake_gateway(&domain, cp.ctl, "gw1").await;
    assert_eq!(
        gw.closed_with().await,
        Some(CloseCode::Timeout.code().into())
    );

    // The control plane still serves well-behaved gateways.
    let mut gw = fake_gateway(&domain, cp.ctl, "gw2").await;
    gw.send(&hello("gw2", None, vec![])).await;
    assert!(matches!(gw.next().await.unwrap().0, Frame::Push(_)));
}

/// A fake control plane: accepts one gateway session at a time on `endpoint`.
async fn accept_gateway(endpoint: &quinn::Endpoint) -> (Peer, Hello) {
    let conn = tokio::time::timeout(Duration::from_secs(20), async {
        endpoint
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("handshake")
    })
    .await
    .expect("the gateway connects");
    let (send, recv) = conn.accept_bi().await.expect("session stream");
    let mut peer = Peer {
        conn,
        send,
        recv,
        buf: Vec::new(),
        _endpoint: endpoint.clone(),
    };
    let (frame, _) = peer.next().await.expect("HELLO");
    let Frame::Hello(hello) = frame else {
        panic!("first frame {frame:?}");
    };
    (peer, hello)
}

fn table(domain: &str, groups: &[&str]) -> Table {
    Table::new(TableParts {
        domain: domain.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        ..TableParts::default()
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_rejects_bad_pushes_and_keeps_its_table() {
    let domain = Domain::new("ctl-gw", CONFIG);
    let creds = credentials(&domain, &SpiffeId::control(DOMAIN).unwrap());
    let verifier = SpiffeVerifier::new(
        &[domain.pki.ca.cert_der()],
        &[PrincipalKind::Gateway],
        &[DOMAIN],
    )
    .unwrap();
    let crypto = dmsc_identity::server_config(
        dmsc_protocol::ALPN_CONTROL,
        creds,
        Arc::new(verifier),
        Resumption::Off,
    )
    .unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let ctl = endpoint.local_addr().unwrap();
    let good = table(DOMAIN, &["a"]);
    let next = table(DOMAIN, &["a", "b"]);
    let fake = tokio::spawn({
        let (endpoint, good, next) = (endpoint.clone(), good.clone(), next.clone());
        async move {
            let (mut cp, hello) = accept_gateway(&endpoint).await;
            assert_eq!(hello.gateway_id, "gw1");
            assert_eq!(hello.held, None, "a fresh gateway holds nothing");
            let push = |nonce, generation, body| {
                Frame::Push(Push {
                    nonce,
                    generation,
                    body,
                })
            };
            let answer = |frame: Frame<'static>| match frame {
                Frame::Ack { nonce, generation } => (nonce, generation, None),
                Frame::Nack {
                    nonce,
                    generation,
                    code,
                    ..
                } => (nonce, generation, Some(code)),
                other => panic!("expected an answer, got {other:?}"),
            };
            cp.send(&push(
                1,
                good.generation(),
                PushBody::Snapshot(good.encoded()),
            ))
            .await;
            assert_eq!(
                answer(cp.answer().await.unwrap()),
                (1, good.generation(), None)
            );

            // A delta against a base the gateway does not hold.
            let (upserts, removes) = diff(&good.section_versions(), &next);
            let wrong = PushBody::Delta {
                base: Generation([9; 32]),
                upserts: upserts.clone(),
                removes: removes.clone(),
            };
            cp.send(&push(2, next.generation(), wrong)).await;
            assert_eq!(
                answer(cp.answer().await.unwrap()),
                (2, next.generation(), Some(NackCode::BaseMismatch))
            );
            // A table for another trust domain.
            let other = table("other.local", &[]);
            cp.send(&push(
                3,
                other.generation(),
                PushBody::Snapshot(other.encoded()),
            ))
            .await;
            assert_eq!(
                answer(cp.answer().await.unwrap()),
                (3, other.generation(), Some(NackCode::WrongDomain))
            );
            // A table that is not the generation announced.
            cp.send(&push(
                4,
                Generation([1; 32]),
                PushBody::Snapshot(next.encoded()),
            ))
            .await;
            assert_eq!(
                answer(cp.answer().await.unwrap()),
                (4, Generation([1; 32]), Some(NackCode::GenerationMismatch))
            );
            // A section that does not decode.
            let broken = PushBody::Delta {
                base: good.generation(),
                upserts: vec![SectionRef {
                    ty: section::GROUPS,
                    body: b"\x05",
                }],
                removes: vec![],
            };
            cp.send(&push(5, next.generation(), broken)).await;
            assert_eq!(
                answer(cp.answer().await.unwrap()),
                (5, next.generation(), Some(NackCode::Invalid))
            );
            // A good delta.
            cp.send(&push(
                6,
                next.generation(),
                PushBody::Delta {
                    base: good.generation(),
                    upserts,
                    removes,
                },
            ))
            .await;
            assert_eq!(
                answer(cp.answer().await.unwrap()),
                (6, next.generation(), None)
            );
            // Garbage: the gateway closes with PROTOCOL_VIOLATION and comes back holding `next`.
            cp.send_raw(&[0x1f, 0x00]).await;
            assert_eq!(
                cp.closed_with().await,
                Some(CloseCode::ProtocolViolation.code().into())
            );
            let (cp, hello) = accept_gateway(&endpoint).await;
            assert_eq!(
                hello.held,
                Some(next.generation()),
                "the HELLO after a reconnect names what it serves"
            );
            assert_eq!(hello.sections, next.section_versions());
            cp
        }
    });
    let (_gateway, addrs) =
        tokio::task::block_in_place(|| domain.gateway("gw1", ctl, &[], Duration::from_secs(20)));
    let addrs = addrs.expect("the gateway starts on the first pushed table");
    assert_eq!(addrs.table, good.generation().to_string());
    let _session = fake.await.expect("the fake control plane saw every answer");
    let metrics = http(addrs.admin, "GET", "/metrics");
    assert_eq!(
        metrics
            .matches(&format!("generation=\"{}\"", next.generation()))
            .count(),
        2,
        "both workers serve the last good table: {metrics}"
    );
    assert!(
        metrics.contains("dmsc_control_answers_total{result=\"nack\"} 4"),
        "{metrics}"
    );
    let saved = std::fs::read(domain.dir.0.join("gw1").join(dmsc_dataplane::SAVED_TABLE)).unwrap();
    assert_eq!(saved, next.encoded(), "the last good table is saved");
}
