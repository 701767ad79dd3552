//! The table compiler: a pure function from a [`DomainConfig`] to a [`Table`].
//!
//! It reads no file, clock or randomness, and does not depend on the order of any list in the
//! configuration (group members, patterns, rules, gateways, the capability catalog): every
//! list is sorted and deduplicated into the table's canonical order. So the same domain always
//! compiles to the same bytes and the same [`Generation`](dmsc_protocol::table::Generation).
//!
//! What it does:
//! - interns group names (in byte order) to [`GroupId`]s, capability names named exactly
//!   anywhere (catalog, `advertise`, `discover`, `invoke`) to [`CapabilityId`]s, and wildcard
//!   prefixes to [`PatternId`]s;
//! - turns each group's `members` into membership rules, `advertise` and `discover` into allow
//!   rules of those relations, and each `[[invoke]]` into allow or deny rules for each of its
//!   groups;
//! - resolves an allow and a deny with the same group and pattern to the deny (equal
//!   specificity), so each (relation, pattern, group) has one rule;
//! - carries each group's rate limit (burst defaulting to the rate).

use std::collections::HashMap;

use dmsc_protocol::card::validate_capability_name;
use dmsc_protocol::spiffe::{validate_name, validate_trust_domain};
use dmsc_protocol::table::{
    group_name_problem, CapabilityId, CapabilityPattern, Effect, ExactRule, GroupId,
    IdentityPattern, Membership, PatternId, RateLimit, Relation, Table, TableError, TableParts,
    WildcardRule, MAX_GROUPS,
};
use thiserror::Error;
use toml::Spanned;

use crate::config::{self, DomainConfig, Invalid};

/// Why a configuration did not compile.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CompileError {
    /// A value of the configuration is not valid.
    #[error(transparent)]
    Config(#[from] Invalid),
    /// The compiled table breaks a limit of the table format (too many capabilities, rules or
    /// bytes).
    #[error("the compiled table is not valid: {0}")]
    Table(#[from] TableError),
}

/// Compiles a domain configuration into a table generation.
pub fn compile(config: &DomainConfig) -> Result<Table, CompileError> {
    let domain = config.domain.name.get_ref().as_str();
    validate_trust_domain(domain).map_err(|e| invalid("domain.name", &config.domain.name, e))?;
    if config.domain.trust_anchor.get_ref().trim().is_empty() {
        return Err(invalid(
            "domain.trust_anchor",
            &config.domain.trust_anchor,
            "must name a PEM file",
        )
        .into());
    }

    let mut gateways = Vec::with_capacity(config.gateway.len());
    for (i, g) in config.gateway.iter().enumerate() {
        validate_name("gateway id", g.id.get_ref())
            .map_err(|e| invalid(format!("gateway[{i}].id"), &g.id, e))?;
        gateways.push((g.id.get_ref().as_str(), i));
    }
    gateways.sort_unstable();
    if let Some(w) = gateways.windows(2).find(|w| w[0].0 == w[1].0) {
        let i = w[0].1.max(w[1].1);
        let id = &config.gateway[i].id;
        return Err(invalid(format!("gateway[{i}].id"), id, "duplicate gateway id").into());
    }

    if config.groups.len() > MAX_GROUPS {
        let key = config
            .groups
            .keys()
            .nth(MAX_GROUPS)
            .map_or(0..0, |k| k.span());
        return Err(Invalid {
            key: "groups".into(),
            span: key,
            reason: format!("more than {MAX_GROUPS} groups"),
        }
        .into());
    }
    // BTreeMap order is byte order of the names, which is the table's group order.
    let group_names: Vec<&str> = config.groups.keys().map(|k| k.get_ref().as_str()).collect();
    for key in config.groups.keys() {
        if let Some(reason) = group_name_problem(key.get_ref()) {
            return Err(invalid(format!("groups.{}", key.get_ref()), key, reason).into());
        }
    }
    let group_id = |name: &str| {
        group_names
            .binary_search(&name)
            .ok()
            .map(|i| GroupId(i as u16))
    };

    let mut members = Vec::new();
    let mut rules = Rules::default();
    let mut rate_limits = Vec::new();
    let mut bridges = Vec::new();
    for (gi, (name, group)) in config.groups.iter().enumerate() {
        let gid = GroupId(gi as u16);
        if group.bridge {
            bridges.push(gid);
        }
        let name = name.get_ref();
        for (i, m) in group.members.iter().enumerate() {
            let pattern = IdentityPattern::parse(domain, m.get_ref())
                .map_err(|e| invalid(format!("groups.{name}.members[{i}]"), m, e))?;
            members.push(Membership {
                pattern,
                group: gid,
            });
        }
        for (relation, key, list) in [
            (Relation::Advertise, "advertise", &group.advertise),
            (Relation::Discover, "discover", &group.discover),
        ] {
            for (i, p) in list.iter().enumerate() {
                rules
                    .add(relation, gid, Effect::Allow, p)
                    .map_err(|e| invalid(format!("groups.{name}.{key}[{i}]"), p, e))?;
            }
        }
        if let Some(rl) = &group.rate_limit {
            let r = rl.get_ref();
            let burst = r.burst.unwrap_or(r.per_second);
            if r.per_second == 0 || burst == 0 {
                return Err(invalid(
                    format!("groups.{name}.rate_limit"),
                    rl,
                    "per_second and burst must be at least 1",
                )
                .into());
            }
            rate_limits.push(RateLimit {
                group: gid,
                per_second: r.per_second,
                burst,
            });
        }
    }

    for (i, rule) in config.invoke.iter().enumerate() {
        let effect = match rule.effect {
            config::Effect::Allow => Effect::Allow,
            config::Effect::Deny => Effect::Deny,
        };
        if rule.groups.is_empty() || rule.capabilities.is_empty() {
            return Err(Invalid {
                key: format!("invoke[{i}]"),
                span: rule.groups.first().map_or(0..0, |g| g.span()),
                reason: "needs at least one group and one capability pattern".into(),
            }
            .into());
        }
        for (j, g) in rule.groups.iter().enumerate() {
            let gid = group_id(g.get_ref()).ok_or_else(|| {
                invalid(
                    format!("invoke[{i}].groups[{j}]"),
                    g,
                    format!("no group named {:?}", g.get_ref()),
                )
            })?;
            for (k, p) in rule.capabilities.iter().enumerate() {
                rules
                    .add(Relation::Invoke, gid, effect, p)
                    .map_err(|e| invalid(format!("invoke[{i}].capabilities[{k}]"), p, e))?;
            }
        }
    }

    let mut catalog = Vec::with_capacity(config.capabilities.len());
    for (i, c) in config.capabilities.iter().enumerate() {
        validate_capability_name(c.get_ref())
            .map_err(|e| invalid(format!("capabilities[{i}]"), c, e))?;
        catalog.push(c.get_ref().as_str());
    }

    members.sort_unstable();
    members.dedup();
    rate_limits.sort_unstable();
    let (capabilities, patterns, exact_rules, wildcard_rules) = rules.intern(catalog);
    let parts = TableParts {
        domain: domain.to_owned(),
        gateways: gateways.iter().map(|(g, _)| (*g).to_owned()).collect(),
        groups: group_names.iter().map(|&g| g.to_owned()).collect(),
        members,
        capabilities,
        patterns,
        exact_rules,
        wildcard_rules,
        rate_limits,
        bridges,
        extensions: Vec::new(),
    };
    Ok(Table::new(parts)?)
}

/// Rules as collected: capability names and prefixes interned in order of first appearance
/// (ids renumbered into byte order by [`Rules::intern`]).
#[derive(Default)]
struct Rules<'a> {
    names: Interner<'a>,
    prefixes: Interner<'a>,
    exact: Vec<ExactRule>,
    wildcard: Vec<WildcardRule>,
}

impl<'a> Rules<'a> {
    fn add(
        &mut self,
        relation: Relation,
        group: GroupId,
        effect: Effect,
        pattern: &'a Spanned<String>,
    ) -> Result<(), dmsc_protocol::table::PatternError> {
        match CapabilityPattern::parse_borrowed(pattern.get_ref())? {
            (name, false) => self.exact.push(ExactRule {
                relation,
                capability: CapabilityId(self.names.id(name)),
                group,
                effect,
            }),
            (prefix, true) => self.wildcard.push(WildcardRule {
                relation,
                pattern: PatternId(self.prefixes.id(prefix)),
                group,
                effect,
            }),
        }
        Ok(())
    }

    /// Renumbers names and prefixes into byte order, sorts the rules and resolves duplicates
    /// (deny wins): the table's lists.
    #[allow(clippy::type_complexity)]
    fn intern(
        mut self,
        catalog: Vec<&'a str>,
    ) -> (Vec<String>, Vec<String>, Vec<ExactRule>, Vec<WildcardRule>) {
        for name in catalog {
            self.names.id(name);
        }
        let (names, name_ids) = self.names.sorted();
        let (prefixes, prefix_ids) = self.prefixes.sorted();
        for r in &mut self.exact {
            r.capability = CapabilityId(name_ids[r.capability.0 as usize]);
        }
        for r in &mut self.wildcard {
            r.pattern = PatternId(prefix_ids[r.pattern.0 as usize]);
        }
        let mut exact = self.exact;
        exact.sort_unstable();
        // Sorted by (relation, capability, group, effect) with Allow < Deny: of each key keep
        // the deny if there is one.
        exact.dedup_by(|later, earlier| {
            let same = (later.relation, later.capability, later.group)
                == (earlier.relation, earlier.capability, earlier.group);
            if same {
                earlier.effect = earlier.effect.max(later.effect);
            }
            same
        });
        let mut wildcard = self.wildcard;
        wildcard.sort_unstable();
        wildcard.dedup_by(|later, earlier| {
            let same = (later.relation, later.pattern, later.group)
                == (earlier.relation, earlier.pattern, earlier.group);
            if same {
                earlier.effect = earlier.effect.max(later.effect);
            }
            same
        });
        (names, prefixes, exact, wildcard)
    }
}

/// Strings to provisional dense ids, in order of first appearance.
#[derive(Default)]
struct Interner<'a> {
    ids: HashMap<&'a str, u32>,
    strings: Vec<&'a str>,
}

impl<'a> Interner<'a> {
    fn id(&mut self, s: &'a str) -> u32 {
        let next = self.strings.len() as u32;
        *self.ids.entry(s).or_insert_with(|| {
            self.strings.push(s);
            next
        })
    }

    /// The strings in byte order, and for each provisional id its final id (its position in
    /// that order). Deterministic whatever the hash map's iteration order, which is not used.
    fn sorted(self) -> (Vec<String>, Vec<u32>) {
        let mut order: Vec<u32> = (0..self.strings.len() as u32).collect();
        order.sort_unstable_by_key(|&i| self.strings[i as usize]);
        let mut final_id = vec![0; order.len()];
        for (position, &provisional) in order.iter().enumerate() {
            final_id[provisional as usize] = position as u32;
        }
        let strings = order
            .iter()
            .map(|&i| self.strings[i as usize].to_owned())
            .collect();
        (strings, final_id)
    }
}

fn invalid<T>(key: impl Into<String>, at: &Spanned<T>, reason: impl ToString) -> Invalid {
    Invalid {
        key: key.into(),
        span: at.span(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests;
