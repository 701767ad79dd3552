//! TLS configurations for QUIC, one per side: a server that requires client certificates, and a
//! client that presents one. Both authenticate the peer with a [`SpiffeVerifier`] and speak TLS
//! 1.3 only (QUIC requires it) with ring's cryptography.

use std::sync::Arc;

use quinn_proto::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{SpiffeVerifier, TlsError};

/// What an endpoint presents in a handshake: its certificate chain and private key.
#[derive(Debug)]
pub struct Credentials {
    /// Certificate chain, leaf first; the leaf carries the endpoint's SPIFFE ID.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub private_key: PrivateKeyDer<'static>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self {
            cert_chain: self.cert_chain.clone(),
            private_key: self.private_key.clone_key(),
        }
    }
}

/// Whether connections may resume earlier TLS sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumption {
    /// rustls's defaults: a server issues session tickets and keeps a session cache; a client
    /// keeps the tickets it receives (in memory) and offers them on later connections.
    Allowed,
    /// Every connection makes a full handshake: a server issues no tickets and keeps no cache
    /// (which also spares it the cache's lock); a client offers no ticket.
    Off,
}

/// A QUIC server configuration for ALPN `alpn`: presents `credentials`, requires a client
/// certificate and accepts it only if `verifier` does. 0-RTT is never accepted.
pub fn server_config(
    alpn: &[u8],
    credentials: Credentials,
    verifier: Arc<SpiffeVerifier>,
    resumption: Resumption,
) -> Result<QuicServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(credentials.cert_chain, credentials.private_key)
        .map_err(TlsError::Credentials)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    if resumption == Resumption::Off {
        tls.send_tls13_tickets = 0;
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    }
    QuicServerConfig::try_from(Arc::new(tls)).map_err(|e| TlsError::Quic(e.to_string()))
}

/// A QUIC client configuration for ALPN `alpn`: presents `credentials` when the server asks
/// for a client certificate, and accepts the server only if `verifier` does (the server name
/// given when connecting is not checked; the SPIFFE ID is).
pub fn client_config(
    alpn: &[u8],
    credentials: Credentials,
    verifier: Arc<SpiffeVerifier>,
    resumption: Resumption,
) -> Result<QuicClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(credentials.cert_chain, credentials.private_key)
        .map_err(TlsError::Credentials)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    if resumption == Resumption::Off {
        tls.resumption = rustls::client::Resumption::disabled();
    }
    QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))
}

/// The crypto provider of every configuration and verifier: ring.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}
