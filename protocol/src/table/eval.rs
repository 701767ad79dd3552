//! Evaluation helpers for the gateway: group sets per connection, columns per capability, and
//! the per-request bit test.

use super::{CapabilityId, Effect, GroupId, Limit, NameMatch, Relation, Table, MAX_GROUPS};
use crate::spiffe::{Principal, PrincipalKind, SpiffeId};

const WORDS: usize = MAX_GROUPS / 64;

/// A set of groups: a bitset of [`MAX_GROUPS`] bits. Copy, 32 bytes, no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct GroupSet([u64; WORDS]);

impl GroupSet {
    /// No group.
    pub const EMPTY: GroupSet = GroupSet([0; WORDS]);

    /// Adds `group`.
    #[inline]
    pub fn insert(&mut self, group: GroupId) {
        let g = usize::from(group.0) % MAX_GROUPS;
        self.0[g / 64] |= 1 << (g % 64);
    }

    /// Removes `group`.
    #[inline]
    pub fn remove(&mut self, group: GroupId) {
        let g = usize::from(group.0) % MAX_GROUPS;
        self.0[g / 64] &= !(1 << (g % 64));
    }

    /// Whether `group` is in the set.
    #[inline]
    pub fn contains(&self, group: GroupId) -> bool {
        let g = usize::from(group.0);
        g < MAX_GROUPS && self.0[g / 64] & (1 << (g % 64)) != 0
    }

    /// Whether the set is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// Whether the two sets share a group.
    #[inline]
    pub fn intersects(&self, other: &GroupSet) -> bool {
        let mut any = 0;
        for i in 0..WORDS {
            any |= self.0[i] & other.0[i];
        }
        any != 0
    }

    /// The groups in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = GroupId> + '_ {
        (0..MAX_GROUPS)
            .filter(|&g| self.0[g / 64] & (1 << (g % 64)) != 0)
            .map(|g| GroupId(g as u16))
    }
}

/// The decision of every group about one capability and one relation: which groups allow it and
/// which deny it (a group is in at most one of the two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Column {
    /// Groups whose most specific matching rule allows.
    pub allow: GroupSet,
    /// Groups whose most specific matching rule denies.
    pub deny: GroupSet,
}

/// Whether a caller in `groups` passes `column`: some group of the caller allows and none
/// denies. Bit operations only.
#[inline]
pub fn allowed(groups: &GroupSet, column: &Column) -> bool {
    let mut allow = 0;
    let mut deny = 0;
    for i in 0..WORDS {
        allow |= groups.0[i] & column.allow.0[i];
        deny |= groups.0[i] & column.deny.0[i];
    }
    (allow != 0) & (deny == 0)
}

impl Table {
    /// The groups of principal `id`: every group with a membership rule matching it. Empty for
    /// an ID of another trust domain. Cost: a binary search among exact rules and a scan of
    /// the prefix rules of the ID's kind; meant to run once per connection.
    pub fn groups_of(&self, id: &SpiffeId) -> GroupSet {
        let mut set = GroupSet::EMPTY;
        let parts = self.parts();
        if id.trust_domain() != parts.domain {
            return set;
        }
        let (kind, name): (PrincipalKind, &str) = match id.principal() {
            Principal::Agent(n) => (PrincipalKind::Agent, n),
            Principal::Gateway(n) => (PrincipalKind::Gateway, n),
            Principal::Control => (PrincipalKind::Control, ""),
        };
        let members = &parts.members;
        // Members are sorted by (kind, match, name, group): exact matches of `name` are one run,
        // the prefix rules of `kind` another.
        let start = members.partition_point(|m| {
            (
                m.pattern.kind,
                m.pattern.name_match,
                m.pattern.name.as_str(),
            ) < (kind, NameMatch::Exact, name)
        });
        for m in &members[start..] {
            if m.pattern.kind != kind
                || m.pattern.name_match != NameMatch::Exact
                || m.pattern.name != name
            {
                break;
            }
            set.insert(m.group);
        }
        let start = members.partition_point(|m| {
            (m.pattern.kind, m.pattern.name_match) < (kind, NameMatch::Prefix)
        });
        for m in &members[start..] {
            if m.pattern.kind != kind || m.pattern.name_match != NameMatch::Prefix {
                break;
            }
            if name.starts_with(m.pattern.name.as_str()) {
                set.insert(m.group);
            }
        }
        set
    }

    /// The invocation column of capability `name` (see [`Table::column`]).
    pub fn policy_column(&self, name: &str) -> Column {
        self.column(Relation::Invoke, name)
    }

    /// The column of capability `name` for `relation`: per group, the effect of its most
    /// specific matching rule (exact beats wildcard, longer prefix beats shorter, deny beats
    /// allow at equal specificity). Works for names the table never interned; meant to run once
    /// per capability when it first appears. Cost: a binary search plus a scan of the wildcard
    /// rules of `relation`.
    pub fn column(&self, relation: Relation, name: &str) -> Column {
        let parts = self.parts();
        // Specificity of the rule deciding each group so far: 0 none, 1 + prefix length for a
        // wildcard (at most 255).
        let mut rank = [0u16; MAX_GROUPS];
        let mut column = Column::default();
        let rules = &parts.wildcard_rules;
        let start = rules.partition_point(|r| r.relation < relation);
        for r in rules[start..].iter().take_while(|r| r.relation == relation) {
            let Some(prefix) = parts.patterns.get(r.pattern.0 as usize) else {
                continue;
            };
            if !name.starts_with(prefix.as_str()) {
                continue;
            }
            let g = usize::from(r.group.0) % MAX_GROUPS;
            let specificity = 1 + prefix.len() as u16;
            if specificity > rank[g] || (specificity == rank[g] && r.effect == Effect::Deny) {
                rank[g] = specificity;
                decide(&mut column, r.group, r.effect);
            }
        }
        if let Some(cap) = self.capability_id(name) {
            for r in self.exact_rules_of(relation, cap) {
                decide(&mut column, r.group, r.effect);
            }
        }
        column
    }

    /// The bridge groups: a caller in any of them may invoke on behalf of another identity.
    pub fn bridges(&self) -> GroupSet {
        let mut set = GroupSet::EMPTY;
        for &g in &self.parts().bridges {
            set.insert(g);
        }
        set
    }

    /// The rate limit of a caller in `groups`: the smallest `per_second` and the smallest
    /// `burst` among its groups' limits; `None` when no group of the caller is limited.
    pub fn rate_limit_of(&self, groups: &GroupSet) -> Option<Limit> {
        let mut out: Option<Limit> = None;
        for r in &self.parts().rate_limits {
            if groups.contains(r.group) {
                let l = out.get_or_insert(Limit {
                    per_second: r.per_second,
                    burst: r.burst,
                });
                l.per_second = l.per_second.min(r.per_second);
                l.burst = l.burst.min(r.burst);
            }
        }
        out
    }

    fn exact_rules_of(
        &self,
        relation: Relation,
        cap: CapabilityId,
    ) -> impl Iterator<Item = &super::ExactRule> {
        let rules = &self.parts().exact_rules;
        let start = rules.partition_point(|r| (r.relation, r.capability) < (relation, cap));
        rules[start..]
            .iter()
            .take_while(move |r| r.relation == relation && r.capability == cap)
    }
}

fn decide(column: &mut Column, group: GroupId, effect: Effect) {
    match effect {
        Effect::Allow => {
            column.allow.insert(group);
            column.deny.remove(group);
        }
        Effect::Deny => {
            column.deny.insert(group);
            column.allow.remove(group);
        }
    }
}
