//! TLS for agent connections and trunks: the gateway's certificate; client verification that
//! demands a certificate chaining to the domain CA with the SPIFFE ID of an agent of this trust
//! domain (on the agents' sockets) or of a gateway (on the trunk sockets); and the client side of
//! trunks to other gateways.
//!
//! The checks themselves, the refusal counters and the rate-limited refusal log are
//! [`dmsc_identity::SpiffeVerifier`]'s.

use std::sync::Arc;

use dmsc_identity::{Credentials, PrincipalKind, Resumption, SpiffeVerifier};
use quinn_proto::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the gateway's TLS configuration could not be built: no usable trust anchor, an invalid
/// trust domain, or a certificate and key rustls refuses.
pub use dmsc_identity::TlsError;

/// Builds the QUIC server crypto configuration for ALPN `dmsc/1`: the gateway presents `chain`
/// and accepts only agents of `trust_domain` whose certificates chain to `anchors`. Returns the
/// verifier too, whose refusal counters the admin endpoint exports.
pub fn server_crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    anchors: Vec<CertificateDer<'static>>,
    trust_domain: &str,
) -> Result<(QuicServerConfig, Arc<SpiffeVerifier>), TlsError> {
    let verifier = Arc::new(SpiffeVerifier::new(
        &anchors,
        &[PrincipalKind::Agent],
        &[trust_domain],
    )?);
    let credentials = Credentials {
        cert_chain: chain,
        private_key: key,
    };
    // Agents connect rarely and stay: resumption would save little, while issuing tickets costs
    // every handshake and rustls's default session cache is one lock shared by all workers.
    let config = dmsc_identity::server_config(
        dmsc_protocol::ALPN_AGENT,
        credentials,
        verifier.clone(),
        Resumption::Off,
    )?;
    Ok((config, verifier))
}

/// The SPIFFE ID of a connection's verified peer, as text.
pub fn peer_spiffe_id(conn: &quinn_proto::Connection) -> Option<String> {
    let identity = conn.crypto_session().peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let id = dmsc_identity::spiffe_id_from_cert(certs.first()?).ok()?;
    Some(id.as_str().to_owned())
}

/// The QUIC server crypto configuration of the trunk sockets (ALPN `dmsc-peer/1`): the gateway
/// presents `chain` and accepts only gateways of `trust_domain` (which of them is checked
/// against the installed table once connected).
pub fn peer_server_crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    anchors: Vec<CertificateDer<'static>>,
    trust_domain: &str,
) -> Result<QuicServerConfig, TlsError> {
    let (credentials, verifier) = trunk_identity(chain, key, &anchors, trust_domain)?;
    dmsc_identity::server_config(
        dmsc_protocol::ALPN_PEER,
        credentials,
        verifier,
        Resumption::Off,
    )
}

/// What both ends of a trunk present and accept: the gateway's own certificate, and gateways
/// of `trust_domain` only.
fn trunk_identity(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    anchors: &[CertificateDer<'static>],
    trust_domain: &str,
) -> Result<(Credentials, Arc<SpiffeVerifier>), TlsError> {
    let verifier = SpiffeVerifier::new(anchors, &[PrincipalKind::Gateway], &[trust_domain])?;
    let credentials = Credentials {
        cert_chain: chain,
        private_key: key,
    };
    Ok((credentials, Arc::new(verifier)))
}

/// How often a trunk's client side sends a keep-alive.
pub const TRUNK_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_millis(500);
/// Silence after which a trunk's client side counts its peer gone.
pub const TRUNK_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The client side of trunks (`dmsc-peer/1`): presents `chain` (the gateway's own
/// `spiffe://<domain>/gateway/<id>` certificate) and accepts only gateways of `trust_domain`
/// (which one is checked against the routes once connected). The peer may open no streams on
/// this connection. A trunk sends a keep-alive every [`TRUNK_KEEP_ALIVE`] and counts its peer
/// dead after [`TRUNK_IDLE_TIMEOUT`] of silence, so a gateway that dies without closing is
/// unavailable from its peers within that time.
pub fn trunk_client(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    anchors: Vec<CertificateDer<'static>>,
    trust_domain: &str,
    mut transport: quinn_proto::TransportConfig,
) -> Result<quinn_proto::ClientConfig, TlsError> {
    let (credentials, verifier) = trunk_identity(chain, key, &anchors, trust_domain)?;
    let crypto = dmsc_identity::client_config(
        dmsc_protocol::ALPN_PEER,
        credentials,
        verifier,
        Resumption::Off,
    )?;
    transport.max_concurrent_bidi_streams(quinn_proto::VarInt::from_u32(0));
    transport.keep_alive_interval(Some(TRUNK_KEEP_ALIVE));
    transport.max_idle_timeout(quinn_proto::IdleTimeout::try_from(TRUNK_IDLE_TIMEOUT).ok());
    let mut client = quinn_proto::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport));
    Ok(client)
}
