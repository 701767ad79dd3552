//! Identities: SPIFFE IDs carried in mutual-TLS certificates, and the development PKI.
//!
//! Every DMSC endpoint is identified by the SPIFFE ID in the URI SAN of its certificate:
//!
//! * `spiffe://<trust-domain>/agent/<name>` for an agent,
//! * `spiffe://<trust-domain>/gateway/<id>` for a gateway,
//! * `spiffe://<trust-domain>/control` for the control plane.
//!
//! [`SpiffeId`] parses and builds such IDs (the syntax of the SPIFFE ID specification, narrowed to
//! these three shapes); [`spiffe_id_from_cert`] reads the one SPIFFE ID of a peer certificate.
//!
//! [`CertificateAuthority`] is a small development CA: an ECDSA P-256 self-signed root that issues
//! leaf certificates usable for both TLS server and client authentication. It exists so a
//! developer can run a gateway and agents with mutual TLS without any outside PKI; production
//! deployments are expected to bring their own (e.g. SPIRE). Certificates are valid from 1975 to
//! 4096 (rcgen's defaults): this module reads no clock, and rotation is out of scope.
//!
//! [`store`] holds the filesystem helpers the binaries use to load certificates and keys and to
//! keep a development PKI in a directory.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer, PrivatePkcs8KeyDer};
use thiserror::Error;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

pub mod store;

/// Longest SPIFFE ID accepted, in bytes (the SPIFFE ID specification's limit).
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;
/// Longest trust domain name accepted, in bytes (the SPIFFE ID specification's limit).
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;

const SCHEME: &str = "spiffe://";

/// Why an identity operation failed.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file could not be decoded.
    #[error("{path}: invalid PEM: {message}")]
    Pem {
        /// The file involved.
        path: std::path::PathBuf,
        /// What the PEM decoder objected to.
        message: String,
    },
    /// A PEM file holds no certificate.
    #[error("{path}: no certificate found")]
    NoCertificate {
        /// The file involved.
        path: std::path::PathBuf,
    },
    /// A PEM file holds no private key.
    #[error("{path}: no private key found")]
    NoPrivateKey {
        /// The file involved.
        path: std::path::PathBuf,
    },
    /// The certificate carries no `spiffe://` URI SAN.
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    /// The certificate carries more than one `spiffe://` URI SAN.
    #[error("certificate has {count} spiffe:// URI SANs, expected exactly one")]
    MultipleSpiffeIds {
        /// How many it carries.
        count: usize,
    },
    /// A string is not a valid DMSC SPIFFE ID.
    #[error("invalid SPIFFE ID {uri:?}: {reason}")]
    InvalidSpiffeId {
        /// The rejected URI (cut to its first 128 bytes if longer).
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A trust domain name is not valid.
    #[error("invalid trust domain {domain:?}: {reason}")]
    InvalidTrustDomain {
        /// The rejected name (cut to its first 128 bytes if longer).
        domain: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An agent name, gateway id or other path segment is not valid.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// What the name is for (`agent name`, `gateway id`).
        what: &'static str,
        /// The rejected name (cut to its first 128 bytes if longer).
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A DNS name or IP address for a certificate is not valid.
    #[error("invalid DNS name or IP address {0:?}")]
    InvalidDnsName(String),
    /// An identity or CA belongs to another trust domain than expected.
    #[error("wrong trust domain: expected {expected:?}, found {found:?}")]
    WrongTrustDomain {
        /// The trust domain that was required.
        expected: String,
        /// The trust domain that was found.
        found: String,
    },
    /// A certificate could not be parsed, or is not what it should be.
    #[error("certificate: {0}")]
    Certificate(String),
    /// A private key could not be parsed, or does not match its certificate.
    #[error("private key: {0}")]
    PrivateKey(String),
    /// Generating a key or certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

/// The principal a [`SpiffeId`] names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// An agent, by name: `/agent/<name>`.
    Agent(String),
    /// A gateway, by id: `/gateway/<id>`.
    Gateway(String),
    /// The control plane: `/control`.
    Control,
}

/// A validated DMSC SPIFFE ID such as `spiffe://dmsc.local/agent/weather`.
///
/// Holds the URI and its parsed parts; it can only be built through validation, so every value
/// is well-formed. `Display` prints the URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    uri: String,
    trust_domain_len: usize,
    principal: Principal,
}

impl SpiffeId {
    /// Parses a DMSC SPIFFE ID: `spiffe://<trust-domain>` followed by `/agent/<name>`,
    /// `/gateway/<id>` or `/control`.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let invalid = |reason: &str| IdentityError::InvalidSpiffeId {
            uri: truncate(uri, 128).to_owned(),
            reason: reason.to_owned(),
        };
        if uri.len() > MAX_SPIFFE_ID_BYTES {
            return Err(invalid(&format!("longer than {MAX_SPIFFE_ID_BYTES} bytes")));
        }
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| invalid("does not start with spiffe://"))?;
        let (domain, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        if let Some(reason) = trust_domain_problem(domain) {
            return Err(invalid(&format!("trust domain {reason}")));
        }
        if path.is_empty() {
            return Err(invalid(
                "has no path (a bare trust domain names no principal)",
            ));
        }
        // `path` starts with '/'; every segment after it must be valid.
        let segments: Vec<&str> = path[1..].split('/').collect();
        if let Some(reason) = segments.iter().find_map(|s| segment_problem(s)) {
            return Err(invalid(&format!("path segment {reason}")));
        }
        let principal = match segments.as_slice() {
            ["agent", name] => Principal::Agent((*name).to_owned()),
            ["gateway", id] => Principal::Gateway((*id).to_owned()),
            ["control"] => Principal::Control,
            _ => {
                return Err(invalid(
                    "path is not /agent/<name>, /gateway/<id> or /control",
                ))
            }
        };
        Ok(SpiffeId {
            uri: uri.to_owned(),
            trust_domain_len: domain.len(),
            principal,
        })
    }

    /// The ID of agent `name` in trust domain `domain`.
    pub fn agent(domain: &str, name: &str) -> Result<Self, IdentityError> {
        check_name("agent name", name)?;
        Self::build(domain, &format!("/agent/{name}"))
    }

    /// The ID of gateway `id` in trust domain `domain`.
    pub fn gateway(domain: &str, id: &str) -> Result<Self, IdentityError> {
        check_name("gateway id", id)?;
        Self::build(domain, &format!("/gateway/{id}"))
    }

    /// The ID of the control plane of trust domain `domain`.
    pub fn control(domain: &str) -> Result<Self, IdentityError> {
        Self::build(domain, "/control")
    }

    /// The trust domain, e.g. `dmsc.local`.
    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..SCHEME.len() + self.trust_domain_len]
    }

    /// The principal the ID names.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    /// The URI, e.g. `spiffe://dmsc.local/agent/weather`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    fn build(domain: &str, path: &str) -> Result<Self, IdentityError> {
        validate_trust_domain(domain)?;
        Self::parse(&format!("{SCHEME}{domain}{path}"))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Checks a trust domain name: 1 to 255 bytes of lowercase ASCII letters, digits, `.`, `-`, `_`.
pub fn validate_trust_domain(domain: &str) -> Result<(), IdentityError> {
    match trust_domain_problem(domain) {
        None => Ok(()),
        Some(reason) => Err(IdentityError::InvalidTrustDomain {
            domain: truncate(domain, 128).to_owned(),
            reason,
        }),
    }
}

/// Reads the SPIFFE ID of a DER certificate: it must carry exactly one `spiffe://` URI SAN, and
/// that URI must be a valid DMSC SPIFFE ID. Other URI SANs are ignored.
pub fn spiffe_id_from_cert(der: &[u8]) -> Result<SpiffeId, IdentityError> {
    let cert = parse_cert(der)?;
    let uris = spiffe_uris(&cert)?;
    match uris.as_slice() {
        [] => Err(IdentityError::NoSpiffeId),
        [uri] => SpiffeId::parse(uri),
        more => Err(IdentityError::MultipleSpiffeIds { count: more.len() }),
    }
}

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
                .filter(|domain| trust_domain_problem(domain).is_none())
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

// ---------------------------------------------------------------------------------------------

/// Whether `key_pem` is the private key of the certificate `cert_der`.
pub(crate) fn key_matches_cert(cert_der: &[u8], key_pem: &str) -> bool {
    match (parse_cert(cert_der), KeyPair::from_pem(key_pem)) {
        (Ok(cert), Ok(key)) => cert.public_key().raw == key.public_key_der().as_slice(),
        _ => false,
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

fn uri_san(uri: &str) -> Result<SanType, IdentityError> {
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

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(IdentityError::Certificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        ))),
        Err(e) => Err(IdentityError::Certificate(e.to_string())),
    }
}

/// All `spiffe://` URI SANs of a certificate (scheme compared case-insensitively, so that a
/// `SPIFFE://` URI is reported as invalid rather than silently ignored).
fn spiffe_uris<'a>(cert: &X509Certificate<'a>) -> Result<Vec<&'a str>, IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Certificate(format!("subjectAltName: {e}")))?;
    let Some(san) = san else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri)
                if uri
                    .get(..SCHEME.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(SCHEME)) =>
            {
                Some(*uri)
            }
            _ => None,
        })
        .collect())
}

fn subject_key_id<'a>(cert: &'a X509Certificate<'_>) -> Option<&'a [u8]> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
            _ => None,
        })
}

/// PEM-encodes a DER certificate (rcgen's layout: 64-column base64, LF line endings).
fn pem_encode(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            b64.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i)) as usize & 63]
            } else {
                b'='
            });
        }
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.chunks(64) {
        pem.extend(line.iter().map(|&b| char::from(b)));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn trust_domain_problem(domain: &str) -> Option<String> {
    if domain.is_empty() {
        return Some("is empty".to_owned());
    }
    if domain.len() > MAX_TRUST_DOMAIN_BYTES {
        return Some(format!("is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"));
    }
    domain
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
        .map(|c| format!("contains {c:?} (allowed: lowercase letters, digits, '.', '-', '_')"))
}

fn segment_problem(segment: &str) -> Option<String> {
    if segment.is_empty() {
        return Some("is empty".to_owned());
    }
    if segment == "." || segment == ".." {
        return Some(format!("{segment:?} is not allowed"));
    }
    segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        .map(|c| format!("{segment:?} contains {c:?} (allowed: letters, digits, '.', '-', '_')"))
}

fn check_name(what: &'static str, value: &str) -> Result<(), IdentityError> {
    match segment_problem(value) {
        None => Ok(()),
        Some(reason) => Err(IdentityError::InvalidName {
            what,
            value: truncate(value, 128).to_owned(),
            reason,
        }),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(uri in any::<String>()) {
            if let Ok(id) = SpiffeId::parse(&uri) {
                prop_assert_eq!(id.as_str(), uri.as_str());
                prop_assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id);
            }
        }

        #[test]
        fn parse_of_near_valid_ids_never_panics(
            domain in "[a-zA-Z0-9._:@-]{0,12}",
            path in prop::collection::vec("[a-zA-Z0-9._%?#-]{0,8}", 0..4),
        ) {
            let uri = format!("spiffe://{domain}/{}", path.join("/"));
            if let Ok(id) = SpiffeId::parse(&uri) {
                prop_assert_eq!(id.trust_domain(), domain.as_str());
            }
        }

        #[test]
        fn cert_parsing_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
            let _ = spiffe_id_from_cert(&bytes);
        }

        #[test]
        fn corrupted_certs_never_panic(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let der = sample_leaf_der();
            let mut bytes = der.to_vec();
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= value;
            }
            let _ = spiffe_id_from_cert(&bytes);
            let _ = spiffe_id_from_cert(&bytes[..cut.index(bytes.len())]);
        }
    }

    /// One leaf certificate, generated once for the corruption property test.
    fn sample_leaf_der() -> &'static CertificateDer<'static> {
        static LEAF: std::sync::OnceLock<CertificateDer<'static>> = std::sync::OnceLock::new();
        LEAF.get_or_init(|| {
            let ca = CertificateAuthority::generate("dmsc.local").unwrap();
            let id = SpiffeId::gateway("dmsc.local", "gw").unwrap();
            ca.issue(&id, &["localhost", "::1"])
                .unwrap()
                .cert_chain()
                .remove(0)
        })
    }

    #[test]
    fn parses_the_three_shapes() {
        let agent = SpiffeId::parse("spiffe://dmsc.local/agent/weather").unwrap();
        assert_eq!(agent.trust_domain(), "dmsc.local");
        assert_eq!(agent.principal(), &Principal::Agent("weather".into()));
        assert_eq!(agent.to_string(), "spiffe://dmsc.local/agent/weather");
        let gw = SpiffeId::gateway("prod_1", "gw-01").unwrap();
        assert_eq!(gw.as_str(), "spiffe://prod_1/gateway/gw-01");
        assert_eq!(gw.principal(), &Principal::Gateway("gw-01".into()));
        let control = SpiffeId::control("dmsc.local").unwrap();
        assert_eq!(control.principal(), &Principal::Control);
        assert_eq!(control.as_str(), "spiffe://dmsc.local/control");
    }

    #[test]
    fn rejects_bad_ids() {
        for bad in [
            "",
            "http://dmsc.local/agent/a",
            "spiffe://",
            "spiffe://dmsc.local",
            "spiffe://dmsc.local/",
            "spiffe://DMSC.local/agent/a",
            "spiffe://dmsc.local:8443/agent/a",
            "spiffe://user@dmsc.local/agent/a",
            "spiffe://dmsc.local/agent/",
            "spiffe://dmsc.local/agent/a/b",
            "spiffe://dmsc.local/agent//a",
            "spiffe://dmsc.local/agent/..",
            "spiffe://dmsc.local/agent/.",
            "spiffe://dmsc.local/agent/a%20b",
            "spiffe://dmsc.local/agent/a?x=1",
            "spiffe://dmsc.local/agent/a#f",
            "spiffe://dmsc.local/control/",
            "spiffe://dmsc.local/other/a",
            "spiffe://dmsc.local/agent/ä",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("spiffe://d/agent/{}", "a".repeat(2048));
        assert!(SpiffeId::parse(&long).is_err());
        let long_domain = format!("spiffe://{}/control", "d".repeat(256));
        assert!(SpiffeId::parse(&long_domain).is_err());
        assert!(matches!(
            SpiffeId::agent("dmsc.local", "../x"),
            Err(IdentityError::InvalidName { .. })
        ));
        assert!(matches!(
            SpiffeId::control("Upper"),
            Err(IdentityError::InvalidTrustDomain { .. })
        ));
    }

    #[test]
    fn pem_encoding_round_trips() {
        for len in 0..10 {
            let der: Vec<u8> = (0..len * 31).map(|i| (i * 7) as u8).collect();
            let pem = pem_encode(&der);
            let back = CertificateDer::from_pem_slice(pem.as_bytes());
            if der.is_empty() {
                continue;
            }
            assert_eq!(back.unwrap().as_ref(), der.as_slice());
        }
    }

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
        // The CA certificate itself names a trust domain, not a principal.
        assert!(matches!(
            spiffe_id_from_cert(&ca.cert_der()),
            Err(IdentityError::InvalidSpiffeId { .. })
        ));
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

    #[test]
    fn cert_parse_errors_are_typed() {
        assert!(matches!(
            spiffe_id_from_cert(b"not a certificate"),
            Err(IdentityError::Certificate(_))
        ));
        // A certificate without any URI SAN.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let plain = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(matches!(
            spiffe_id_from_cert(plain.der()),
            Err(IdentityError::NoSpiffeId)
        ));
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            uri_san("spiffe://d/agent/a").unwrap(),
            uri_san("spiffe://d/agent/b").unwrap(),
            uri_san("https://example.com/").unwrap(),
        ];
        let two = params.self_signed(&key).unwrap();
        assert!(matches!(
            spiffe_id_from_cert(two.der()),
            Err(IdentityError::MultipleSpiffeIds { count: 2 })
        ));
        let mut der = two.der().to_vec();
        der.push(0);
        assert!(matches!(
            spiffe_id_from_cert(&der),
            Err(IdentityError::Certificate(_))
        ));
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
