//! SPIFFE IDs: the identities DMSC endpoints carry in their certificates and that the gateway
//! stamps in the caller field of forwarded requests.
//!
//! Every DMSC endpoint is identified by the SPIFFE ID in the URI SAN of its certificate:
//!
//! * `spiffe://<trust-domain>/agent/<name>` for an agent,
//! * `spiffe://<trust-domain>/gateway/<id>` for a gateway,
//! * `spiffe://<trust-domain>/control` for the control plane.
//!
//! [`SpiffeId`] parses and builds such IDs (the syntax of the SPIFFE ID specification, narrowed to
//! these three shapes). This module is pure string handling: reading an ID out of a certificate,
//! and everything else to do with certificates, lives in the `dmsc-identity` crate.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Longest SPIFFE ID accepted, in bytes (the SPIFFE ID specification's limit).
pub const MAX_SPIFFE_ID_BYTES: usize = 2048;
/// Longest trust domain name accepted, in bytes (the SPIFFE ID specification's limit).
pub const MAX_TRUST_DOMAIN_BYTES: usize = 255;

/// The scheme every SPIFFE ID starts with.
pub const SCHEME: &str = "spiffe://";

/// Why a SPIFFE ID, trust domain or name is not valid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SpiffeIdError {
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

impl Principal {
    /// The kind of principal, without its name.
    pub fn kind(&self) -> PrincipalKind {
        match self {
            Principal::Agent(_) => PrincipalKind::Agent,
            Principal::Gateway(_) => PrincipalKind::Gateway,
            Principal::Control => PrincipalKind::Control,
        }
    }
}

/// The kind of principal a [`SpiffeId`] names: which of the three path shapes it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PrincipalKind {
    /// `/agent/<name>`.
    Agent,
    /// `/gateway/<id>`.
    Gateway,
    /// `/control`.
    Control,
}

impl PrincipalKind {
    /// Every kind, in declaration order.
    pub const ALL: [PrincipalKind; 3] = [
        PrincipalKind::Agent,
        PrincipalKind::Gateway,
        PrincipalKind::Control,
    ];

    /// The kind as a lowercase word: `agent`, `gateway` or `control`.
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::Agent => "agent",
            PrincipalKind::Gateway => "gateway",
            PrincipalKind::Control => "control",
        }
    }
}

impl fmt::Display for PrincipalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
    pub fn parse(uri: &str) -> Result<Self, SpiffeIdError> {
        let invalid = |reason: &str| SpiffeIdError::InvalidSpiffeId {
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
    pub fn agent(domain: &str, name: &str) -> Result<Self, SpiffeIdError> {
        check_name("agent name", name)?;
        Self::build(domain, &format!("/agent/{name}"))
    }

    /// The ID of gateway `id` in trust domain `domain`.
    pub fn gateway(domain: &str, id: &str) -> Result<Self, SpiffeIdError> {
        check_name("gateway id", id)?;
        Self::build(domain, &format!("/gateway/{id}"))
    }

    /// The ID of the control plane of trust domain `domain`.
    pub fn control(domain: &str) -> Result<Self, SpiffeIdError> {
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

    /// The kind of principal the ID names.
    pub fn kind(&self) -> PrincipalKind {
        self.principal.kind()
    }

    /// The URI, e.g. `spiffe://dmsc.local/agent/weather`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    fn build(domain: &str, path: &str) -> Result<Self, SpiffeIdError> {
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
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Checks a trust domain name: 1 to 255 bytes of lowercase ASCII letters, digits, `.`, `-`, `_`.
pub fn validate_trust_domain(domain: &str) -> Result<(), SpiffeIdError> {
    match trust_domain_problem(domain) {
        None => Ok(()),
        Some(reason) => Err(SpiffeIdError::InvalidTrustDomain {
            domain: truncate(domain, 128).to_owned(),
            reason,
        }),
    }
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

/// Checks an agent name or gateway id (one path segment): letters, digits, `.`, `-`, `_`, not
/// empty, not `.` or `..`. `what` names the value in the error.
pub fn validate_name(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    check_name(what, value)
}

fn check_name(what: &'static str, value: &str) -> Result<(), SpiffeIdError> {
    match segment_problem(value) {
        None => Ok(()),
        Some(reason) => Err(SpiffeIdError::InvalidName {
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
    }

    #[test]
    fn parses_the_three_shapes() {
        let agent = SpiffeId::parse("spiffe://dmsc.local/agent/weather").unwrap();
        assert_eq!(agent.trust_domain(), "dmsc.local");
        assert_eq!(agent.principal(), &Principal::Agent("weather".into()));
        assert_eq!(agent.kind(), PrincipalKind::Agent);
        assert_eq!(agent.to_string(), "spiffe://dmsc.local/agent/weather");
        let gw = SpiffeId::gateway("prod_1", "gw-01").unwrap();
        assert_eq!(gw.as_str(), "spiffe://prod_1/gateway/gw-01");
        assert_eq!(gw.principal(), &Principal::Gateway("gw-01".into()));
        assert_eq!(gw.kind(), PrincipalKind::Gateway);
        let control = SpiffeId::control("dmsc.local").unwrap();
        assert_eq!(control.principal(), &Principal::Control);
        assert_eq!(control.kind(), PrincipalKind::Control);
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
            Err(SpiffeIdError::InvalidName { .. })
        ));
        assert!(matches!(
            SpiffeId::control("Upper"),
            Err(SpiffeIdError::InvalidTrustDomain { .. })
        ));
    }
}
