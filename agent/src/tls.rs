//! TLS and QUIC client configuration.
//!
//! The agent authenticates the gateway by its SPIFFE identity, not by DNS name: the gateway's
//! certificate must chain to the configured trust anchors and carry exactly one URI SAN
//! `spiffe://<our trust domain>/gateway/<id>` (checked by [`SpiffeVerifier`]). The server name
//! given to quinn is a fixed placeholder ([`SERVER_NAME`]) that the verifier ignores.

use std::sync::Arc;

use dmsc_identity::{
    spiffe_id_from_cert, Credentials, PrincipalKind, Resumption, SpiffeId, SpiffeVerifier, TlsError,
};
use dmsc_protocol::ALPN_AGENT;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::AgentError;

/// The server name passed to quinn; the verifier ignores it.
pub(crate) const SERVER_NAME: &str = "dmsc-gateway";
/// Builds the quinn client configuration for `dmsc/1` (TLS only: the transport settings are
/// `connect::transport_config`'s), and returns it with the agent's own identity (read from its
/// leaf certificate).
pub(crate) fn client_config(
    cert_chain: Vec<CertificateDer<'static>>,
    private_key: PrivateKeyDer<'static>,
    trust_anchors: &[CertificateDer<'static>],
) -> Result<(quinn::ClientConfig, SpiffeId), AgentError> {
    let leaf = cert_chain
        .first()
        .ok_or_else(|| AgentError::Config("cert_chain is empty".into()))?;
    let identity = spiffe_id_from_cert(leaf.as_ref()).map_err(|e| {
        AgentError::Config(format!("the agent certificate has no usable identity: {e}"))
    })?;
    if identity.kind() != PrincipalKind::Agent {
        return Err(AgentError::Config(format!(
            "the agent certificate names {identity}, not an agent (spiffe://<domain>/agent/<name>)"
        )));
    }
    let verifier = SpiffeVerifier::new(
        trust_anchors,
        &[PrincipalKind::Gateway],
        &[identity.trust_domain()],
    )
    .map_err(tls_error)?;
    let credentials = Credentials {
        cert_chain,
        private_key,
    };
    let quic = dmsc_identity::client_config(
        ALPN_AGENT,
        credentials,
        Arc::new(verifier),
        Resumption::Allowed,
    )
    .map_err(tls_error)?;
    Ok((quinn::ClientConfig::new(Arc::new(quic)), identity))
}

/// rustls's own refusals (a key that does not match the certificate, an unusable trust anchor)
/// keep their type; the rest are configuration errors.
fn tls_error(error: TlsError) -> AgentError {
    match error {
        TlsError::TrustAnchor(e) | TlsError::Credentials(e) | TlsError::Config(e) => {
            AgentError::Tls(e)
        }
        TlsError::NoTrustAnchor => AgentError::Config("no usable trust anchor".into()),
        other => AgentError::Config(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use dmsc_identity::CertificateAuthority;

    use super::*;

    #[test]
    fn the_client_config_requires_an_agent_certificate() {
        let ca = CertificateAuthority::generate("test.local").unwrap();
        let gw = ca
            .issue(
                &SpiffeId::gateway("test.local", "g1").unwrap(),
                &["localhost"],
            )
            .unwrap();
        let err = client_config(gw.cert_chain(), gw.private_key(), &[ca.cert_der()]).unwrap_err();
        assert!(err.to_string().contains("not an agent"), "{err}");
        let agent = ca
            .issue(&SpiffeId::agent("test.local", "a").unwrap(), &[])
            .unwrap();
        let (_, id) =
            client_config(agent.cert_chain(), agent.private_key(), &[ca.cert_der()]).unwrap();
        assert_eq!(id.as_str(), "spiffe://test.local/agent/a");
        let err = client_config(agent.cert_chain(), agent.private_key(), &[]).unwrap_err();
        assert!(err.to_string().contains("trust anchor"), "{err}");
    }
}
