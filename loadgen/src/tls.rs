//! TLS and QUIC configurations: the callers' client configuration, and the server
//! configuration of the agents' direct listeners.
//!
//! Peers are authenticated as DMSC does it (docs/PROTOCOL.md, section 2.4): by chain to the
//! domain CA and by the SPIFFE ID in the certificate, never by DNS name. A caller expects a
//! gateway (`spiffe://<domain>/gateway/<id>`) in gateway mode and an agent
//! (`spiffe://<domain>/agent/<name>`) in direct mode; a direct listener requires a client
//! certificate of an agent of its domain, like the gateway does. The checks are
//! [`dmsc_identity::SpiffeVerifier`]'s.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use dmsc_identity::{
    load_cert_chain, load_private_key, load_trust_anchors, spiffe_id_from_cert, PrincipalKind,
    SpiffeVerifier,
};
use dmsc_protocol::ALPN_AGENT;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub use dmsc_identity::Resumption;

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

    /// The trust domain of the leaf's SPIFFE ID, which must name an agent.
    fn trust_domain(&self) -> anyhow::Result<String> {
        let leaf = self.chain.first().context("empty certificate chain")?;
        let id = spiffe_id_from_cert(leaf.as_ref())
            .map_err(|e| anyhow!("the certificate has no usable SPIFFE ID: {e}"))?;
        if id.kind() != PrincipalKind::Agent {
            anyhow::bail!(
                "the certificate names {id}, not an agent (spiffe://<domain>/agent/<name>)"
            );
        }
        Ok(id.trust_domain().to_owned())
    }

    /// A verifier accepting peers of `kinds` in the leaf's trust domain.
    fn verifier(&self, kinds: &[PrincipalKind]) -> anyhow::Result<Arc<SpiffeVerifier>> {
        let trust_domain = self.trust_domain()?;
        Ok(Arc::new(SpiffeVerifier::new(
            &self.anchors,
            kinds,
            &[trust_domain.as_str()],
        )?))
    }

    /// The certificate and key, as TLS configurations take them.
    pub fn identity(&self) -> dmsc_identity::Credentials {
        dmsc_identity::Credentials {
            cert_chain: self.chain.clone(),
            private_key: self.key.clone_key(),
        }
    }
}

/// The callers' QUIC client configuration for peers of `kind` (a gateway, or an agent's direct
/// listener) of the caller's trust domain.
pub fn client_config(
    creds: &Credentials,
    kind: PrincipalKind,
    resumption: Resumption,
) -> anyhow::Result<quinn::ClientConfig> {
    let quic = dmsc_identity::client_config(
        ALPN_AGENT,
        creds.identity(),
        creds.verifier(&[kind])?,
        resumption,
    )
    .context("caller TLS configuration")?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    let mut transport = base_transport();
    // Callers serve nothing: one stream of credit keeps the gateway's view of an attached
    // session valid (docs/PROTOCOL.md, 2.5) without inviting work.
    transport.max_concurrent_bidi_streams(1u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The server configuration of an agent's direct listener: the agent's certificate, client
/// certificates required, chained to the CA and naming an agent (the callers) of the agent's
/// trust domain, as the gateway requires; ALPN `dmsc/1`.
pub fn direct_server_config(creds: &Credentials) -> anyhow::Result<quinn::ServerConfig> {
    let quic = dmsc_identity::server_config(
        ALPN_AGENT,
        creds.identity(),
        creds.verifier(&[PrincipalKind::Agent])?,
        Resumption::Allowed,
    )
    .context("direct listener TLS configuration")?;
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
    // The same acknowledgement frequency request as the SDK's agents make (and the gateway of
    // its peers), on both routes: the callers ask it of the gateway and of the agents' direct
    // listeners, and those listeners of the callers.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(8))
        .max_ack_delay(Some(std::time::Duration::from_millis(1)));
    t.ack_frequency_config(Some(ack));
    t
}
