#![allow(missing_debug_implementations)]

//! Test harness for the end-to-end tests in `tests/tests/`: an in-memory PKI, a gateway on an
//! ephemeral loopback port, SDK agents, and a raw `dmsc/1` client for the cases the SDK would
//! never produce (malformed headers, misbehaving targets).

pub mod cluster;
pub mod python;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;

use dmsc_agent::{Agent, AgentCard, AgentConfig, HandlerError, Handlers, Request, Response, Skill};
use dmsc_dataplane::{Config, Gateway, GatewayHandle, GatewayIdentity};
use dmsc_identity::{
    CertificateAuthority, Credentials, IssuedIdentity, PrincipalKind, Resumption, SpiffeId,
    SpiffeVerifier,
};
use dmsc_protocol::control::{ControlFrame, FrameBuffer};
use dmsc_protocol::header::ResponseHeader;
use dmsc_protocol::limits::MAX_HEADER_BYTES;
use dmsc_protocol::Status;

/// The trust domain of every test.
pub const DOMAIN: &str = "test.local";

/// A throwaway domain CA.
pub struct Pki {
    /// The CA.
    pub ca: CertificateAuthority,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// A fresh CA for [`DOMAIN`].
    pub fn new() -> Self {
        Self {
            ca: CertificateAuthority::generate(DOMAIN).expect("CA"),
        }
    }

    /// An agent identity `spiffe://test.local/agent/<name>`.
    pub fn agent(&self, name: &str) -> IssuedIdentity {
        let id = SpiffeId::agent(DOMAIN, name).expect("agent id");
        self.ca.issue(&id, &[]).expect("issue agent")
    }

    /// The gateway identity.
    pub fn gateway(&self) -> GatewayIdentity {
        let id = SpiffeId::gateway(DOMAIN, "gw-test").expect("gateway id");
        let issued = self
            .ca
            .issue(&id, &["localhost", "127.0.0.1"])
            .expect("issue gateway");
        GatewayIdentity {
            cert_chain: issued.cert_chain(),
            private_key: issued.private_key(),
            trust_anchors: vec![self.ca.cert_der()],
        }
    }
}

/// Starts a gateway on `127.0.0.1:0` with `workers` workers; `tweak` adjusts the config.
pub fn gateway(pki: &Pki, workers: usize, tweak: impl FnOnce(&mut Config)) -> GatewayHandle {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        workers,
        pin_workers: false,
        domain: DOMAIN.into(),
        gateway_id: "gw-test".into(),
        admin_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    };
    tweak(&mut config);
    Gateway::start(config, pki.gateway()).expect("gateway starts")
}

/// An SDK configuration for agent `name` with `card`.
pub fn agent_config(pki: &Pki, gateway: SocketAddr, name: &str, card: AgentCard) -> AgentConfig {
    let id = pki.agent(name);
    let mut config = AgentConfig::new(
        gateway,
        id.cert_chain(),
        id.private_key(),
        vec![pki.ca.cert_der()],
        card,
    );
    config.reconnect.initial = Duration::from_millis(50);
    config.reconnect.max = Duration::from_millis(500);
    config
}

/// A card offering `capabilities`.
pub fn card(name: &str, capabilities: &[&str]) -> AgentCard {
    capabilities
        .iter()
        .fold(AgentCard::new(name, "test agent", "1.0.0"), |c, cap| {
            c.with_skill(Skill::new(*cap, *cap).with_tags(["test"]))
        })
}

/// Handlers: `echo` returns the payload; `whoami` returns the agent's name; `caller` returns
/// the caller identity the gateway stamped; `sleep` sleeps for the number of milliseconds in
/// the payload, then answers "slept".
pub fn test_handlers(name: &str) -> Handlers {
    let me = Bytes::from(name.to_owned());
    Handlers::new()
        .on("echo", |mut req: Request| async move {
            let payload = req.payload().await?;
            Ok::<_, HandlerError>(Response::ok(payload))
        })
        .on("whoami", move |_req: Request| {
            let me = me.clone();
            async move { Ok::<_, HandlerError>(Response::ok(me)) }
        })
        .on("caller", |req: Request| async move {
            Ok::<_, HandlerError>(Response::ok(Bytes::from(req.caller.clone())))
        })
        .on("sleep", |mut req: Request| async move {
            let body = req.payload().await?;
            let ms: u64 = std::str::from_utf8(&body)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, HandlerError>(Response::ok("slept"))
        })
        .on("fail", |_req: Request| async move {
            Err::<Response, _>(HandlerError::new("this handler always fails"))
        })
}

/// Attaches agent `name` offering `capabilities` with [`test_handlers`].
pub async fn attach(pki: &Pki, gateway: SocketAddr, name: &str, capabilities: &[&str]) -> Agent {
    let config = agent_config(pki, gateway, name, card(name, capabilities));
    Agent::attach(config, test_handlers(name))
        .await
        .expect("agent attaches")
}

/// A `dmsc/1` client speaking the protocol by hand, for the misbehaving cases.
pub struct RawClient {
    /// The connection.
    pub conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl RawClient {
    /// Connects with identity `id`, accepting a gateway of [`DOMAIN`] with a certificate of `ca`.
    pub async fn connect(
        gateway: SocketAddr,
        id: &IssuedIdentity,
        ca: &CertificateAuthority,
    ) -> anyhow::Result<Self> {
        Self::connect_alpn(gateway, id, ca, dmsc_protocol::ALPN_AGENT).await
    }

    /// [`RawClient::connect`] offering ALPN `alpn` (`dmsc-peer/1` to act as a trunk peer).
    pub async fn connect_alpn(
        gateway: SocketAddr,
        id: &IssuedIdentity,
        ca: &CertificateAuthority,
        alpn: &[u8],
    ) -> anyhow::Result<Self> {
        let verifier = SpiffeVerifier::new(&[ca.cert_der()], &[PrincipalKind::Gateway], &[DOMAIN])?;
        let credentials = Credentials {
            cert_chain: id.cert_chain(),
            private_key: id.private_key(),
        };
        let crypto = dmsc_identity::client_config(
            alpn,
            credentials,
            Arc::new(verifier),
            Resumption::Allowed,
        )?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_concurrent_bidi_streams(16u32.into());
        client.transport_config(Arc::new(transport));
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(client);
        let conn = endpoint.connect(gateway, "localhost")?.await?;
        Ok(Self {
            conn,
            _endpoint: endpoint,
        })
    }

    /// Opens the control stream and attaches with `card`; returns the control stream and the
    /// gateway's answer.
    pub async fn attach(
        &self,
        card: &AgentCard,
    ) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream, ControlFrame)> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        let frame = ControlFrame::Attach {
            max_concurrent: 16,
            card: card.to_json(),
        };
        send.write_all(&frame.to_bytes()?).await?;
        let answer = read_frame(&mut recv).await?;
        Ok((send, recv, answer))
    }

    /// Sends `raw` (header and payload bytes as given) on a new stream, finishes it, and reads
    /// the answer: status, message and payload.
    pub async fn request_raw(&self, raw: &[u8]) -> anyhow::Result<(Status, String, Bytes)> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        send.write_all(raw).await?;
        let _ = send.finish();
        let all = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
            .await
            .context("answer timed out")??;
        let Some((header, used)) = ResponseHeader::decode(&all, MAX_HEADER_BYTES)? else {
            bail!("incomplete response header");
        };
        Ok((
            header.status,
            header.message.to_owned(),
            Bytes::copy_from_slice(&all[used..]),
        ))
    }
}

/// Reads one control frame.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> anyhow::Result<ControlFrame> {
    let mut fb = FrameBuffer::new(1 << 20);
    let mut buf = [0u8; 4096];
    loop {
        if let Some(frame) = fb.next_frame()? {
            return Ok(frame);
        }
        let n = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
            .await
            .context("control frame timed out")??
            .ok_or_else(|| anyhow!("control stream ended"))?;
        fb.extend(&buf[..n]);
    }
}

/// Waits until `cond` holds, checking every 20 ms, for at most `timeout`.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// A payload of `len` bytes that no misplaced or dropped chunk can leave unchanged.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

/// `caller` invokes `echo` with a [`pattern`] of each of `sizes` bytes (60 s deadline each), and
/// every answer must be `OK` with the very bytes it sent.
pub async fn assert_echoes_byte_exact(caller: &Agent, sizes: &[usize]) {
    for &len in sizes {
        let body = pattern(len);
        let reply = caller
            .request("echo")
            .deadline(Duration::from_secs(60))
            .send(body.clone())
            .await
            .unwrap_or_else(|e| panic!("{len} bytes: {e}"));
        assert_eq!(reply.status, Status::Ok, "{len} bytes: {}", reply.message);
        assert_eq!(reply.payload.len(), len);
        assert!(reply.payload == body, "{len} bytes differ");
    }
}
