//! Agent configuration and the reconnect backoff.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use dmsc_identity::{load_cert_chain, load_private_key, load_trust_anchors, IdentityError};
use dmsc_protocol::card::AgentCard;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::AgentError;

/// Default for [`AgentConfig::max_concurrent`].
pub const DEFAULT_MAX_CONCURRENT: u32 = 256;
/// Default for [`AgentConfig::request_timeout`].
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`AgentConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`AgentConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Shortest [`AgentConfig::idle_timeout`] accepted (the gateway's lower bound too).
const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default for [`AgentConfig::max_response_bytes`] and [`AgentConfig::max_request_bytes`]:
/// 64 MiB + 1, so a payload of exactly 64 MiB fits.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024 * 1024 + 1;

/// Everything an agent needs to attach to a gateway.
///
/// Build it with [`AgentConfig::new`] (credentials in memory) or [`AgentConfig::from_files`]
/// (PEM files), then adjust the public fields.
pub struct AgentConfig {
    /// The gateway's QUIC address.
    pub gateway: SocketAddr,
    /// The agent's certificate chain, leaf first. The leaf carries the agent's identity as a
    /// URI SAN `spiffe://<trust-domain>/agent/<name>`.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The private key of the leaf certificate.
    pub private_key: PrivateKeyDer<'static>,
    /// The trust anchors (the domain CA) the gateway's certificate must chain to.
    pub trust_anchors: Vec<CertificateDer<'static>>,
    /// The A2A agent card to attach with; its skill ids are the capabilities the agent serves.
    pub card: AgentCard,
    /// Most invocations the agent serves at once through each gateway worker, that is on each
    /// of its connections (primary and lanes), enforced as QUIC's limit on gateway-opened
    /// streams and announced in `ATTACH`. At least 1; default 256.
    pub max_concurrent: u32,
    /// Whether to open per-core lane connections when the gateway offers them. Default true.
    pub lanes: bool,
    /// How long to wait between reconnection attempts.
    pub reconnect: Backoff,
    /// The deadline of invocations that set none; also the idle timeout of streamed body reads
    /// and writes, and the bound on `discover`, `update_card` and `detach`. Default 30 s.
    pub request_timeout: Duration,
    /// Bound on one QUIC handshake plus the attach (or lane) exchange. Default 5 s.
    pub connect_timeout: Duration,
    /// The QUIC idle timeout the agent advertises (`max_idle_timeout`); at least 1 s, default
    /// 30 s. A connection closes after this long without traffic; the gateway's own value
    /// applies when it is lower. The SDK sends keep-alive pings every third of this, at most
    /// every 5 s: set it to at most the gateway's `limits.idle_timeout_ms` when that is below
    /// 15 s, since QUIC gives the agent no way to learn the gateway's value.
    pub idle_timeout: Duration,
    /// Largest answer payload the read-to-end helpers ([`Agent::invoke`](crate::Agent::invoke),
    /// [`RequestBuilder::send`](crate::RequestBuilder::send)) accept. Default 64 MiB + 1.
    pub max_response_bytes: usize,
    /// Largest request payload [`Request::payload`](crate::Request::payload) buffers for a
    /// handler. Default 64 MiB + 1.
    pub max_request_bytes: usize,
}

impl AgentConfig {
    /// A configuration with in-memory credentials and every other setting at its default.
    pub fn new(
        gateway: SocketAddr,
        cert_chain: Vec<CertificateDer<'static>>,
        private_key: PrivateKeyDer<'static>,
        trust_anchors: Vec<CertificateDer<'static>>,
        card: AgentCard,
    ) -> Self {
        Self {
            gateway,
            cert_chain,
            private_key,
            trust_anchors,
            card,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            lanes: true,
            reconnect: Backoff::default(),
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_BODY_BYTES,
            max_request_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }

    /// A configuration whose certificate chain, private key and trust anchors are read from
    /// PEM files.
    pub fn from_files(
        gateway: SocketAddr,
        cert: &Path,
        key: &Path,
        ca: &Path,
        card: AgentCard,
    ) -> Result<Self, AgentError> {
        fn fail<'a>(
            what: &'static str,
            path: &'a Path,
        ) -> impl FnOnce(IdentityError) -> AgentError + 'a {
            move |e| AgentError::Credentials {
                what,
                path: path.to_owned(),
                reason: e.to_string(),
            }
        }
        let cert_chain = load_cert_chain(cert).map_err(fail("certificate chain", cert))?;
        let private_key = load_private_key(key).map_err(fail("private key", key))?;
        let trust_anchors = load_trust_anchors(ca).map_err(fail("trust anchors", ca))?;
        Ok(Self::new(
            gateway,
            cert_chain,
            private_key,
            trust_anchors,
            card,
        ))
    }

    /// Checks the settings that need no I/O.
    pub(crate) fn validate(&self) -> Result<(), AgentError> {
        if self.cert_chain.is_empty() {
            return Err(AgentError::Config("cert_chain is empty".into()));
        }
        if self.trust_anchors.is_empty() {
            return Err(AgentError::Config("trust_anchors is empty".into()));
        }
        if self.max_concurrent == 0 {
            return Err(AgentError::Config(
                "max_concurrent must be at least 1".into(),
            ));
        }
        for (name, value) in [
            ("request_timeout", self.request_timeout),
            ("connect_timeout", self.connect_timeout),
        ] {
            if value.is_zero() {
                return Err(AgentError::Config(format!("{name} must not be zero")));
            }
        }
        if self.idle_timeout < MIN_IDLE_TIMEOUT
            || quinn::IdleTimeout::try_from(self.idle_timeout).is_err()
        {
            return Err(AgentError::Config(
                "idle_timeout must be at least 1 s (and below 2^62 ms)".into(),
            ));
        }
        if self.reconnect.initial.is_zero() || self.reconnect.max < self.reconnect.initial {
            return Err(AgentError::Config(
                "reconnect: initial must be non-zero and at most max".into(),
            ));
        }
        self.card.validate()?;
        Ok(())
    }
}

impl Clone for AgentConfig {
    fn clone(&self) -> Self {
        Self {
            gateway: self.gateway,
            cert_chain: self.cert_chain.clone(),
            private_key: self.private_key.clone_key(),
            trust_anchors: self.trust_anchors.clone(),
            card: self.card.clone(),
            max_concurrent: self.max_concurrent,
            lanes: self.lanes,
            reconnect: self.reconnect,
            request_timeout: self.request_timeout,
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout,
            max_response_bytes: self.max_response_bytes,
            max_request_bytes: self.max_request_bytes,
        }
    }
}

impl fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentConfig")
            .field("gateway", &self.gateway)
            .field(
                "cert_chain",
                &format_args!("{} certificate(s)", self.cert_chain.len()),
            )
            .field("private_key", &"<redacted>")
            .field(
                "trust_anchors",
                &format_args!("{} certificate(s)", self.trust_anchors.len()),
            )
            .field("card", &self.card.name)
            .field("max_concurrent", &self.max_concurrent)
            .field("lanes", &self.lanes)
            .field("reconnect", &self.reconnect)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("max_request_bytes", &self.max_request_bytes)
            .finish()
    }
}

/// Exponential backoff with jitter between reconnection attempts.
///
/// Attempt `n` (from 0) waits `min(initial * 2^n, max)`; with jitter, a uniformly random
/// duration between half of that and all of it, so agents that lost the same gateway do not
/// all come back in the same instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay. Default 100 ms.
    pub initial: Duration,
    /// The largest delay. Default 5 s.
    pub max: Duration,
    /// Whether to randomise each delay. Default true.
    pub jitter: bool,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
            jitter: true,
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0-based), using `random` as the source of jitter.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        let base = self.initial.saturating_mul(factor).min(self.max);
        if !self.jitter {
            return base;
        }
        let half = base / 2;
        let span = u64::try_from((base - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(random % span.saturating_add(1))
    }

    /// [`Backoff::delay`] with a fresh random value.
    pub(crate) fn next_delay(&self, attempt: u32) -> Duration {
        self.delay(attempt, random_u64())
    }
}

/// A random value good enough for jitter (not for cryptography): std's per-instance random
/// hasher keys, mixed with the clock.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    hasher.write_u32(nanos);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_max() {
        let b = Backoff {
            jitter: false,
            ..Backoff::default()
        };
        assert_eq!(b.delay(0, 0), Duration::from_millis(100));
        assert_eq!(b.delay(1, 0), Duration::from_millis(200));
        assert_eq!(b.delay(5, 0), Duration::from_millis(3200));
        assert_eq!(b.delay(6, 0), Duration::from_secs(5));
        assert_eq!(b.delay(u32::MAX, 0), Duration::from_secs(5));
    }

    #[test]
    fn jitter_stays_between_half_and_all_of_the_delay() {
        let b = Backoff::default();
        for random in [0, 1, 12_345, u64::MAX / 3, u64::MAX] {
            for attempt in 0..10 {
                let full = Backoff { jitter: false, ..b }.delay(attempt, 0);
                let d = b.delay(attempt, random);
                assert!(d >= full / 2 && d <= full, "{d:?} vs {full:?}");
            }
        }
        assert_ne!(b.delay(3, 1), b.delay(3, 999_999_937));
    }
}
