//! TLS and QUIC client configuration.
//!
//! The agent authenticates the gateway by its SPIFFE identity, not by DNS name: the gateway's
//! certificate must chain to the configured trust anchors and carry exactly one URI SAN
//! `spiffe://<our trust domain>/gateway/<id>`. The server name given to quinn is a fixed
//! placeholder ([`SERVER_NAME`]) that the verifier ignores.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use dmsc_protocol::identity::{spiffe_id_from_cert, IdentityError, Principal, SpiffeId};
use dmsc_protocol::ALPN_AGENT;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::AgentError;

/// The server name passed to quinn; the verifier ignores it.
pub(crate) const SERVER_NAME: &str = "dmsc-gateway";
/// Interval of QUIC keep-alive pings.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// QUIC idle timeout, in milliseconds.
const IDLE_TIMEOUT_MS: u32 = 30_000;

/// Builds the quinn client configuration for `dmsc/1`, and returns it with the agent's own
/// identity (read from its leaf certificate).
pub(crate) fn client_config(
    cert_chain: Vec<CertificateDer<'static>>,
    private_key: PrivateKeyDer<'static>,
    trust_anchors: &[CertificateDer<'static>],
    max_concurrent: u32,
) -> Result<(quinn::ClientConfig, SpiffeId), AgentError> {
    let leaf = cert_chain
        .first()
        .ok_or_else(|| AgentError::Config("cert_chain is empty".into()))?;
    let identity = spiffe_id_from_cert(leaf.as_ref()).map_err(|e| {
        AgentError::Config(format!("the agent certificate has no usable identity: {e}"))
    })?;
    if !matches!(identity.principal(), Principal::Agent(_)) {
        return Err(AgentError::Config(format!(
            "the agent certificate names {identity}, not an agent (spiffe://<domain>/agent/<name>)"
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = GatewayVerifier::new(
        trust_anchors,
        identity.trust_domain(),
        provider.signature_verification_algorithms,
    )?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert_chain, private_key)?;
    tls.alpn_protocols = vec![ALPN_AGENT.to_vec()];
    let quic = QuicClientConfig::try_from(tls)
        .map_err(|e| AgentError::Config(format!("TLS configuration unusable for QUIC: {e}")))?;

    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
            IDLE_TIMEOUT_MS,
        ))))
        // Twice the concurrency limit in stream credit: the gateway enforces `max_concurrent`
        // itself, and a finished stream's credit only returns once its FIN is acknowledged and
        // MAX_STREAMS has arrived; without the headroom a target at its limit would see spurious
        // OVERLOADED answers in that window.
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(max_concurrent.saturating_mul(2)))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    Ok((config, identity))
}

/// Accepts a server certificate when it chains to the trust anchors and names a gateway of
/// the agent's trust domain.
#[derive(Debug)]
pub(crate) struct GatewayVerifier {
    roots: Arc<RootCertStore>,
    trust_domain: String,
    algorithms: WebPkiSupportedAlgorithms,
}

/// Why a gateway certificate that chains correctly was still refused.
#[derive(thiserror::Error)]
enum PeerIdentityError {
    /// The certificate's SPIFFE ID could not be read.
    #[error("gateway certificate identity: {0}")]
    Spiffe(#[from] IdentityError),
    /// The certificate names something other than a gateway.
    #[error("the server certificate names {0}, not a gateway")]
    NotAGateway(String),
    /// The certificate names a gateway of another trust domain.
    #[error("the gateway certificate is for trust domain {found:?}, expected {expected:?}")]
    WrongTrustDomain {
        /// Our trust domain.
        expected: String,
        /// The certificate's.
        found: String,
    },
}

// rustls shows the `Debug` form of a custom certificate error in its messages (which is what
// the handshake error says); make that the readable text.
impl fmt::Debug for PeerIdentityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl GatewayVerifier {
    /// A verifier for gateways of `trust_domain` whose certificates chain to `anchors`.
    pub(crate) fn new(
        anchors: &[CertificateDer<'static>],
        trust_domain: &str,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Result<Self, AgentError> {
        let mut roots = RootCertStore::empty();
        for anchor in anchors {
            roots.add(anchor.clone())?;
        }
        if roots.is_empty() {
            return Err(AgentError::Config("no usable trust anchor".into()));
        }
        Ok(Self {
            roots: Arc::new(roots),
            trust_domain: trust_domain.to_owned(),
            algorithms,
        })
    }

    /// The gateway's identity, if its certificate is acceptable.
    pub(crate) fn verify_gateway(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let refuse = |e: PeerIdentityError| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        };
        let id = spiffe_id_from_cert(end_entity.as_ref()).map_err(|e| refuse(e.into()))?;
        if !matches!(id.principal(), Principal::Gateway(_)) {
            return Err(refuse(PeerIdentityError::NotAGateway(id.to_string())));
        }
        if id.trust_domain() != self.trust_domain {
            return Err(refuse(PeerIdentityError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                found: id.trust_domain().to_owned(),
            }));
        }
        Ok(id)
    }
}

impl ServerCertVerifier for GatewayVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.verify_gateway(end_entity, intermediates, now)?;
        tracing::debug!(gateway = %id, "gateway certificate verified");
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use dmsc_protocol::identity::CertificateAuthority;

    use super::*;

    fn verifier(ca: &CertificateAuthority) -> GatewayVerifier {
        GatewayVerifier::new(
            &[ca.cert_der()],
            "test.local",
            rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
        .unwrap()
    }

    fn leaf(ca: &CertificateAuthority, id: &SpiffeId) -> CertificateDer<'static> {
        ca.issue(id, &["localhost"]).unwrap().cert_chain().remove(0)
    }

    #[test]
    fn a_gateway_of_our_domain_is_accepted() {
        let ca = CertificateAuthority::generate("test.local").unwrap();
        let cert = leaf(&ca, &SpiffeId::gateway("test.local", "g1").unwrap());
        let id = verifier(&ca)
            .verify_gateway(&cert, &[], UnixTime::now())
            .unwrap();
        assert_eq!(id.as_str(), "spiffe://test.local/gateway/g1");
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused() {
        let ca = CertificateAuthority::generate("test.local").unwrap();
        let other = CertificateAuthority::generate("test.local").unwrap();
        let cert = leaf(&other, &SpiffeId::gateway("test.local", "g1").unwrap());
        let err = verifier(&ca)
            .verify_gateway(&cert, &[], UnixTime::now())
            .unwrap_err();
        // Same subject name as our CA (same trust domain), other key: a bad signature.
        assert!(
            matches!(
                err,
                rustls::Error::InvalidCertificate(
                    CertificateError::BadSignature | CertificateError::UnknownIssuer
                )
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_certificate_that_does_not_name_a_gateway_is_refused() {
        let ca = CertificateAuthority::generate("test.local").unwrap();
        for id in [
            SpiffeId::agent("test.local", "mallory").unwrap(),
            SpiffeId::control("test.local").unwrap(),
        ] {
            let err = verifier(&ca)
                .verify_gateway(&leaf(&ca, &id), &[], UnixTime::now())
                .unwrap_err();
            assert!(err.to_string().contains("not a gateway"), "{err}");
        }
    }

    #[test]
    fn a_gateway_of_another_trust_domain_is_refused() {
        // The same CA key signs for another domain only if it was generated for it, so build a
        // CA for the other domain and trust it too: the chain is fine, the identity is not.
        let ours = CertificateAuthority::generate("test.local").unwrap();
        let theirs = CertificateAuthority::generate("other.local").unwrap();
        let v = GatewayVerifier::new(
            &[ours.cert_der(), theirs.cert_der()],
            "test.local",
            rustls::crypto::ring::default_provider().signature_verification_algorithms,
        )
        .unwrap();
        let cert = leaf(&theirs, &SpiffeId::gateway("other.local", "g1").unwrap());
        let err = v.verify_gateway(&cert, &[], UnixTime::now()).unwrap_err();
        assert!(err.to_string().contains("trust domain"), "{err}");
    }

    #[test]
    fn the_client_config_requires_an_agent_certificate() {
        let ca = CertificateAuthority::generate("test.local").unwrap();
        let gw = ca
            .issue(
                &SpiffeId::gateway("test.local", "g1").unwrap(),
                &["localhost"],
            )
            .unwrap();
        let err =
            client_config(gw.cert_chain(), gw.private_key(), &[ca.cert_der()], 8).unwrap_err();
        assert!(err.to_string().contains("not an agent"), "{err}");
        let agent = ca
            .issue(&SpiffeId::agent("test.local", "a").unwrap(), &[])
            .unwrap();
        let (_, id) =
            client_config(agent.cert_chain(), agent.private_key(), &[ca.cert_der()], 8).unwrap();
        assert_eq!(id.as_str(), "spiffe://test.local/agent/a");
    }
}
