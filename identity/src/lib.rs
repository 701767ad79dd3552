//! DMSC identities: certificates, the development PKI, and who a TLS peer is.
//!
//! Every DMSC endpoint is identified by the SPIFFE ID in the URI SAN of its certificate
//! (`spiffe://<trust-domain>/agent/<name>`, `.../gateway/<id>`, `.../control`; the ID itself is
//! the pure [`SpiffeId`] of `dmsc-protocol`, re-exported here). This crate holds everything
//! around it that touches certificates, keys, files or TLS:
//!
//! - [`CertificateAuthority`]: a small development CA, an ECDSA P-256 self-signed root that
//!   issues leaf certificates usable for both TLS server and client authentication
//!   ([`IssuedIdentity`]). It exists so a developer can run a domain with mutual TLS without an
//!   outside PKI. Certificates are valid from 1975 to 4096 (rcgen's defaults): nothing here reads
//!   a clock to issue, and rotation is out of scope.
//! - [`DevPki`]: such a CA and its leaves kept in a directory, plus PEM loading
//!   ([`load_cert_chain`], [`load_private_key`], [`load_trust_anchors`]) for the binaries.
//! - [`spiffe_id_from_cert`]: the one SPIFFE ID of a certificate.
//! - [`SpiffeVerifier`]: the one certificate verifier, for clients and servers alike: chain to
//!   the trust anchors, then the kind of principal, then the trust domain, against a set of
//!   accepted kinds and a set of accepted trust domains. It counts refusals by reason and logs
//!   them rate-limited (see its module, [`verifier`]).
//! - [`server_config`] and [`client_config`]: QUIC TLS configurations for one ALPN
//!   (`dmsc/1`, `dmsc-peer/1` or `dmsc-ctl/1`), built around a [`SpiffeVerifier`].
//!
//! What it does not do: production PKI (bring your own, e.g. SPIRE), certificate rotation,
//! revocation lists, or anything about the QUIC transport beyond its TLS configuration. Policy,
//! meaning which agent may call what, is decided elsewhere from the verified [`SpiffeId`].

#![forbid(unsafe_code)]

mod ca;
mod cert;
mod config;
mod error;
mod store;
pub mod verifier;

#[cfg(test)]
mod tests;

pub use ca::{CertificateAuthority, IssuedIdentity};
pub use cert::spiffe_id_from_cert;
pub use config::{client_config, server_config, Credentials, Resumption};
pub use error::{IdentityError, TlsError};
pub use store::{load_cert_chain, load_private_key, load_trust_anchors, DevPki, SERVER_DNS_NAMES};
pub use verifier::{RefusalCounts, RefusalReason, Refused, SpiffeVerifier};

pub use dmsc_protocol::spiffe::{Principal, PrincipalKind, SpiffeId, SpiffeIdError};
