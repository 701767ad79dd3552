//! `Agent::serve_connection`: an attached SDK agent serves requests arriving on a connection a
//! caller opened to it directly, with its own handlers, as it serves the gateway's streams.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dmsc_identity::{Credentials, PrincipalKind, Resumption, SpiffeVerifier};
use dmsc_protocol::header::{RequestHeader, ResponseHeader, TraceContext};
use dmsc_protocol::limits::MAX_HEADER_BYTES;
use dmsc_protocol::Status;
use dmsc_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_serves_a_direct_connection_with_its_handlers() {
    let pki = Pki::new();
    let gw = gateway(&pki, 1, |_| {});
    let agent = attach(&pki, gw.local_addr(), "target", &["echo"]).await;

    // The agent's own listener (the application opens it; the SDK serves what arrives).
    let me = pki.agent("target");
    let verifier =
        |kind| Arc::new(SpiffeVerifier::new(&[pki.ca.cert_der()], &[kind], &[DOMAIN]).unwrap());
    let server = dmsc_identity::server_config(
        dmsc_protocol::ALPN_AGENT,
        Credentials {
            cert_chain: me.cert_chain(),
            private_key: me.private_key(),
        },
        verifier(PrincipalKind::Agent),
        Resumption::Off,
    )
    .unwrap();
    let listener = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(server)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = agent.clone();
    tokio::spawn(async move {
        while let Some(incoming) = listener.accept().await {
            if let Ok(connection) = incoming.await {
                let agent = serving.clone();
                tokio::spawn(async move { agent.serve_connection(connection).await });
            }
        }
    });

    let caller = pki.agent("caller");
    let client = dmsc_identity::client_config(
        dmsc_protocol::ALPN_AGENT,
        Credentials {
            cert_chain: caller.cert_chain(),
            private_key: caller.private_key(),
        },
        verifier(PrincipalKind::Agent),
        Resumption::Off,
    )
    .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(client)));
    let conn = endpoint.connect(addr, "localhost").unwrap().await.unwrap();

    let call = |capability: &'static str, body: &'static [u8]| {
        let conn = conn.clone();
        async move {
            let mut raw = Vec::new();
            RequestHeader {
                capability,
                deadline_ms: 5000,
                hop_count: 0,
                trace: TraceContext::default(),
                content_type: "",
                caller: "",
                target_session: 0,
                on_behalf_of: "",
                via: "",
            }
            .encode(&mut raw)
            .unwrap();
            raw.extend_from_slice(body);
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&raw).await.unwrap();
            send.finish().unwrap();
            let all = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 20))
                .await
                .expect("answered")
                .unwrap();
            let (header, used) = ResponseHeader::decode(&all, MAX_HEADER_BYTES)
                .unwrap()
                .unwrap();
            (header.status, Bytes::copy_from_slice(&all[used..]))
        }
    };
    assert_eq!(
        call("echo", b"straight to you").await,
        (Status::Ok, Bytes::from_static(b"straight to you"))
    );
    // A capability the agent has no handler for: answered as through the gateway.
    assert_eq!(call("nothing", b"").await.0, Status::NoRoute);
}
