//! The crate's error types: [`IdentityError`] for certificates, keys and files, [`TlsError`] for
//! building TLS configurations.

use std::path::PathBuf;

use dmsc_protocol::spiffe::SpiffeIdError;
use thiserror::Error;

/// Why an identity operation (issuing, parsing, loading or storing a certificate) failed.
#[derive(Debug, Error)]
pub enum IdentityError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file could not be decoded.
    #[error("{path}: invalid PEM: {message}")]
    Pem {
        /// The file involved.
        path: PathBuf,
        /// What the PEM decoder objected to.
        message: String,
    },
    /// A PEM file holds no certificate.
    #[error("{path}: no certificate found")]
    NoCertificate {
        /// The file involved.
        path: PathBuf,
    },
    /// A PEM file holds no private key.
    #[error("{path}: no private key found")]
    NoPrivateKey {
        /// The file involved.
        path: PathBuf,
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
    /// A SPIFFE ID, trust domain or principal name is not valid.
    #[error(transparent)]
    Spiffe(#[from] SpiffeIdError),
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

/// Why a TLS configuration or a [`SpiffeVerifier`](crate::SpiffeVerifier) could not be built.
///
/// These are configuration errors, found before any connection is made.
#[derive(Debug, Error)]
pub enum TlsError {
    /// No trust anchor was given, so no peer could ever be accepted.
    #[error("no trust anchor given")]
    NoTrustAnchor,
    /// A trust anchor is not a certificate rustls can use.
    #[error("trust anchor rejected: {0}")]
    TrustAnchor(#[source] rustls::Error),
    /// The verifier was given no kind of principal to accept.
    #[error("no kind of principal to accept")]
    NoAcceptedKind,
    /// The verifier was given no trust domain to accept.
    #[error("no trust domain to accept")]
    NoTrustDomain,
    /// An accepted trust domain is not a valid trust domain name.
    #[error("accepted trust domain: {0}")]
    TrustDomain(#[source] SpiffeIdError),
    /// rustls could not build the chain verifier for client certificates.
    #[error("client certificate verifier: {0}")]
    ChainVerifier(String),
    /// The endpoint's own certificate chain or private key was refused (for example a key that
    /// does not match the certificate).
    #[error("own certificate and key: {0}")]
    Credentials(#[source] rustls::Error),
    /// rustls refused the configuration itself (protocol versions of the crypto provider).
    #[error("TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    /// The TLS configuration cannot be used for QUIC (no TLS 1.3 initial cipher suite).
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(String),
}
