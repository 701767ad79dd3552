//! TLS for agent connections: the gateway's certificate, and client verification that demands
//! a certificate chaining to the domain CA with the SPIFFE ID of an agent of this trust domain.
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
