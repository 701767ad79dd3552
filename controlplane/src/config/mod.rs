//! The domain configuration, `domain.toml`: the model, parsing with errors that name the file,
//! line and key, and the embedded development domain.
//!
//! The reference of every key is `docs/CONTROL.md`; `controlplane/domain.example.toml` is a
//! commented example. A configuration is valid exactly when it compiles: [`DomainConfig::validate`]
//! runs the compiler ([`crate::compile`]) and discards the table, so the two can never disagree.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use thiserror::Error;

/// A value with the byte range it came from in the source text, so errors can point at it.
/// Build one in code with `Spanned::new(0..0, value)`.
pub use toml::Spanned;

/// The development domain, as TOML (see [`DomainConfig::development`]).
pub const DEVELOPMENT_TOML: &str = include_str!("development.toml");

/// A whole `domain.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainConfig {
    /// `[domain]`: the trust domain and its trust anchor.
    pub domain: DomainSection,
    /// `[[gateway]]`: the gateways of the domain.
    #[serde(default)]
    pub gateway: Vec<GatewayConfig>,
    /// `[groups.<name>]`: groups of principals, by name.
    #[serde(default)]
    pub groups: BTreeMap<Spanned<String>, GroupConfig>,
    /// `[[invoke]]`: who may invoke what.
    #[serde(default)]
    pub invoke: Vec<InvokeRule>,
    /// `capabilities`: capability names known in advance, interned into every table even if no
    /// rule names them exactly.
    #[serde(default)]
    pub capabilities: Vec<Spanned<String>>,
}

/// `[domain]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainSection {
    /// The SPIFFE trust domain, e.g. `dmsc.local`.
    pub name: Spanned<String>,
    /// Path of the PEM file holding the domain's CA certificate(s).
    pub trust_anchor: Spanned<String>,
}

/// One `[[gateway]]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The gateway id, as in `spiffe://<domain>/gateway/<id>`.
    pub id: Spanned<String>,
}

/// One `[groups.<name>]`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// SPIFFE ID patterns of the principals in the group.
    #[serde(default)]
    pub members: Vec<Spanned<String>>,
    /// Capability patterns members may advertise in their agent cards.
    #[serde(default)]
    pub advertise: Vec<Spanned<String>>,
    /// Capability patterns members see in discovery answers.
    #[serde(default)]
    pub discover: Vec<Spanned<String>>,
    /// Requests per second each member may make.
    #[serde(default)]
    pub rate_limit: Option<Spanned<RateLimitConfig>>,
    /// Members are bridges: they may invoke on behalf of another identity of the domain (an
    /// A2A front door for its HTTP clients), which policy then evaluates instead of theirs.
    #[serde(default)]
    pub bridge: bool,
}

/// `rate_limit = { per_second = N, burst = M }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second, 1 to 2^32 - 1.
    pub per_second: u32,
    /// Requests that may arrive at once, 1 to 2^32 - 1; defaults to `per_second`.
    #[serde(default)]
    pub burst: Option<u32>,
}

/// One `[[invoke]]` rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeRule {
    /// `allow` or `deny`.
    pub effect: Effect,
    /// Names of the groups the rule applies to.
    pub groups: Vec<Spanned<String>>,
    /// Capability patterns the rule covers.
    pub capabilities: Vec<Spanned<String>>,
}

/// The effect of an [`InvokeRule`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Admit.
    Allow,
    /// Refuse (beats allow; see the precedence in `docs/CONTROL.md`).
    Deny,
}

/// Why a `domain.toml` could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not TOML, or not the shape of a `domain.toml` (unknown key, wrong type,
    /// missing key).
    #[error("{file}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        file: String,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        /// The parser's message, which names the key.
        message: String,
    },
    /// A value parses but is not valid.
    #[error("{file}:{line}:{column}: {key}: {reason}")]
    Invalid {
        /// The file.
        file: String,
        /// 1-based line of the offending value.
        line: usize,
        /// 1-based column (in characters) of the offending value.
        column: usize,
        /// The dotted key of the value, e.g. `groups.billing.members[2]`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// A problem with one value of a configuration, located by key and byte span.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{key}: {reason}")]
pub struct Invalid {
    /// The dotted key of the value, e.g. `groups.billing.members[2]`.
    pub key: String,
    /// Byte range of the value in the source text (`0..0` for a configuration built in code).
    pub span: Range<usize>,
    /// What is wrong.
    pub reason: String,
}

impl DomainConfig {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        Self::from_toml(&file, &text)
    }

    /// Parses and validates `text`; `file` names it in errors.
    pub fn from_toml(file: &str, text: &str) -> Result<Self, ConfigError> {
        let config: DomainConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            let (line, column) = line_column(text, offset);
            let message = e.message().trim_end();
            ConfigError::Parse {
                file: file.to_owned(),
                line,
                column,
                message: match key_at(text, offset) {
                    Some(key) if !message.contains(&key) => format!("{key}: {message}"),
                    _ => message.to_owned(),
                },
            }
        })?;
        config.validate().map_err(|e| {
            let (line, column) = line_column(text, e.span.start);
            ConfigError::Invalid {
                file: file.to_owned(),
                line,
                column,
                key: e.key,
                reason: e.reason,
            }
        })?;
        Ok(config)
    }

    /// Checks every value: the trust domain, gateway ids, group names, SPIFFE ID and capability
    /// patterns, group references, limits. Valid means "compiles" (see the module docs).
    pub fn validate(&self) -> Result<(), Invalid> {
        crate::compile::compile(self)
            .map(drop)
            .map_err(|e| match e {
                crate::compile::CompileError::Config(invalid) => invalid,
                crate::compile::CompileError::Table(table) => Invalid {
                    key: "(whole domain)".into(),
                    span: 0..0,
                    reason: table.to_string(),
                },
            })
    }

    /// The development domain `dmsc-control serve` uses without a configuration: trust domain
    /// `dmsc.local`, gateway `gw1`, and every agent allowed to advertise, discover and invoke
    /// every capability ([`DEVELOPMENT_TOML`]).
    pub fn development() -> Self {
        // The embedded text is a constant of this crate; a unit test parses it, so this cannot
        // fail at run time.
        Self::from_toml("<embedded development domain>", DEVELOPMENT_TOML)
            .expect("the embedded development domain is valid")
    }
}

/// The dotted key of the `key = value` line holding byte `offset` (`invoke.effect`), for
/// parser messages that name only the value; `None` if the line is not such a line.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    if key.is_empty() || key.starts_with('#') || key.starts_with('[') {
        return None;
    }
    let table = text[..start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..offset].chars().count() + 1)
}

#[cfg(test)]
mod tests;
