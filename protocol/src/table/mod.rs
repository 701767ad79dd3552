//! Compiled routing and policy tables: the format the control plane pushes to every gateway.
//!
//! A [`Table`] is one immutable *generation* of a domain's configuration, compiled: group names
//! and capability names interned to dense ids ([`GroupId`], [`CapabilityId`], [`PatternId`]),
//! group membership as SPIFFE ID patterns ([`Membership`]), rules that say which groups may
//! invoke, advertise or discover which capabilities ([`ExactRule`], [`WildcardRule`]), and
//! per-principal rate-limit parameters ([`RateLimit`]). Its canonical binary encoding is named
//! by its SHA-256 ([`Generation`]), so the same configuration always compiles to the same bytes
//! and the same name, across restarts and replicas.
//!
//! # Calling contract
//!
//! - The control plane fills a [`TableParts`] and calls [`Table::new`], which validates the
//!   parts, encodes them canonically and hashes the encoding. Nothing else builds a `Table`.
//! - A gateway calls [`Table::decode`] on the bytes it received (off the worker cores), then
//!   [`Table::expect_domain`]. Decoding accepts only the canonical encoding, so
//!   `Table::decode(b)?.encoded() == b` and the generation is the hash of the bytes received.
//! - Per connection, the gateway computes the caller's groups once with [`Table::groups_of`]
//!   (and its rate limit with [`Table::rate_limit_of`]); per capability, once when it first
//!   appears, its [`Column`] with [`Table::policy_column`]. Per request the decision is
//!   [`allowed`]: a few word ANDs, no allocation, no lookup beyond the caller's own state.
//!
//! # Precedence
//!
//! For one group and one capability, the rules of that group whose pattern matches the
//! capability are ranked by specificity: an exact name beats any wildcard, and a longer wildcard
//! prefix beats a shorter one (`billing.*` beats `*`). The most specific rule decides; at equal
//! specificity `deny` wins. A group with no matching rule has no say. Across the caller's
//! groups, any group's `deny` vetoes; otherwise any group's `allow` admits; otherwise the
//! caller is refused (default deny). The same precedence applies to every [`Relation`].
//!
//! The byte layout is normative in `docs/CONTROL.md`.

use std::fmt;

use thiserror::Error;

use crate::spiffe::PrincipalKind;
use crate::DecodeError;

mod codec;
mod eval;
mod pattern;
pub mod sections;
mod validate;

pub use eval::{allowed, Column, GroupSet};
pub use pattern::{CapabilityPattern, PatternError};

/// The four bytes every encoded table starts with.
pub const MAGIC: [u8; 4] = *b"DMTB";
/// The format version this crate reads and writes.
pub const FORMAT_VERSION: u64 = 1;

/// Largest encoded table accepted or produced, in bytes.
pub const MAX_TABLE_BYTES: usize = 64 * 1024 * 1024;
/// Most groups in a table; a [`GroupSet`] is a bitset of this many bits.
pub const MAX_GROUPS: usize = 256;
/// Longest group name, in bytes.
pub const MAX_GROUP_NAME_BYTES: usize = 64;
/// Most gateways in a table.
pub const MAX_GATEWAYS: usize = 4096;
/// Most membership rules in a table.
pub const MAX_MEMBERS: usize = 1 << 20;
/// Most interned capability names in a table.
pub const MAX_CAPABILITIES: usize = 1 << 20;
/// Most wildcard capability patterns in a table.
pub const MAX_PATTERNS: usize = 4096;
/// Most exact-name rules in a table.
pub const MAX_EXACT_RULES: usize = 4 << 20;
/// Most wildcard rules in a table.
pub const MAX_WILDCARD_RULES: usize = 1 << 16;
/// Most sections of types this crate does not know, carried through unchanged.
pub const MAX_EXTENSION_SECTIONS: usize = 64;

/// Names a group: its index in [`TableParts::groups`] (below [`MAX_GROUPS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub u16);

/// Names an interned capability: its index in [`TableParts::capabilities`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CapabilityId(pub u32);

/// Names a wildcard capability pattern: its index in [`TableParts::patterns`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PatternId(pub u32);

/// What a rule grants or refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Relation {
    /// Invoking the capability (code 0).
    Invoke,
    /// Advertising the capability in an agent card (code 1).
    Advertise,
    /// Seeing the capability in discovery answers (code 2).
    Discover,
}

/// Whether a rule allows or denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Effect {
    /// Admit (code 0).
    Allow,
    /// Refuse; beats an allow of equal specificity and vetoes across groups (code 1).
    Deny,
}

/// How an [`IdentityPattern`] compares the principal's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NameMatch {
    /// The name equals the pattern's name (code 0).
    Exact,
    /// The name starts with the pattern's name (code 1); written with a trailing `*`.
    Prefix,
}

/// A pattern over the SPIFFE IDs of the table's trust domain, such as
/// `spiffe://dmsc.local/agent/billing-*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityPattern {
    /// The kind of principal matched.
    pub kind: PrincipalKind,
    /// How the name is compared.
    pub name_match: NameMatch,
    /// The agent name or gateway id (or its prefix); empty for [`PrincipalKind::Control`].
    pub name: String,
}

/// One membership rule: principals matching `pattern` belong to `group`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Membership {
    /// Who.
    pub pattern: IdentityPattern,
    /// Which group they join.
    pub group: GroupId,
}

/// A rule naming one interned capability exactly: one cell of the sparse group x capability
/// matrix of a relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExactRule {
    /// What the rule is about.
    pub relation: Relation,
    /// The capability.
    pub capability: CapabilityId,
    /// The group it applies to.
    pub group: GroupId,
    /// Allow or deny.
    pub effect: Effect,
}

/// A rule naming every capability that starts with a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WildcardRule {
    /// What the rule is about.
    pub relation: Relation,
    /// The prefix pattern.
    pub pattern: PatternId,
    /// The group it applies to.
    pub group: GroupId,
    /// Allow or deny.
    pub effect: Effect,
}

/// Token-bucket parameters for every principal of a group; each principal has its own bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RateLimit {
    /// The group.
    pub group: GroupId,
    /// Sustained requests per second, at least 1.
    pub per_second: u32,
    /// Bucket size (requests that may arrive at once), at least 1.
    pub burst: u32,
}

/// The rate limit in force for one caller: the smallest `per_second` and the smallest `burst`
/// among the limits of its groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Bucket size.
    pub burst: u32,
}

/// A section of a type this crate does not know, kept byte for byte so that a table written by
/// a later control plane re-encodes (and hashes) identically.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExtensionSection {
    /// The section type (not one of [`section`]'s known codes).
    pub section_type: u64,
    /// The section body.
    pub body: Vec<u8>,
}

/// Section type codes, in the order they appear in an encoded table.
pub mod section {
    /// The trust domain (required).
    pub const DOMAIN: u64 = 0x01;
    /// Gateway ids.
    pub const GATEWAYS: u64 = 0x02;
    /// Group names.
    pub const GROUPS: u64 = 0x03;
    /// Membership rules.
    pub const MEMBERS: u64 = 0x04;
    /// Interned capability names.
    pub const CAPABILITIES: u64 = 0x05;
    /// Wildcard capability prefixes.
    pub const PATTERNS: u64 = 0x06;
    /// Exact-name rules.
    pub const EXACT_RULES: u64 = 0x07;
    /// Wildcard rules.
    pub const WILDCARD_RULES: u64 = 0x08;
    /// Rate limits.
    pub const RATE_LIMITS: u64 = 0x09;
    /// Bridge groups: members may invoke on behalf of another identity.
    pub const BRIDGES: u64 = 0x0A;
    /// The highest section type this crate knows; higher types are extensions.
    pub const LAST_KNOWN: u64 = BRIDGES;
}

/// The contents of a table, before validation. Every list is in canonical order (ascending,
/// no duplicates; strings compare byte-wise) as [`validate`] checks; ids index the lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableParts {
    /// The trust domain every identity of the table belongs to.
    pub domain: String,
    /// The gateways of the domain, by id.
    pub gateways: Vec<String>,
    /// Group names; [`GroupId`] `i` is `groups[i]`.
    pub groups: Vec<String>,
    /// Membership rules, ordered by (kind, name match, name, group).
    pub members: Vec<Membership>,
    /// Interned capability names; [`CapabilityId`] `i` is `capabilities[i]`.
    pub capabilities: Vec<String>,
    /// Wildcard prefixes (the pattern `billing.*` is the prefix `billing.`, `*` is the empty
    /// prefix); [`PatternId`] `i` is `patterns[i]`.
    pub patterns: Vec<String>,
    /// Exact rules, ordered by (relation, capability, group); one per key.
    pub exact_rules: Vec<ExactRule>,
    /// Wildcard rules, ordered by (relation, pattern, group); one per key.
    pub wildcard_rules: Vec<WildcardRule>,
    /// Rate limits, ordered by group; one per group.
    pub rate_limits: Vec<RateLimit>,
    /// Bridge groups, ascending: their members may send requests on behalf of another
    /// identity of the domain, which policy then evaluates instead of theirs.
    pub bridges: Vec<GroupId>,
    /// Sections of unknown type, ordered by type, all above [`section::LAST_KNOWN`].
    pub extensions: Vec<ExtensionSection>,
}

/// The name of a table generation: the SHA-256 of its canonical encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation(pub [u8; 32]);

impl Generation {
    /// The generation of the given canonical encoding.
    pub fn of(encoded: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, encoded);
        let mut out = [0; 32];
        out.copy_from_slice(digest.as_ref());
        Generation(out)
    }
}

impl fmt::Display for Generation {
    /// Lowercase hex, 64 characters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Generation({self})")
    }
}

/// Why a table could not be built, encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TableError {
    /// The bytes are not a well-formed encoding (truncated, over a length limit, bad UTF-8, a
    /// value out of range).
    #[error("malformed table: {0}")]
    Decode(#[from] DecodeError),
    /// The bytes do not start with [`MAGIC`].
    #[error("not a DMSC table (bad magic)")]
    BadMagic,
    /// The format version is not [`FORMAT_VERSION`].
    #[error("unsupported table format version {0}")]
    UnsupportedVersion(u64),
    /// The encoding is, or would be, larger than [`MAX_TABLE_BYTES`].
    #[error("table is {len} bytes, over the limit of {limit}")]
    TooLarge {
        /// The size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The encoding is well-formed but not canonical (non-minimal integer, empty or repeated
    /// section, sections out of order, bytes after the last field of a section).
    #[error("non-canonical table encoding: {0}")]
    NotCanonical(&'static str),
    /// A required section is absent.
    #[error("table has no {0} section")]
    MissingSection(&'static str),
    /// The contents break a rule of the format: an id that names nothing, a list out of order
    /// or with duplicates, a count or name over its limit, a malformed name.
    #[error("invalid table: {section}[{index}]: {reason}")]
    Invalid {
        /// The list at fault (`groups`, `members`, ...).
        section: &'static str,
        /// The position of the offending entry in it.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The table is for another trust domain than the one expected.
    #[error("table is for trust domain {found:?}, expected {expected:?}")]
    WrongDomain {
        /// The domain the receiver serves.
        expected: String,
        /// The domain the table names.
        found: String,
    },
}

impl TableError {
    /// The type of the section at fault, when the error names one (a list of the format, a
    /// missing section): what a gateway names in a `dmsc-ctl/1` rejection.
    pub fn section_type(&self) -> Option<u64> {
        let name = match self {
            TableError::Invalid { section, .. } | TableError::MissingSection(section) => *section,
            _ => return None,
        };
        Some(match name {
            "domain" => section::DOMAIN,
            "gateways" => section::GATEWAYS,
            "groups" => section::GROUPS,
            "members" => section::MEMBERS,
            "capabilities" => section::CAPABILITIES,
            "patterns" => section::PATTERNS,
            "exact_rules" => section::EXACT_RULES,
            "wildcard_rules" => section::WILDCARD_RULES,
            "rate_limits" => section::RATE_LIMITS,
            "bridges" => section::BRIDGES,
            _ => return None,
        })
    }
}

/// A validated, encoded and named table generation. Immutable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    parts: TableParts,
    encoded: Vec<u8>,
    generation: Generation,
}

impl Table {
    /// Validates `parts`, encodes them canonically and names the result.
    pub fn new(parts: TableParts) -> Result<Self, TableError> {
        validate(&parts)?;
        let encoded = codec::encode(&parts)?;
        let generation = Generation::of(&encoded);
        Ok(Table {
            parts,
            encoded,
            generation,
        })
    }

    /// Decodes and validates a table. Accepts only the canonical encoding (the one
    /// [`Table::new`] produces), so the result's [`encoded`](Table::encoded) equals `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, TableError> {
        let parts = codec::decode(bytes)?;
        validate(&parts)?;
        Ok(Table {
            parts,
            encoded: bytes.to_vec(),
            generation: Generation::of(bytes),
        })
    }

    /// Fails with [`TableError::WrongDomain`] unless the table is for trust domain `domain`.
    pub fn expect_domain(&self, domain: &str) -> Result<(), TableError> {
        if self.parts.domain == domain {
            Ok(())
        } else {
            Err(TableError::WrongDomain {
                expected: domain.to_owned(),
                found: self.parts.domain.clone(),
            })
        }
    }

    /// The table's contents.
    pub fn parts(&self) -> &TableParts {
        &self.parts
    }

    /// The canonical encoding.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    /// The generation: SHA-256 of [`encoded`](Table::encoded).
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// The id of an interned capability name (binary search).
    pub fn capability_id(&self, name: &str) -> Option<CapabilityId> {
        self.parts
            .capabilities
            .binary_search_by(|c| c.as_str().cmp(name))
            .ok()
            .map(|i| CapabilityId(i as u32))
    }

    /// The id of a group name (binary search).
    pub fn group_id(&self, name: &str) -> Option<GroupId> {
        self.parts
            .groups
            .binary_search_by(|g| g.as_str().cmp(name))
            .ok()
            .map(|i| GroupId(i as u16))
    }
}

pub use validate::{group_name_problem, validate};

impl Relation {
    /// Every relation, in code order.
    pub const ALL: [Relation; 3] = [Relation::Invoke, Relation::Advertise, Relation::Discover];

    /// The wire code.
    pub fn code(self) -> u64 {
        self as u64
    }

    /// The relation with wire code `code`.
    pub fn from_code(code: u64) -> Option<Self> {
        Self::ALL.get(usize::try_from(code).ok()?).copied()
    }
}

impl Effect {
    /// The wire code.
    pub fn code(self) -> u64 {
        self as u64
    }

    /// The effect with wire code `code`.
    pub fn from_code(code: u64) -> Option<Self> {
        match code {
            0 => Some(Effect::Allow),
            1 => Some(Effect::Deny),
            _ => None,
        }
    }
}

impl NameMatch {
    /// The wire code.
    pub fn code(self) -> u64 {
        self as u64
    }

    /// The match with wire code `code`.
    pub fn from_code(code: u64) -> Option<Self> {
        match code {
            0 => Some(NameMatch::Exact),
            1 => Some(NameMatch::Prefix),
            _ => None,
        }
    }
}

/// The wire code of a principal kind (0 agent, 1 gateway, 2 control).
pub fn kind_code(kind: PrincipalKind) -> u64 {
    match kind {
        PrincipalKind::Agent => 0,
        PrincipalKind::Gateway => 1,
        PrincipalKind::Control => 2,
    }
}

/// The principal kind with wire code `code`.
pub fn kind_from_code(code: u64) -> Option<PrincipalKind> {
    PrincipalKind::ALL.get(usize::try_from(code).ok()?).copied()
}

#[cfg(test)]
mod tests;
