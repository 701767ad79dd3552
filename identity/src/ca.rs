//! The development certificate authority: an ECDSA P-256 self-signed root that issues SPIFFE
//! leaf certificates.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use dmsc_protocol::spiffe::{validate_trust_domain, SpiffeId, SCHEME};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::cert::{parse_cert, pem_encode, spiffe_id_from_cert, spiffe_uris, subject_key_id};
use crate::IdentityError;

/// A development certificate authority for one trust domain: an ECDSA P-256 self-signed root
/// with the URI SAN `spiffe://<trust-domain>`, which issues SPIFFE leaf certificates.
///
/// Build one with [`CertificateAuthority::generate`], save [`cert_pem`](Self::cert_pem) and
/// [`key_pem`](Self::key_pem), and load it again with [`CertificateAuthority::from_pem`];
/// certificates issued after loading chain to the original CA certificate.
pub struct CertificateAuthority {
    trust_domain: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key: KeyPair,
    /// The certificate rcgen signs with. After `from_pem` this is a re-signed twin of the
    /// original (same subject, key and key identifier), which is all that issuing depends on.
    signer: rcgen::Certificate,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a new CA for `trust_domain` (CN `DMSC <domain> development CA`).
    pub fn generate(trust_domain: &str) -> Result<Self, IdentityError> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error)?;
        let signer = ca_params(trust_domain)?
            .self_signed(&key)
            .map_err(generate_error)?;
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_owned(),
            cert_der: signer.der().clone(),
            cert_pem: signer.pem(),
            key,
            signer,
        })
    }

    /// Loads a CA written by [`CertificateAuthority::generate`] from its certificate and
    /// PKCS#8 private key in PEM.
    ///
    /// Checks that the certificate is a CA with one `spiffe://<domain>` URI SAN, that the key
    /// matches it, and that it has the subject and key identifier `generate` would give it (so
    /// that newly issued certificates chain to it).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IdentityError> {
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| IdentityError::Certificate(format!("CA certificate PEM: {e}")))?;
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| IdentityError::PrivateKey(format!("CA key: {e}")))?;
        let cert = parse_cert(&cert_der)?;
        if !cert.is_ca() {
            return Err(IdentityError::Certificate(
                "not a CA certificate (basicConstraints CA is not set)".to_owned(),
            ));
        }
        let trust_domain = match spiffe_uris(&cert)?.as_slice() {
            [uri] => uri
                .strip_prefix(SCHEME)
                .filter(|domain| validate_trust_domain(domain).is_ok())
                .ok_or_else(|| {
                    IdentityError::Certificate(format!(
                        "CA URI SAN {uri:?} is not spiffe://<trust-domain>"
                    ))
                })?
                .to_owned(),
            [] => return Err(IdentityError::NoSpiffeId),
            more => return Err(IdentityError::MultipleSpiffeIds { count: more.len() }),
        };
        if cert.public_key().raw != key.public_key_der().as_slice() {
            return Err(IdentityError::PrivateKey(
                "does not match the CA certificate".to_owned(),
            ));
        }
        let signer = ca_params(&trust_domain)?
            .self_signed(&key)
            .map_err(generate_error)?;
        let twin = parse_cert(signer.der())?;
        if twin.subject().as_raw() != cert.subject().as_raw()
            || subject_key_id(&twin) != subject_key_id(&cert)
        {
            return Err(IdentityError::Certificate(format!(
                "CA certificate was not made by this tool (expected subject {:?} and an \
                 rcgen key identifier)",
                ca_common_name(&trust_domain)
            )));
        }
        Ok(CertificateAuthority {
            trust_domain,
            cert_pem: pem_encode(&cert_der),
            cert_der: cert_der.into_owned(),
            key,
            signer,
        })
    }

    /// The trust domain this CA issues identities for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA private key in PEM (PKCS#8).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The CA certificate in DER, e.g. as a trust anchor.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// Issues a leaf certificate and fresh ECDSA P-256 key for `id`.
    ///
    /// The leaf carries `id` as its URI SAN plus the given DNS names (strings that parse as IP
    /// addresses, such as `127.0.0.1` or `::1`, become IP SANs), extended key usages serverAuth
    /// and clientAuth, and no basicConstraints (an end entity). Refuses an `id` of another trust domain.
    pub fn issue(
        &self,
        id: &SpiffeId,
        dns_names: &[&str],
    ) -> Result<IssuedIdentity, IdentityError> {
        if id.trust_domain() != self.trust_domain {
            return Err(IdentityError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                found: id.trust_domain().to_owned(),
            });
        }
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "DMSC");
        name.push(DnType::CommonName, id.as_str());
        params.distinguished_name = name;
        params.subject_alt_names.push(uri_san(id.as_str())?);
        for dns in dns_names {
            params.subject_alt_names.push(host_san(dns)?);
        }
        // No basicConstraints extension at all: an explicit `cA FALSE` is not valid DER (a
        // DEFAULT value must be omitted) and strict parsers reject it.
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error)?;
        let cert = params
            .signed_by(&key, &self.signer, &self.key)
            .map_err(generate_error)?;
        Ok(IssuedIdentity {
            id: id.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Checks that a DER certificate was issued by this CA (issuer name and signature) and is
    /// not a CA itself, and returns its SPIFFE ID, which must be in this CA's trust domain.
    pub fn verify_issued(&self, der: &[u8]) -> Result<SpiffeId, IdentityError> {
        let ca = parse_cert(&self.cert_der)?;
        let leaf = parse_cert(der)?;
        if leaf.issuer().as_raw() != ca.subject().as_raw() {
            return Err(IdentityError::Certificate(
                "issuer is not this CA".to_owned(),
            ));
        }
        leaf.verify_signature(Some(ca.public_key()))
            .map_err(|e| IdentityError::Certificate(format!("not signed by this CA: {e}")))?;
        if leaf.is_ca() {
            return Err(IdentityError::Certificate(
                "is a CA certificate, expected a leaf".to_owned(),
            ));
        }
        let id = spiffe_id_from_cert(der)?;
        if id.trust_domain() != self.trust_domain {
            return Err(IdentityError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                found: id.trust_domain().to_owned(),
            });
        }
        Ok(id)
    }
}

/// A leaf certificate and its private key, as issued by [`CertificateAuthority::issue`].
#[derive(Clone)]
pub struct IssuedIdentity {
    /// The SPIFFE ID in the certificate.
    pub id: SpiffeId,
    /// The leaf certificate in PEM.
    pub cert_pem: String,
    /// The leaf private key in PEM (PKCS#8).
    pub key_pem: String,
}

impl fmt::Debug for IssuedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedIdentity")
            .field("id", &self.id)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl IssuedIdentity {
    /// The certificate chain to present: the leaf alone (peers hold the CA as trust anchor).
    ///
    /// Certificates `cert_pem` cannot be decoded into are skipped; for values made by
    /// [`CertificateAuthority::issue`] this is exactly one certificate.
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .filter_map(Result::ok)
            .collect()
    }

    /// The private key, for a rustls configuration.
    ///
    /// If `key_pem` has been replaced by something that is not a PKCS#8 key, the result is an
    /// empty key that rustls will refuse; values made by [`CertificateAuthority::issue`] always
    /// decode.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        match PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()) {
            Ok(key) => key,
            Err(_) => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(Vec::new())),
        }
    }
}

impl CertificateAuthority {
    /// Signs a leaf made from `params` as they are (no SAN or usage added), with a fresh key:
    /// for tests that need certificates `issue` would never make.
    #[cfg(test)]
    pub(crate) fn sign_raw(&self, params: CertificateParams) -> CertificateDer<'static> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        params
            .signed_by(&key, &self.signer, &self.key)
            .unwrap()
            .der()
            .clone()
    }
}

fn ca_common_name(trust_domain: &str) -> String {
    format!("DMSC {trust_domain} development CA")
}

/// The CA's parameters; `from_pem` relies on these being a pure function of the trust domain.
fn ca_params(trust_domain: &str) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, ca_common_name(trust_domain));
    params.distinguished_name = name;
    params
        .subject_alt_names
        .push(uri_san(&format!("{SCHEME}{trust_domain}"))?);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

pub(crate) fn uri_san(uri: &str) -> Result<SanType, IdentityError> {
    Ia5String::try_from(uri)
        .map(SanType::URI)
        .map_err(|e| IdentityError::Generate(format!("URI SAN {uri:?}: {e}")))
}

fn host_san(name: &str) -> Result<SanType, IdentityError> {
    if let Ok(ip) = IpAddr::from_str(name) {
        return Ok(SanType::IpAddress(ip));
    }
    DnsName::try_from(name).map_err(|_| IdentityError::InvalidDnsName(name.to_owned()))?;
    Ia5String::try_from(name)
        .map(SanType::DnsName)
        .map_err(|_| IdentityError::InvalidDnsName(name.to_owned()))
}

fn generate_error(error: rcgen::Error) -> IdentityError {
    IdentityError::Generate(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_and_read_back() {
        let ca = CertificateAuthority::generate("dmsc.local").unwrap();
        let id = SpiffeId::agent("dmsc.local", "weather").unwrap();
        let issued = ca.issue(&id, &["localhost", "127.0.0.1", "::1"]).unwrap();
        let chain = issued.cert_chain();
        assert_eq!(chain.len(), 1);
        assert_eq!(spiffe_id_from_cert(&chain[0]).unwrap(), id);
        assert_eq!(ca.verify_issued(&chain[0]).unwrap(), id);
        assert!(matches!(issued.private_key(), PrivateKeyDer::Pkcs8(_)));
        let other = SpiffeId::agent("other.domain", "weather").unwrap();
        assert!(matches!(
            ca.issue(&other, &[]),
            Err(IdentityError::WrongTrustDomain { .. })
        ));
        assert!(matches!(
            ca.issue(&id, &["bad name"]),
            Err(IdentityError::InvalidDnsName(_))
        ));
        let stranger = CertificateAuthority::generate("dmsc.local").unwrap();
        assert!(stranger.verify_issued(&chain[0]).is_err());
    }

    /// Verifies `leaf` as a client certificate and as a server certificate for `server_name`,
    /// with rustls' webpki verifiers trusting only `ca_der`.
    fn webpki_verify(
        ca_der: &CertificateDer<'static>,
        leaf: &CertificateDer<'static>,
        server_name: &str,
    ) -> Result<(), rustls::Error> {
        use std::sync::Arc;

        use rustls::client::danger::ServerCertVerifier;
        use rustls::client::WebPkiServerVerifier;
        use rustls::server::WebPkiClientVerifier;
        use rustls_pki_types::{ServerName, UnixTime};

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der.clone())?;
        let roots = Arc::new(roots);
        let now = UnixTime::now();
        let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        client.verify_client_cert(leaf, &[], now)?;
        let server = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        server.verify_server_cert(leaf, &[], &name, &[], now)?;
        Ok(())
    }

    #[test]
    fn issued_leaves_verify_with_webpki() {
        let ca = CertificateAuthority::generate("dmsc.local").unwrap();
        let gateway = SpiffeId::gateway("dmsc.local", "gw1").unwrap();
        let leaf = ca
            .issue(&gateway, &["localhost", "127.0.0.1", "::1"])
            .unwrap();
        let leaf_der = leaf.cert_chain().remove(0);
        for name in ["localhost", "127.0.0.1", "::1"] {
            webpki_verify(&ca.cert_der(), &leaf_der, name).unwrap();
        }
        assert!(webpki_verify(&ca.cert_der(), &leaf_der, "example.com").is_err());
        let stranger = CertificateAuthority::generate("dmsc.local").unwrap();
        assert!(webpki_verify(&stranger.cert_der(), &leaf_der, "localhost").is_err());
    }

    #[test]
    fn leaves_issued_after_from_pem_verify_against_the_original_ca() {
        let original = CertificateAuthority::generate("dmsc.local").unwrap();
        let original_der = original.cert_der();
        let loaded =
            CertificateAuthority::from_pem(&original.cert_pem(), &original.key_pem()).unwrap();
        drop(original);
        let id = SpiffeId::agent("dmsc.local", "weather").unwrap();
        let leaf = loaded.issue(&id, &["localhost"]).unwrap();
        let leaf_der = leaf.cert_chain().remove(0);
        webpki_verify(&original_der, &leaf_der, "localhost").unwrap();
        assert_eq!(spiffe_id_from_cert(&leaf_der).unwrap(), id);
    }

    #[test]
    fn from_pem_round_trip_and_mismatches() {
        let ca = CertificateAuthority::generate("dmsc.local").unwrap();
        let loaded = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.trust_domain(), "dmsc.local");
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        let other = CertificateAuthority::generate("dmsc.local").unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem(&ca.cert_pem(), &other.key_pem()),
            Err(IdentityError::PrivateKey(_))
        ));
        assert!(CertificateAuthority::from_pem("garbage", &ca.key_pem()).is_err());
        assert!(CertificateAuthority::from_pem(&ca.cert_pem(), "garbage").is_err());
        // A leaf is not a CA.
        let leaf = ca
            .issue(&SpiffeId::control("dmsc.local").unwrap(), &[])
            .unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem),
            Err(IdentityError::Certificate(_))
        ));
    }
}
