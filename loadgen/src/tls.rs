//! TLS and QUIC configurations: the callers' client configuration, and the server
//! configuration of the agents' direct listeners.
//!
//! Peers are authenticated as DMSC does it (docs/PROTOCOL.md, section 2.4): by chain to the
//! domain CA and by the SPIFFE ID in the certificate, never by DNS name. A caller expects a
//! gateway (`spiffe://<domain>/gateway/<id>`) in gateway mode and an agent
//! (`spiffe://<domain>/agent/<name>`) in direct mode; a direct listener requires a client
//! certificate chaining to the CA, like the gateway does.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use dmsc_protocol::identity::store::{load_cert_chain, load_private_key, load_trust_anchors};
use dmsc_protocol::identity::{spiffe_id_from_cert, Principal};
use dmsc_protocol::ALPN_AGENT;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Server name given to quinn; the verifiers ignore it.
pub const SERVER_NAME: &str = "dmsc";
/// QUIC keep-alive interval, so connections idle between `compare` rounds stay up.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// QUIC idle timeout.
const IDLE_TIMEOUT_MS: u32 = 30_000;
/// Concurrent request streams a direct listener allows per connection (the gateway's default
/// `max_streams_per_connection`).
const DIRECT_MAX_STREAMS: u32 = 1024;

/// A certificate chain, its key and the trust anchors, loaded from PEM files.
#[derive(Debug)]
pub struct Credentials {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's key.
    pub key: PrivateKeyDer<'static>,
    /// The domain CA(s).
    pub anchors: Vec<CertificateDer<'static>>,
}

impl Credentials {
    /// Loads the three files.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> anyhow::Result<Credentials> {
        Ok(Credentials {
            chain: load_cert_chain(cert)?,
            key: load_private_key(key)?,
            anchors: load_trust_anchors(ca)?,
        })
    }

    /// The trust domain of the leaf's SPIFFE ID.
    fn trust_domain(&self) -> anyhow::Result<String> {
        let leaf = self.chain.first().context("empty certificate chain")?;
        let id = spiffe_id_from_cert(leaf.as_ref())
            .map_err(|e| anyhow!("the certificate has no usable SPIFFE ID: {e}"))?;
        if !matches!(id.principal(), Principal::Agent(_)) {
            anyhow::bail!(
                "the certificate names {id}, not an agent (spiffe://<domain>/agent/<name>)"
            );
        }
        Ok(id.trust_domain().to_owned())
    }
}

/// Which kind of peer a client connection must reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// A gateway of the caller's trust domain.
    Gateway,
    /// An agent of the caller's trust domain (a direct listener).
    Agent,
}

/// Whether the connections of one client configuration resume TLS sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumption {
    /// rustls's default: a connection may resume the session of an earlier one from a ticket
    /// the peer sent it (kept in memory), skipping certificates and signatures.
    Allowed,
    /// Every connection makes a full handshake, as agents attaching for the first time do.
    Off,
}

/// The callers' QUIC client configuration for peers of `kind`.
pub fn client_config(
    creds: &Credentials,
    kind: PeerKind,
    resumption: Resumption,
) -> anyhow::Result<quinn::ClientConfig> {
    let trust_domain = creds.trust_domain()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PeerVerifier::new(&creds.anchors, trust_domain, kind, &provider)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .context("caller certificate and key")?;
    tls.alpn_protocols = vec![ALPN_AGENT.to_vec()];
    if resumption == Resumption::Off {
        tls.resumption = rustls::client::Resumption::disabled();
    }
    let quic = QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = base_transport();
    // Callers serve nothing: one stream of credit keeps the gateway's view of an attached
    // session valid (docs/PROTOCOL.md, 2.5) without inviting work.
    transport.max_concurrent_bidi_streams(1u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The server configuration of an agent's direct listener: the agent's certificate, client
/// certificates required and chained to the CA, ALPN `dmsc/1`.
pub fn direct_server_config(creds: &Credentials) -> anyhow::Result<quinn::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for anchor in &creds.anchors {
        roots.add(anchor.clone())?;
    }
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .context("agent certificate and key")?;
    tls.alpn_protocols = vec![ALPN_AGENT.to_vec()];
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = base_transport();
    transport.max_concurrent_bidi_streams(DIRECT_MAX_STREAMS.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

fn base_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
            IDLE_TIMEOUT_MS,
        ))))
        .max_concurrent_uni_streams(0u32.into());
    t
}

/// Accepts a server certificate that chains to the trust anchors and names a peer of the
/// expected kind in the caller's trust domain.
#[derive(Debug)]
struct PeerVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    kind: PeerKind,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    fn new(
        anchors: &[CertificateDer<'static>],
        trust_domain: String,
        kind: PeerKind,
        provider: &Arc<CryptoProvider>,
    ) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        for anchor in anchors {
            roots.add(anchor.clone())?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            trust_domain,
            kind,
            provider: provider.clone(),
        })
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let refuse = |why: String| rustls::Error::General(why);
        let id = spiffe_id_from_cert(end_entity.as_ref())
            .map_err(|e| refuse(format!("peer certificate has no usable SPIFFE ID: {e}")))?;
        let kind_ok = match self.kind {
            PeerKind::Gateway => matches!(id.principal(), Principal::Gateway(_)),
            PeerKind::Agent => matches!(id.principal(), Principal::Agent(_)),
        };
        if !kind_ok {
            return Err(refuse(format!(
                "peer certificate names {id}, expected a{} {}",
                if self.kind == PeerKind::Agent {
                    "n"
                } else {
                    ""
                },
                if self.kind == PeerKind::Agent {
                    "agent"
                } else {
                    "gateway"
                }
            )));
        }
        if id.trust_domain() != self.trust_domain {
            return Err(refuse(format!(
                "peer certificate is for trust domain {:?}, expected {:?}",
                id.trust_domain(),
                self.trust_domain
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
