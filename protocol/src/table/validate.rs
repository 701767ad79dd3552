//! The rules a table's contents must follow beyond its encoding.

use super::{
    NameMatch, TableError, TableParts, MAX_CAPABILITIES, MAX_EXACT_RULES, MAX_EXTENSION_SECTIONS,
    MAX_GATEWAYS, MAX_GROUPS, MAX_GROUP_NAME_BYTES, MAX_MEMBERS, MAX_PATTERNS, MAX_WILDCARD_RULES,
};
use crate::card::validate_capability_name;
use crate::limits::MAX_CAPABILITY_BYTES;
use crate::spiffe::{validate_name, validate_trust_domain, PrincipalKind, MAX_SPIFFE_ID_BYTES};

/// Checks `parts` against every rule of the format: limits on counts and names, well-formed
/// names and patterns, lists in canonical order without duplicates, ids that name an entry.
///
/// Errors name the list and the position of the first offending entry.
pub fn validate(parts: &TableParts) -> Result<(), TableError> {
    validate_trust_domain(&parts.domain).map_err(|e| invalid("domain", 0, e.to_string()))?;

    limit("gateways", parts.gateways.len(), MAX_GATEWAYS)?;
    for (i, id) in parts.gateways.iter().enumerate() {
        if id.len() > MAX_CAPABILITY_BYTES {
            return Err(invalid(
                "gateways",
                i,
                format!("gateway id is longer than {MAX_CAPABILITY_BYTES} bytes"),
            ));
        }
        validate_name("gateway id", id).map_err(|e| invalid("gateways", i, e.to_string()))?;
    }
    ascending("gateways", &parts.gateways, |a, b| a < b)?;

    limit("groups", parts.groups.len(), MAX_GROUPS)?;
    for (i, name) in parts.groups.iter().enumerate() {
        if let Some(reason) = group_name_problem(name) {
            return Err(invalid("groups", i, reason));
        }
    }
    ascending("groups", &parts.groups, |a, b| a < b)?;
    let groups = parts.groups.len();

    limit("members", parts.members.len(), MAX_MEMBERS)?;
    for (i, m) in parts.members.iter().enumerate() {
        group_in_range("members", i, m.group.0, groups)?;
        let p = &m.pattern;
        if p.name.len() > MAX_SPIFFE_ID_BYTES {
            return Err(invalid(
                "members",
                i,
                format!("name is longer than {MAX_SPIFFE_ID_BYTES} bytes"),
            ));
        }
        match (p.kind, p.name_match) {
            (PrincipalKind::Control, NameMatch::Exact) if p.name.is_empty() => {}
            (PrincipalKind::Control, _) => {
                return Err(invalid(
                    "members",
                    i,
                    "a control pattern has no name and no wildcard".into(),
                ))
            }
            (_, NameMatch::Exact) => validate_name("member name", &p.name)
                .map_err(|e| invalid("members", i, e.to_string()))?,
            // A prefix may be empty (`agent/*`); with any one character appended it must be a
            // valid name, which is what every name it matches starts with.
            (_, NameMatch::Prefix) => validate_name("member name prefix", &format!("{}x", p.name))
                .map_err(|e| invalid("members", i, e.to_string()))?,
        }
    }
    ascending("members", &parts.members, |a, b| a < b)?;

    limit("capabilities", parts.capabilities.len(), MAX_CAPABILITIES)?;
    for (i, name) in parts.capabilities.iter().enumerate() {
        validate_capability_name(name).map_err(|e| invalid("capabilities", i, e.to_string()))?;
    }
    ascending("capabilities", &parts.capabilities, |a, b| a < b)?;

    limit("patterns", parts.patterns.len(), MAX_PATTERNS)?;
    for (i, prefix) in parts.patterns.iter().enumerate() {
        if prefix.len() >= MAX_CAPABILITY_BYTES {
            return Err(invalid(
                "patterns",
                i,
                format!("prefix is longer than {} bytes", MAX_CAPABILITY_BYTES - 1),
            ));
        }
        if prefix.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(invalid(
                "patterns",
                i,
                "prefix holds whitespace or a control character".into(),
            ));
        }
    }
    ascending("patterns", &parts.patterns, |a, b| a < b)?;

    limit("exact_rules", parts.exact_rules.len(), MAX_EXACT_RULES)?;
    for (i, r) in parts.exact_rules.iter().enumerate() {
        group_in_range("exact_rules", i, r.group.0, groups)?;
        if r.capability.0 as usize >= parts.capabilities.len() {
            return Err(invalid(
                "exact_rules",
                i,
                format!("capability id {} names no capability", r.capability.0),
            ));
        }
    }
    ascending("exact_rules", &parts.exact_rules, |a, b| {
        (a.relation, a.capability, a.group) < (b.relation, b.capability, b.group)
    })?;

    limit(
        "wildcard_rules",
        parts.wildcard_rules.len(),
        MAX_WILDCARD_RULES,
    )?;
    for (i, r) in parts.wildcard_rules.iter().enumerate() {
        group_in_range("wildcard_rules", i, r.group.0, groups)?;
        if r.pattern.0 as usize >= parts.patterns.len() {
            return Err(invalid(
                "wildcard_rules",
                i,
                format!("pattern id {} names no pattern", r.pattern.0),
            ));
        }
    }
    ascending("wildcard_rules", &parts.wildcard_rules, |a, b| {
        (a.relation, a.pattern, a.group) < (b.relation, b.pattern, b.group)
    })?;

    limit("rate_limits", parts.rate_limits.len(), MAX_GROUPS)?;
    for (i, r) in parts.rate_limits.iter().enumerate() {
        group_in_range("rate_limits", i, r.group.0, groups)?;
        if r.per_second == 0 || r.burst == 0 {
            return Err(invalid(
                "rate_limits",
                i,
                "per_second and burst must be at least 1".into(),
            ));
        }
    }
    ascending("rate_limits", &parts.rate_limits, |a, b| a.group < b.group)?;

    limit("bridges", parts.bridges.len(), MAX_GROUPS)?;
    for (i, g) in parts.bridges.iter().enumerate() {
        group_in_range("bridges", i, g.0, groups)?;
    }
    ascending("bridges", &parts.bridges, |a, b| a < b)?;

    limit("extensions", parts.extensions.len(), MAX_EXTENSION_SECTIONS)?;
    for (i, e) in parts.extensions.iter().enumerate() {
        if e.section_type <= super::section::LAST_KNOWN || e.section_type > crate::varint::MAX {
            return Err(invalid(
                "extensions",
                i,
                format!("section type {} is not an extension type", e.section_type),
            ));
        }
        if e.body.is_empty() {
            return Err(invalid("extensions", i, "empty section body".into()));
        }
    }
    ascending("extensions", &parts.extensions, |a, b| {
        a.section_type < b.section_type
    })?;
    Ok(())
}

/// What is wrong with a group name, if anything: it must be 1 to [`MAX_GROUP_NAME_BYTES`] bytes
/// of ASCII letters, digits, `_`, `-`, `.`.
pub fn group_name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_GROUP_NAME_BYTES {
        return Some(format!(
            "group name must be 1 to {MAX_GROUP_NAME_BYTES} bytes"
        ));
    }
    name.chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        .map(|c| {
            format!("group name {name:?} contains {c:?} (allowed: letters, digits, '_', '-', '.')")
        })
}

fn invalid(section: &'static str, index: usize, reason: String) -> TableError {
    TableError::Invalid {
        section,
        index,
        reason,
    }
}

fn limit(section: &'static str, len: usize, max: usize) -> Result<(), TableError> {
    if len > max {
        return Err(invalid(
            section,
            max,
            format!("{len} entries, over the limit of {max}"),
        ));
    }
    Ok(())
}

fn group_in_range(
    section: &'static str,
    index: usize,
    group: u16,
    groups: usize,
) -> Result<(), TableError> {
    if usize::from(group) >= groups {
        return Err(invalid(
            section,
            index,
            format!("group id {group} names no group"),
        ));
    }
    Ok(())
}

/// Strictly ascending (`before(a, b)` for every neighbouring pair): canonical order and no
/// two entries with one key.
fn ascending<T>(
    section: &'static str,
    items: &[T],
    before: impl Fn(&T, &T) -> bool,
) -> Result<(), TableError> {
    match items.windows(2).position(|w| !before(&w[0], &w[1])) {
        None => Ok(()),
        Some(i) => Err(invalid(
            section,
            i + 1,
            "out of canonical order or a duplicate of the entry before".into(),
        )),
    }
}
