//! The one SPIFFE certificate verifier, for both ends of a handshake.
//!
//! A peer's certificate is accepted in three steps, in this order:
//!
//! 1. **chain**: it chains to one of the trust anchors under the usual X.509 path validation
//!    (webpki: signatures, validity period, basic constraints, and the extended key usage of
//!    its role, clientAuth or serverAuth);
//! 2. **identity**: it carries exactly one `spiffe://` URI SAN, and that is a valid DMSC SPIFFE
//!    ID;
//! 3. **kind, then trust domain**: the ID names a principal of an accepted kind (agent, gateway,
//!    control plane), in one of the accepted trust domains.
//!
//! # Refusals
//!
//! The handshake path is reachable by anyone who can send a packet, so refusals must cost little
//! and must not let a peer flood the logs. Every refusal is counted, by [`RefusalReason`], in
//! atomic counters read with [`SpiffeVerifier::refusals`] (so that a gateway can export them as
//! metrics). Refusals are logged at `warn`, but at most one line per reason every
//! [`REFUSAL_LOG_INTERVAL_SECS`] seconds per verifier; that line says how many refusals of the
//! same reason were suppressed since the previous one. The limiter is two atomics per reason,
//! driven by the time rustls passes to the verifier, and takes no lock.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dmsc_protocol::spiffe::{validate_trust_domain, PrincipalKind, SpiffeId};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls12_signature, verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{spiffe_id_from_cert, IdentityError, TlsError};

/// Shortest time between two log lines for refusals of the same reason, in seconds.
pub const REFUSAL_LOG_INTERVAL_SECS: u64 = 5;

/// Verifies peer certificates by chain and SPIFFE ID, as a rustls [`ClientCertVerifier`] (for
/// servers: client certificates are then mandatory) and as a [`ServerCertVerifier`] (for
/// clients: the server name is ignored, the SPIFFE ID is what authenticates the server).
///
/// It is parameterised by the kinds of principal it accepts (for example only agents, or
/// agents and gateways) and by a set of accepted trust domains (one for a domain's own
/// endpoints; several once domains federate). See the [module docs](self) for the checks, the
/// refusal counters and the rate-limited refusal log.
///
/// Share it as an `Arc`: the same value goes into the rustls configuration and stays with its
/// owner to read [`SpiffeVerifier::refusals`].
pub struct SpiffeVerifier {
    roots: Arc<RootCertStore>,
    /// webpki's client-certificate path validation, with the same roots.
    client_chain: Arc<dyn ClientCertVerifier>,
    algorithms: WebPkiSupportedAlgorithms,
    kinds: Vec<PrincipalKind>,
    trust_domains: Vec<String>,
    refusals: RefusalLog,
}

impl fmt::Debug for SpiffeVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeVerifier")
            .field("trust_anchors", &self.roots.len())
            .field("kinds", &self.kinds)
            .field("trust_domains", &self.trust_domains)
            .field("refusals", &self.refusals())
            .finish()
    }
}

impl SpiffeVerifier {
    /// A verifier accepting certificates that chain to one of `anchors` and name a principal of
    /// one of `kinds` in one of `trust_domains`.
    ///
    /// Fails if `anchors`, `kinds` or `trust_domains` is empty (nothing could ever be accepted),
    /// if an anchor is unusable, or if a trust domain is not a valid name.
    pub fn new(
        anchors: &[CertificateDer<'static>],
        kinds: &[PrincipalKind],
        trust_domains: &[&str],
    ) -> Result<Self, TlsError> {
        Self::with_provider(anchors, kinds, trust_domains, &crate::config::provider())
    }

    /// [`SpiffeVerifier::new`] with the signature algorithms of `provider`.
    pub fn with_provider(
        anchors: &[CertificateDer<'static>],
        kinds: &[PrincipalKind],
        trust_domains: &[&str],
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, TlsError> {
        if anchors.is_empty() {
            return Err(TlsError::NoTrustAnchor);
        }
        if kinds.is_empty() {
            return Err(TlsError::NoAcceptedKind);
        }
        if trust_domains.is_empty() {
            return Err(TlsError::NoTrustDomain);
        }
        let mut roots = RootCertStore::empty();
        for anchor in anchors {
            roots.add(anchor.clone()).map_err(TlsError::TrustAnchor)?;
        }
        let roots = Arc::new(roots);
        let client_chain =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(provider))
                .build()
                .map_err(|e| TlsError::ChainVerifier(e.to_string()))?;
        for domain in trust_domains {
            validate_trust_domain(domain).map_err(TlsError::TrustDomain)?;
        }
        let mut kinds = kinds.to_vec();
        kinds.sort_unstable();
        kinds.dedup();
        Ok(Self {
            roots,
            client_chain,
            algorithms: provider.signature_verification_algorithms,
            kinds,
            trust_domains: trust_domains.iter().map(|d| (*d).to_owned()).collect(),
            refusals: RefusalLog::default(),
        })
    }

    /// The kinds of principal accepted, sorted.
    pub fn kinds(&self) -> &[PrincipalKind] {
        &self.kinds
    }

    /// The trust domains accepted.
    pub fn trust_domains(&self) -> &[String] {
        &self.trust_domains
    }

    /// A snapshot of the refusal counters (each read atomically, not all at one instant).
    pub fn refusals(&self) -> RefusalCounts {
        self.refusals.snapshot()
    }

    /// Checks a client certificate (its chain, for clientAuth) and returns its SPIFFE ID.
    /// Refusals are counted and logged as described in the [module docs](self).
    pub fn verify_client(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, Refused> {
        let chain = self
            .client_chain
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ());
        self.finish(Role::Client, chain, end_entity, now)
    }

    /// Checks a server certificate (its chain, for serverAuth; no server name) and returns its
    /// SPIFFE ID. Refusals are counted and logged as described in the [module docs](self).
    pub fn verify_server(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<SpiffeId, Refused> {
        let chain = ParsedCertificate::try_from(end_entity).and_then(|cert| {
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                &self.roots,
                intermediates,
                now,
                self.algorithms.all,
            )
        });
        self.finish(Role::Server, chain, end_entity, now)
    }

    /// The identity checks after the chain check, and the accounting of a refusal.
    fn finish(
        &self,
        role: Role,
        chain: Result<(), rustls::Error>,
        end_entity: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<SpiffeId, Refused> {
        let result = chain
            .map_err(Refused::Chain)
            .and_then(|()| self.check_identity(end_entity));
        if let Err(refused) = &result {
            self.refusals.record(role, refused, now.as_secs());
        }
        result
    }

    fn check_identity(&self, end_entity: &CertificateDer<'_>) -> Result<SpiffeId, Refused> {
        let id = spiffe_id_from_cert(end_entity).map_err(|e| match e {
            IdentityError::NoSpiffeId => Refused::NoSpiffeId,
            IdentityError::MultipleSpiffeIds { count } => Refused::MultipleSpiffeIds { count },
            other => Refused::InvalidSpiffeId(other.to_string()),
        })?;
        if !self.kinds.contains(&id.kind()) {
            return Err(Refused::WrongKind {
                id,
                accepted: self.kinds.clone(),
            });
        }
        if !self.trust_domains.iter().any(|d| d == id.trust_domain()) {
            return Err(Refused::WrongTrustDomain {
                id,
                accepted: self.trust_domains.clone(),
            });
        }
        Ok(id)
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.client_chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_client(end_entity, intermediates, now)
            .map(|_| ClientCertVerified::assertion())
            .map_err(rustls::Error::from)
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

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

impl ServerCertVerifier for SpiffeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.verify_server(end_entity, intermediates, now)?;
        tracing::debug!(peer = %id, "server certificate verified");
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

/// Why a [`SpiffeVerifier`] refused a certificate.
///
/// Converted into the rustls error that fails the handshake: [`Refused::Chain`] gives back
/// webpki's own error (so the TLS alert says what it would say without this verifier); the
/// others become `InvalidCertificate(Other(..))` holding this value, which can be downcast.
/// `Debug` prints the same text as `Display`, because rustls shows the `Debug` form of such an
/// error in its handshake error messages.
#[derive(Clone, thiserror::Error)]
pub enum Refused {
    /// The certificate does not chain to an accepted trust anchor, or is otherwise invalid
    /// under X.509 path validation (expired, wrong key usage, malformed).
    #[error("certificate refused: {0}")]
    Chain(rustls::Error),
    /// The certificate carries no `spiffe://` URI SAN.
    #[error("certificate refused: it has no spiffe:// URI SAN")]
    NoSpiffeId,
    /// The certificate carries more than one `spiffe://` URI SAN.
    #[error("certificate refused: it has {count} spiffe:// URI SANs, expected exactly one")]
    MultipleSpiffeIds {
        /// How many it carries.
        count: usize,
    },
    /// The certificate's `spiffe://` URI SAN is not a valid DMSC SPIFFE ID (or the certificate
    /// could not be read for it).
    #[error("certificate refused: {0}")]
    InvalidSpiffeId(String),
    /// The SPIFFE ID names a principal of a kind this verifier does not accept.
    #[error("certificate refused: it names {id}, expected {}", KindList(.accepted))]
    WrongKind {
        /// The certificate's SPIFFE ID.
        id: SpiffeId,
        /// The kinds accepted.
        accepted: Vec<PrincipalKind>,
    },
    /// The SPIFFE ID is of a trust domain this verifier does not accept.
    #[error(
        "certificate refused: it names {id}, of trust domain {:?}, expected one of {accepted:?}",
        .id.trust_domain()
    )]
    WrongTrustDomain {
        /// The certificate's SPIFFE ID.
        id: SpiffeId,
        /// The trust domains accepted.
        accepted: Vec<String>,
    },
}

impl fmt::Debug for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Refused {
    /// The reason, without details: what the refusal counters count.
    pub fn reason(&self) -> RefusalReason {
        match self {
            Refused::Chain(_) => RefusalReason::Chain,
            Refused::NoSpiffeId => RefusalReason::NoSpiffeId,
            Refused::MultipleSpiffeIds { .. } => RefusalReason::MultipleSpiffeIds,
            Refused::InvalidSpiffeId(_) => RefusalReason::InvalidSpiffeId,
            Refused::WrongKind { .. } => RefusalReason::WrongKind,
            Refused::WrongTrustDomain { .. } => RefusalReason::WrongTrustDomain,
        }
    }
}

impl From<Refused> for rustls::Error {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Chain(e) => e,
            other => rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                Arc::new(other),
            ))),
        }
    }
}

/// Why a certificate was refused, as a label: one counter each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// See [`Refused::Chain`].
    Chain,
    /// See [`Refused::NoSpiffeId`].
    NoSpiffeId,
    /// See [`Refused::MultipleSpiffeIds`].
    MultipleSpiffeIds,
    /// See [`Refused::InvalidSpiffeId`].
    InvalidSpiffeId,
    /// See [`Refused::WrongKind`].
    WrongKind,
    /// See [`Refused::WrongTrustDomain`].
    WrongTrustDomain,
}

impl RefusalReason {
    /// Every reason, in declaration order.
    pub const ALL: [RefusalReason; 6] = [
        RefusalReason::Chain,
        RefusalReason::NoSpiffeId,
        RefusalReason::MultipleSpiffeIds,
        RefusalReason::InvalidSpiffeId,
        RefusalReason::WrongKind,
        RefusalReason::WrongTrustDomain,
    ];

    /// A snake_case label, e.g. for a metric: `chain`, `no_spiffe_id`, `multiple_spiffe_ids`,
    /// `invalid_spiffe_id`, `wrong_kind`, `wrong_trust_domain`.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::Chain => "chain",
            RefusalReason::NoSpiffeId => "no_spiffe_id",
            RefusalReason::MultipleSpiffeIds => "multiple_spiffe_ids",
            RefusalReason::InvalidSpiffeId => "invalid_spiffe_id",
            RefusalReason::WrongKind => "wrong_kind",
            RefusalReason::WrongTrustDomain => "wrong_trust_domain",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many certificates a [`SpiffeVerifier`] has refused since it was built, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusalCounts {
    counts: [u64; RefusalReason::ALL.len()],
}

impl RefusalCounts {
    /// Refusals for `reason`.
    pub fn get(&self, reason: RefusalReason) -> u64 {
        self.counts[reason.index()]
    }

    /// Refusals for all reasons together.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Every reason with its count, in [`RefusalReason::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (RefusalReason, u64)> + '_ {
        RefusalReason::ALL.iter().map(|&r| (r, self.get(r)))
    }
}

/// Which end of the handshake the verifier checks: the peer's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The peer is the client (we are a server).
    Client,
    /// The peer is the server (we are a client).
    Server,
}

/// Refusal counters and the per-reason log limiter.
#[derive(Debug, Default)]
struct RefusalLog {
    counts: [AtomicU64; RefusalReason::ALL.len()],
    throttles: [LogThrottle; RefusalReason::ALL.len()],
}

impl RefusalLog {
    fn record(&self, role: Role, refused: &Refused, now_secs: u64) {
        let reason = refused.reason();
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
        let Some(suppressed) = self.throttles[reason.index()].admit(now_secs) else {
            return;
        };
        match role {
            Role::Client => tracing::warn!(
                reason = reason.as_str(),
                suppressed,
                error = %refused,
                "refused a client certificate"
            ),
            Role::Server => tracing::warn!(
                reason = reason.as_str(),
                suppressed,
                error = %refused,
                "refused a server certificate"
            ),
        }
    }

    fn snapshot(&self) -> RefusalCounts {
        RefusalCounts {
            counts: std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed)),
        }
    }
}

/// At most one log line per [`REFUSAL_LOG_INTERVAL_SECS`]; counts the lines it suppresses.
#[derive(Debug, Default)]
struct LogThrottle {
    /// Unix time in seconds from which the next line may be written.
    next_at: AtomicU64,
    /// Lines suppressed since the last one written.
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// Whether to write a line now: `Some(suppressed since the last line)`, or `None` (and the
    /// line is counted as suppressed).
    fn admit(&self, now_secs: u64) -> Option<u64> {
        let next_at = self.next_at.load(Ordering::Relaxed);
        // A clock that jumped back by more than an interval must not silence the log for as
        // long as it jumped.
        let due =
            now_secs >= next_at || next_at > now_secs.saturating_add(REFUSAL_LOG_INTERVAL_SECS);
        // Of concurrent callers, only the one that moves `next_at` writes the line.
        if due
            && self
                .next_at
                .compare_exchange(
                    next_at,
                    now_secs.saturating_add(REFUSAL_LOG_INTERVAL_SECS),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Formats a list of kinds as `an agent`, `an agent or a gateway`, ...
struct KindList<'a>(&'a [PrincipalKind]);

impl fmt::Display for KindList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, kind) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" or ")?;
            }
            f.write_str(match kind {
                PrincipalKind::Agent => "an agent",
                PrincipalKind::Gateway => "a gateway",
                PrincipalKind::Control => "the control plane",
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_admits_one_line_per_interval_and_counts_the_rest() {
        let throttle = LogThrottle::default();
        let t0 = 1_700_000_000;
        assert_eq!(throttle.admit(t0), Some(0));
        for _ in 0..10 {
            assert_eq!(throttle.admit(t0 + 1), None);
        }
        assert_eq!(throttle.admit(t0 + REFUSAL_LOG_INTERVAL_SECS - 1), None);
        // The next line reports the eleven it suppressed.
        assert_eq!(throttle.admit(t0 + REFUSAL_LOG_INTERVAL_SECS), Some(11));
        assert_eq!(throttle.admit(t0 + REFUSAL_LOG_INTERVAL_SECS), None);
        // A clock that jumps far back does not silence the log.
        assert_eq!(throttle.admit(t0 - 3600), Some(1));
    }

    #[test]
    fn reasons_are_limited_separately() {
        let log = RefusalLog::default();
        let t0 = 1_700_000_000;
        for _ in 0..3 {
            log.record(Role::Client, &Refused::NoSpiffeId, t0);
            log.record(Role::Client, &Refused::MultipleSpiffeIds { count: 2 }, t0);
        }
        // One line each so far; two of each suppressed.
        for reason in [RefusalReason::NoSpiffeId, RefusalReason::MultipleSpiffeIds] {
            let throttle = &log.throttles[reason.index()];
            assert_eq!(throttle.suppressed.load(Ordering::Relaxed), 2);
        }
        let counts = log.snapshot();
        assert_eq!(counts.get(RefusalReason::NoSpiffeId), 3);
        assert_eq!(counts.get(RefusalReason::MultipleSpiffeIds), 3);
        assert_eq!(counts.total(), 6);
    }

    #[test]
    fn reason_labels_are_distinct() {
        let mut labels: Vec<_> = RefusalReason::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), RefusalReason::ALL.len());
        for (i, reason) in RefusalReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i);
        }
    }
}
