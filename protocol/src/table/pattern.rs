//! The text forms of identity and capability patterns, as written in `domain.toml`.

use std::fmt;

use thiserror::Error;

use super::{IdentityPattern, NameMatch};
use crate::card::validate_capability_name;
use crate::limits::MAX_CAPABILITY_BYTES;
use crate::spiffe::{Principal, PrincipalKind, SpiffeId, SCHEME};

/// Why a pattern's text is not valid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PatternError {
    /// An identity pattern is not a SPIFFE ID of the DMSC shapes (with at most a trailing `*`).
    #[error("invalid identity pattern {pattern:?}: {reason}")]
    Identity {
        /// The pattern (cut to 128 bytes).
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An identity pattern names another trust domain than the table's.
    #[error("identity pattern {pattern:?} is not in trust domain {expected:?}")]
    WrongDomain {
        /// The pattern (cut to 128 bytes).
        pattern: String,
        /// The table's trust domain.
        expected: String,
    },
    /// A capability pattern is not a capability name with at most a trailing `*`.
    #[error("invalid capability pattern {pattern:?}: {reason}")]
    Capability {
        /// The pattern (cut to 128 bytes).
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl IdentityPattern {
    /// Parses `spiffe://<domain>/agent/<name>`, `.../agent/<prefix>*`, the same for
    /// `/gateway/`, or `spiffe://<domain>/control`. Only a trailing `*` in the last segment
    /// is a wildcard; `<domain>` must be `domain`.
    pub fn parse(domain: &str, text: &str) -> Result<Self, PatternError> {
        let identity = |reason: String| PatternError::Identity {
            pattern: cut(text),
            reason,
        };
        // A trailing `*` stands for "any continuation": the text with one letter in its place
        // must be a valid ID, and every name the pattern matches is then valid too.
        let (uri, name_match) = match text.strip_suffix('*') {
            Some(head) => (format!("{head}x"), NameMatch::Prefix),
            None => (text.to_owned(), NameMatch::Exact),
        };
        let id = SpiffeId::parse(&uri).map_err(|e| identity(e.to_string()))?;
        if id.trust_domain() != domain {
            return Err(PatternError::WrongDomain {
                pattern: cut(text),
                expected: domain.to_owned(),
            });
        }
        let (kind, mut name) = match id.principal() {
            Principal::Agent(n) => (PrincipalKind::Agent, n.clone()),
            Principal::Gateway(n) => (PrincipalKind::Gateway, n.clone()),
            Principal::Control => {
                if name_match == NameMatch::Prefix {
                    return Err(identity("the control ID takes no wildcard".into()));
                }
                (PrincipalKind::Control, String::new())
            }
        };
        if name_match == NameMatch::Prefix {
            // Drop the stand-in letter; any other `*` already failed SPIFFE ID parsing.
            name.pop();
        }
        Ok(IdentityPattern {
            kind,
            name_match,
            name,
        })
    }

    /// The pattern's text in trust domain `domain` (the inverse of [`IdentityPattern::parse`]).
    pub fn to_text(&self, domain: &str) -> String {
        let star = if self.name_match == NameMatch::Prefix {
            "*"
        } else {
            ""
        };
        match self.kind {
            PrincipalKind::Control => format!("{SCHEME}{domain}/control"),
            kind => format!("{SCHEME}{domain}/{kind}/{}{star}", self.name),
        }
    }

    /// Whether the principal `kind`/`name` matches.
    pub fn matches(&self, kind: PrincipalKind, name: &str) -> bool {
        self.kind == kind
            && match self.name_match {
                NameMatch::Exact => self.name == name,
                NameMatch::Prefix => name.starts_with(&self.name),
            }
    }
}

/// A capability pattern: an exact capability name, or a prefix written with a trailing `*`
/// (`billing.*`; `*` alone matches every capability).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CapabilityPattern {
    /// Exactly this capability.
    Exact(String),
    /// Every capability whose name starts with this prefix (possibly empty).
    Prefix(String),
}

impl CapabilityPattern {
    /// Parses a pattern. Only a trailing `*` is a wildcard; a capability whose name ends in `*`
    /// cannot be named exactly.
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        Ok(match CapabilityPattern::parse_borrowed(text)? {
            (name, false) => CapabilityPattern::Exact(name.to_owned()),
            (prefix, true) => CapabilityPattern::Prefix(prefix.to_owned()),
        })
    }

    /// Like [`CapabilityPattern::parse`] without allocating: the exact name or the prefix,
    /// borrowed from `text`, and whether it is a prefix.
    pub fn parse_borrowed(text: &str) -> Result<(&str, bool), PatternError> {
        let capability = |reason: String| PatternError::Capability {
            pattern: cut(text),
            reason,
        };
        match text.strip_suffix('*') {
            Some(prefix) => {
                if prefix.len() >= MAX_CAPABILITY_BYTES {
                    return Err(capability(format!(
                        "prefix is longer than {} bytes",
                        MAX_CAPABILITY_BYTES - 1
                    )));
                }
                if prefix.contains('*') {
                    return Err(capability("only a trailing '*' is a wildcard".into()));
                }
                if prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(capability("holds whitespace or a control character".into()));
                }
                Ok((prefix, true))
            }
            None => {
                if text.contains('*') {
                    return Err(capability("only a trailing '*' is a wildcard".into()));
                }
                validate_capability_name(text).map_err(|e| capability(e.to_string()))?;
                Ok((text, false))
            }
        }
    }
}

impl fmt::Display for CapabilityPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CapabilityPattern::Exact(name) => f.write_str(name),
            CapabilityPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

fn cut(s: &str) -> String {
    let mut end = s.len().min(128);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
