//! The canonical binary encoding of a table (normative text: `docs/CONTROL.md`).
//!
//! ```text
//! table   = magic "DMTB" | version (varint) | section*
//! section = type (varint) | length (varint) | body (length bytes)
//! ```
//!
//! Sections appear in strictly increasing type order, each at most once, never empty. Every
//! integer is a QUIC varint in its shortest form. The decoder accepts nothing else, so a
//! decoded table re-encodes to the same bytes.

use super::{
    kind_code, kind_from_code, section, CapabilityId, Effect, ExactRule, ExtensionSection, GroupId,
    IdentityPattern, Membership, NameMatch, PatternId, RateLimit, Relation, TableError, TableParts,
    WildcardRule, FORMAT_VERSION, MAGIC, MAX_CAPABILITIES, MAX_EXACT_RULES, MAX_EXTENSION_SECTIONS,
    MAX_GATEWAYS, MAX_GROUPS, MAX_GROUP_NAME_BYTES, MAX_MEMBERS, MAX_PATTERNS, MAX_TABLE_BYTES,
    MAX_WILDCARD_RULES,
};
use crate::codec::put_bytes;
use crate::limits::MAX_CAPABILITY_BYTES;
use crate::spiffe::{MAX_SPIFFE_ID_BYTES, MAX_TRUST_DOMAIN_BYTES};
use crate::{varint, DecodeError};

/// Encodes parts that [`super::validate`] accepted.
pub(super) fn encode(parts: &TableParts) -> Result<Vec<u8>, TableError> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(&MAGIC);
    varint::encode(FORMAT_VERSION, &mut out);
    let mut body = Vec::new();

    put_section(&mut out, &mut body, section::DOMAIN, |b| {
        put_bytes(b, parts.domain.as_bytes())
    });
    put_list(
        &mut out,
        &mut body,
        section::GATEWAYS,
        &parts.gateways,
        |b, g| put_bytes(b, g.as_bytes()),
    );
    put_list(
        &mut out,
        &mut body,
        section::GROUPS,
        &parts.groups,
        |b, g| put_bytes(b, g.as_bytes()),
    );
    put_list(
        &mut out,
        &mut body,
        section::MEMBERS,
        &parts.members,
        |b, m| {
            varint::encode(kind_code(m.pattern.kind), b);
            varint::encode(m.pattern.name_match.code(), b);
            put_bytes(b, m.pattern.name.as_bytes());
            varint::encode(u64::from(m.group.0), b);
        },
    );
    put_list(
        &mut out,
        &mut body,
        section::CAPABILITIES,
        &parts.capabilities,
        |b, c| put_bytes(b, c.as_bytes()),
    );
    put_list(
        &mut out,
        &mut body,
        section::PATTERNS,
        &parts.patterns,
        |b, p| put_bytes(b, p.as_bytes()),
    );
    put_list(
        &mut out,
        &mut body,
        section::EXACT_RULES,
        &parts.exact_rules,
        |b, r| {
            varint::encode(r.relation.code(), b);
            varint::encode(u64::from(r.capability.0), b);
            varint::encode(u64::from(r.group.0), b);
            varint::encode(r.effect.code(), b);
        },
    );
    put_list(
        &mut out,
        &mut body,
        section::WILDCARD_RULES,
        &parts.wildcard_rules,
        |b, r| {
            varint::encode(r.relation.code(), b);
            varint::encode(u64::from(r.pattern.0), b);
            varint::encode(u64::from(r.group.0), b);
            varint::encode(r.effect.code(), b);
        },
    );
    put_list(
        &mut out,
        &mut body,
        section::RATE_LIMITS,
        &parts.rate_limits,
        |b, r| {
            varint::encode(u64::from(r.group.0), b);
            varint::encode(u64::from(r.per_second), b);
            varint::encode(u64::from(r.burst), b);
        },
    );
    put_list(
        &mut out,
        &mut body,
        section::BRIDGES,
        &parts.bridges,
        |b, g| {
            varint::encode(u64::from(g.0), b);
        },
    );
    for ext in &parts.extensions {
        varint::encode(ext.section_type, &mut out);
        put_bytes(&mut out, &ext.body);
    }
    if out.len() > MAX_TABLE_BYTES {
        return Err(TableError::TooLarge {
            len: out.len(),
            limit: MAX_TABLE_BYTES,
        });
    }
    Ok(out)
}

fn put_section(out: &mut Vec<u8>, body: &mut Vec<u8>, ty: u64, fill: impl FnOnce(&mut Vec<u8>)) {
    body.clear();
    fill(body);
    varint::encode(ty, out);
    put_bytes(out, body);
}

/// A list section: count then items; omitted when the list is empty.
fn put_list<T>(
    out: &mut Vec<u8>,
    body: &mut Vec<u8>,
    ty: u64,
    items: &[T],
    mut item: impl FnMut(&mut Vec<u8>, &T),
) {
    if items.is_empty() {
        return;
    }
    put_section(out, body, ty, |b| {
        varint::encode(items.len() as u64, b);
        for i in items {
            item(b, i);
        }
    });
}

/// Decodes the canonical encoding into parts (not yet validated beyond the encoding itself).
pub(super) fn decode(bytes: &[u8]) -> Result<TableParts, TableError> {
    if bytes.len() > MAX_TABLE_BYTES {
        return Err(TableError::TooLarge {
            len: bytes.len(),
            limit: MAX_TABLE_BYTES,
        });
    }
    let mut r = Strict::new(bytes);
    if r.take(MAGIC.len(), "magic")? != MAGIC {
        return Err(TableError::BadMagic);
    }
    let version = r.varint("format version")?;
    if version != FORMAT_VERSION {
        return Err(TableError::UnsupportedVersion(version));
    }
    let mut parts = TableParts::default();
    let mut last_type = None;
    let mut has_domain = false;
    while !r.is_empty() {
        let ty = r.varint("section type")?;
        if last_type.is_some_and(|last| ty <= last) {
            return Err(TableError::NotCanonical(
                "sections out of order or repeated",
            ));
        }
        last_type = Some(ty);
        let body = r.bytes("section body", MAX_TABLE_BYTES)?;
        if body.is_empty() {
            return Err(TableError::NotCanonical("empty section"));
        }
        let mut b = Strict::new(body);
        match ty {
            section::DOMAIN => {
                parts.domain = b.str("domain", MAX_TRUST_DOMAIN_BYTES)?.to_owned();
                has_domain = true;
            }
            section::GATEWAYS => {
                parts.gateways = b.list("gateways", MAX_GATEWAYS, |b| {
                    Ok(b.str("gateway id", MAX_CAPABILITY_BYTES)?.to_owned())
                })?;
            }
            section::GROUPS => {
                parts.groups = b.list("groups", MAX_GROUPS, |b| {
                    Ok(b.str("group name", MAX_GROUP_NAME_BYTES)?.to_owned())
                })?;
            }
            section::MEMBERS => {
                parts.members = b.list("members", MAX_MEMBERS, |b| {
                    let kind = kind_from_code(b.varint("principal kind")?).ok_or(
                        DecodeError::InvalidValue {
                            what: "principal kind",
                            reason: "not 0, 1 or 2",
                        },
                    )?;
                    let name_match = NameMatch::from_code(b.varint("name match")?).ok_or(
                        DecodeError::InvalidValue {
                            what: "name match",
                            reason: "not 0 or 1",
                        },
                    )?;
                    let name = b.str("member name", MAX_SPIFFE_ID_BYTES)?.to_owned();
                    let group = b.group()?;
                    Ok(Membership {
                        pattern: IdentityPattern {
                            kind,
                            name_match,
                            name,
                        },
                        group,
                    })
                })?;
            }
            section::CAPABILITIES => {
                parts.capabilities = b.list("capabilities", MAX_CAPABILITIES, |b| {
                    Ok(b.str("capability name", MAX_CAPABILITY_BYTES)?.to_owned())
                })?;
            }
            section::PATTERNS => {
                parts.patterns = b.list("patterns", MAX_PATTERNS, |b| {
                    Ok(b.str("pattern prefix", MAX_CAPABILITY_BYTES)?.to_owned())
                })?;
            }
            section::EXACT_RULES => {
                parts.exact_rules = b.list("exact rules", MAX_EXACT_RULES, |b| {
                    let relation = b.relation()?;
                    let capability = CapabilityId(b.id("capability id", MAX_CAPABILITIES)?);
                    let group = b.group()?;
                    let effect = b.effect()?;
                    Ok(ExactRule {
                        relation,
                        capability,
                        group,
                        effect,
                    })
                })?;
            }
            section::WILDCARD_RULES => {
                parts.wildcard_rules = b.list("wildcard rules", MAX_WILDCARD_RULES, |b| {
                    let relation = b.relation()?;
                    let pattern = PatternId(b.id("pattern id", MAX_PATTERNS)?);
                    let group = b.group()?;
                    let effect = b.effect()?;
                    Ok(WildcardRule {
                        relation,
                        pattern,
                        group,
                        effect,
                    })
                })?;
            }
            section::RATE_LIMITS => {
                parts.rate_limits = b.list("rate limits", MAX_GROUPS, |b| {
                    let group = b.group()?;
                    let per_second = b.u32("per_second")?;
                    let burst = b.u32("burst")?;
                    Ok(RateLimit {
                        group,
                        per_second,
                        burst,
                    })
                })?;
            }
            section::BRIDGES => {
                parts.bridges = b.list("bridges", MAX_GROUPS, |b| b.group())?;
            }
            _ => {
                if parts.extensions.len() == MAX_EXTENSION_SECTIONS {
                    return Err(DecodeError::TooLong {
                        what: "extension sections",
                        len: MAX_EXTENSION_SECTIONS as u64 + 1,
                        limit: MAX_EXTENSION_SECTIONS,
                    }
                    .into());
                }
                parts.extensions.push(ExtensionSection {
                    section_type: ty,
                    body: body.to_vec(),
                });
                continue;
            }
        }
        if !b.is_empty() {
            return Err(TableError::NotCanonical(
                "bytes after the last field of a section",
            ));
        }
    }
    if !has_domain {
        return Err(TableError::MissingSection("domain"));
    }
    Ok(parts)
}

/// A reader that accepts only shortest-form varints.
struct Strict<'a> {
    buf: &'a [u8],
}

impl<'a> Strict<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn varint(&mut self, what: &'static str) -> Result<u64, TableError> {
        match varint::decode(self.buf)? {
            Some((value, len)) => {
                if varint::encoded_len(value) != len {
                    return Err(TableError::NotCanonical("integer not in its shortest form"));
                }
                self.buf = &self.buf[len..];
                Ok(value)
            }
            None => Err(DecodeError::Truncated { what }.into()),
        }
    }

    fn take(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], TableError> {
        if self.buf.len() < len {
            return Err(DecodeError::Truncated { what }.into());
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    fn bytes(&mut self, what: &'static str, limit: usize) -> Result<&'a [u8], TableError> {
        let len = self.varint(what)?;
        if len > limit as u64 {
            return Err(DecodeError::TooLong { what, len, limit }.into());
        }
        self.take(len as usize, what)
    }

    fn str(&mut self, what: &'static str, limit: usize) -> Result<&'a str, TableError> {
        std::str::from_utf8(self.bytes(what, limit)?)
            .map_err(|_| DecodeError::InvalidUtf8 { what }.into())
    }

    /// An id below `limit`.
    fn id(&mut self, what: &'static str, limit: usize) -> Result<u32, TableError> {
        let v = self.varint(what)?;
        if v >= limit as u64 {
            return Err(DecodeError::InvalidValue {
                what,
                reason: "out of range",
            }
            .into());
        }
        Ok(v as u32)
    }

    /// A number that fits in a `u32`.
    fn u32(&mut self, what: &'static str) -> Result<u32, TableError> {
        let v = self.varint(what)?;
        if v > u64::from(u32::MAX) {
            return Err(DecodeError::InvalidValue {
                what,
                reason: "out of range",
            }
            .into());
        }
        Ok(v as u32)
    }

    fn group(&mut self) -> Result<GroupId, TableError> {
        Ok(GroupId(self.id("group id", MAX_GROUPS)? as u16))
    }

    fn relation(&mut self) -> Result<Relation, TableError> {
        Relation::from_code(self.varint("relation")?).ok_or(
            DecodeError::InvalidValue {
                what: "relation",
                reason: "not 0, 1 or 2",
            }
            .into(),
        )
    }

    fn effect(&mut self) -> Result<Effect, TableError> {
        Effect::from_code(self.varint("effect")?).ok_or(
            DecodeError::InvalidValue {
                what: "effect",
                reason: "not 0 or 1",
            }
            .into(),
        )
    }

    /// A count `<= limit`, then that many items. A count larger than the bytes left (every item
    /// takes at least one byte) is rejected before any item is read.
    fn list<T>(
        &mut self,
        what: &'static str,
        limit: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, TableError>,
    ) -> Result<Vec<T>, TableError> {
        let count = self.varint(what)?;
        if count > limit as u64 {
            return Err(DecodeError::TooLong {
                what,
                len: count,
                limit,
            }
            .into());
        }
        if count > self.buf.len() as u64 {
            return Err(DecodeError::Truncated { what }.into());
        }
        if count == 0 {
            return Err(TableError::NotCanonical("empty list section"));
        }
        // Capacity from the count only up to a small bound: the count is the peer's word.
        let mut out = Vec::with_capacity((count as usize).min(1024));
        for _ in 0..count {
            out.push(item(self)?);
        }
        Ok(out)
    }
}
