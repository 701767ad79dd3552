//! TLS for agent connections: the gateway's certificate, and client verification that
//! demands a certificate chaining to the domain CA with a SPIFFE ID of this trust domain.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use dmsc_protocol::identity::{spiffe_id_from_cert, Principal};

/// Builds the QUIC server crypto configuration for ALPN `dmsc/1`.
pub fn server_crypto(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    anchors: Vec<CertificateDer<'static>>,
    trust_domain: &str,
) -> anyhow::Result<quinn_proto::crypto::rustls::QuicServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for anchor in anchors {
        roots
            .add(anchor)
            .map_err(|e| anyhow::anyhow!("trust anchor rejected: {e}"))?;
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("client verifier: {e}"))?;
    let verifier = Arc::new(SpiffeClientVerifier {
        inner,
        trust_domain: trust_domain.to_owned(),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| anyhow::anyhow!("gateway certificate/key: {e}"))?;
    tls.alpn_protocols = vec![dmsc_protocol::ALPN_AGENT.to_vec()];
    tls.max_early_data_size = 0;
    // Agents connect rarely and stay: resumption would save little, while issuing tickets costs
    // every handshake and rustls's default session cache is one lock shared by all workers.
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(quinn_proto::crypto::rustls::QuicServerConfig::try_from(
        Arc::new(tls),
    )?)
}

/// Accepts client certificates that chain to the domain CA (checked by webpki) *and* carry
/// exactly one SPIFFE ID of this trust domain naming an agent. Anything else fails the
/// handshake, with a log line saying why.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if let Err(e) = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
        {
            tracing::warn!(error = %e, "refused client certificate: does not chain to the domain CA");
            return Err(e);
        }
        match spiffe_id_from_cert(end_entity) {
            Ok(id) if id.trust_domain() != self.trust_domain => {
                tracing::warn!(%id, expected = %self.trust_domain, "refused client certificate: SPIFFE ID of another trust domain");
                Err(rustls::Error::General(
                    "SPIFFE ID of another trust domain".into(),
                ))
            }
            Ok(id) if !matches!(id.principal(), Principal::Agent(_)) => {
                tracing::warn!(%id, "refused client certificate: SPIFFE ID is not an agent");
                Err(rustls::Error::General("SPIFFE ID is not an agent".into()))
            }
            Ok(_) => Ok(ClientCertVerified::assertion()),
            Err(e) => {
                tracing::warn!(error = %e, "refused client certificate: no usable SPIFFE URI SAN");
                Err(rustls::Error::General(format!("no usable SPIFFE ID: {e}")))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// The SPIFFE ID of a connection's verified peer, as text.
pub fn peer_spiffe_id(conn: &quinn_proto::Connection) -> Option<String> {
    let identity = conn.crypto_session().peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let id = spiffe_id_from_cert(certs.first()?).ok()?;
    Some(id.as_str().to_owned())
}
