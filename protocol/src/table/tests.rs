use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::spiffe::SpiffeId;

const D: &str = "dmsc.local";

fn agent(name: &str) -> SpiffeId {
    SpiffeId::agent(D, name).unwrap()
}

/// A table from text patterns: groups with members, and rules `(relation, group, pattern,
/// effect)`, interned the way the compiler does.
fn table(
    groups: &[(&str, &[&str])],
    rules: &[(Relation, &str, &str, Effect)],
    limits: &[(&str, u32, u32)],
) -> Table {
    let mut parts = TableParts {
        domain: D.into(),
        groups: groups.iter().map(|(g, _)| g.to_string()).collect(),
        ..Default::default()
    };
    parts.groups.sort();
    let gid = |name: &str| GroupId(parts.groups.iter().position(|g| g == name).unwrap() as u16);
    let mut members = BTreeSet::new();
    for (g, pats) in groups {
        for p in *pats {
            members.insert(Membership {
                pattern: IdentityPattern::parse(D, p).unwrap(),
                group: gid(g),
            });
        }
    }
    parts.members = members.into_iter().collect();
    let mut caps = BTreeSet::new();
    let mut prefixes = BTreeSet::new();
    for (_, _, p, _) in rules {
        match CapabilityPattern::parse(p).unwrap() {
            CapabilityPattern::Exact(c) => caps.insert(c),
            CapabilityPattern::Prefix(c) => prefixes.insert(c),
        };
    }
    parts.capabilities = caps.into_iter().collect();
    parts.patterns = prefixes.into_iter().collect();
    let mut exact = BTreeMap::new();
    let mut wild = BTreeMap::new();
    for &(relation, g, p, effect) in rules {
        let group = gid(g);
        match CapabilityPattern::parse(p).unwrap() {
            CapabilityPattern::Exact(c) => {
                let cap = CapabilityId(parts.capabilities.binary_search(&c).unwrap() as u32);
                let e = exact.entry((relation, cap, group)).or_insert(effect);
                *e = (*e).max(effect);
            }
            CapabilityPattern::Prefix(c) => {
                let pat = PatternId(parts.patterns.binary_search(&c).unwrap() as u32);
                let e = wild.entry((relation, pat, group)).or_insert(effect);
                *e = (*e).max(effect);
            }
        }
    }
    parts.exact_rules = exact
        .into_iter()
        .map(|((relation, capability, group), effect)| ExactRule {
            relation,
            capability,
            group,
            effect,
        })
        .collect();
    parts.wildcard_rules = wild
        .into_iter()
        .map(|((relation, pattern, group), effect)| WildcardRule {
            relation,
            pattern,
            group,
            effect,
        })
        .collect();
    let mut rl: Vec<RateLimit> = limits
        .iter()
        .map(|&(g, per_second, burst)| RateLimit {
            group: gid(g),
            per_second,
            burst,
        })
        .collect();
    rl.sort();
    parts.rate_limits = rl;
    Table::new(parts).unwrap()
}

fn may_invoke(t: &Table, who: &str, cap: &str) -> bool {
    allowed(&t.groups_of(&agent(who)), &t.policy_column(cap))
}

use Effect::{Allow, Deny};
use Relation::{Advertise, Discover, Invoke};

#[test]
fn default_is_deny() {
    let t = table(&[("all", &["spiffe://dmsc.local/agent/*"])], &[], &[]);
    assert!(!may_invoke(&t, "a", "x"));
    let t = table(
        &[("all", &["spiffe://dmsc.local/agent/*"])],
        &[(Invoke, "all", "*", Allow)],
        &[],
    );
    assert!(may_invoke(&t, "a", "x"));
    // A principal of no group passes nothing.
    let t = table(
        &[("some", &["spiffe://dmsc.local/agent/a"])],
        &[(Invoke, "some", "*", Allow)],
        &[],
    );
    assert!(may_invoke(&t, "a", "x"));
    assert!(!may_invoke(&t, "b", "x"));
}

#[test]
fn more_specific_rule_wins_within_a_group() {
    let t = table(
        &[("g", &["spiffe://dmsc.local/agent/*"])],
        &[
            (Invoke, "g", "*", Allow),
            (Invoke, "g", "billing.*", Deny),
            (Invoke, "g", "billing.read*", Allow),
            (Invoke, "g", "billing.read_secret", Deny),
        ],
        &[],
    );
    assert!(may_invoke(&t, "a", "weather"));
    assert!(!may_invoke(&t, "a", "billing.pay"));
    assert!(may_invoke(&t, "a", "billing.read_invoice"));
    assert!(!may_invoke(&t, "a", "billing.read_secret"));
    // Exact beats wildcard in the other direction too.
    let t = table(
        &[("g", &["spiffe://dmsc.local/agent/*"])],
        &[(Invoke, "g", "*", Deny), (Invoke, "g", "ping", Allow)],
        &[],
    );
    assert!(may_invoke(&t, "a", "ping"));
    assert!(!may_invoke(&t, "a", "pingx"));
}

#[test]
fn deny_wins_ties_and_vetoes_across_groups() {
    let t = table(
        &[("g", &["spiffe://dmsc.local/agent/*"])],
        &[(Invoke, "g", "x", Allow), (Invoke, "g", "x", Deny)],
        &[],
    );
    assert!(!may_invoke(&t, "a", "x"));
    let t = table(
        &[
            ("everyone", &["spiffe://dmsc.local/agent/*"]),
            ("ops", &["spiffe://dmsc.local/agent/ops-*"]),
            ("quarantine", &["spiffe://dmsc.local/agent/ops-bad"]),
        ],
        &[
            (Invoke, "everyone", "public.*", Allow),
            (Invoke, "ops", "*", Allow),
            (Invoke, "quarantine", "*", Deny),
        ],
        &[],
    );
    assert!(may_invoke(&t, "web", "public.x"));
    assert!(!may_invoke(&t, "web", "admin.x"));
    assert!(may_invoke(&t, "ops-1", "admin.x"));
    assert!(!may_invoke(&t, "ops-bad", "admin.x"));
    assert!(!may_invoke(&t, "ops-bad", "public.x"));
}

#[test]
fn relations_are_independent() {
    let t = table(
        &[("g", &["spiffe://dmsc.local/agent/*"])],
        &[
            (Advertise, "g", "own.*", Allow),
            (Discover, "g", "*", Allow),
        ],
        &[],
    );
    let g = t.groups_of(&agent("a"));
    assert!(allowed(&g, &t.column(Advertise, "own.x")));
    assert!(!allowed(&g, &t.column(Advertise, "other")));
    assert!(allowed(&g, &t.column(Discover, "other")));
    assert!(!allowed(&g, &t.policy_column("own.x")));
}

#[test]
fn membership_by_exact_and_prefix_patterns() {
    let t = table(
        &[
            (
                "a",
                &[
                    "spiffe://dmsc.local/agent/alpha",
                    "spiffe://dmsc.local/agent/be*",
                ],
            ),
            ("b", &["spiffe://dmsc.local/agent/beta"]),
            ("gw", &["spiffe://dmsc.local/gateway/*"]),
            ("ctl", &["spiffe://dmsc.local/control"]),
        ],
        &[],
        &[],
    );
    let ids = |s: &GroupSet| {
        s.iter()
            .map(|g| t.parts().groups[usize::from(g.0)].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&t.groups_of(&agent("alpha"))), ["a"]);
    assert_eq!(ids(&t.groups_of(&agent("beta"))), ["a", "b"]);
    assert_eq!(ids(&t.groups_of(&agent("bet"))), ["a"]);
    assert!(t.groups_of(&agent("alphab")).is_empty());
    assert!(t.groups_of(&agent("gw-1")).is_empty());
    assert_eq!(
        ids(&t.groups_of(&SpiffeId::gateway(D, "gw-1").unwrap())),
        ["gw"]
    );
    assert_eq!(ids(&t.groups_of(&SpiffeId::control(D).unwrap())), ["ctl"]);
    // Another trust domain's principal belongs to nothing.
    assert!(t
        .groups_of(&SpiffeId::agent("other.org", "alpha").unwrap())
        .is_empty());
}

#[test]
fn rate_limit_is_the_smallest_of_the_callers_groups() {
    let t = table(
        &[
            ("a", &["spiffe://dmsc.local/agent/*"]),
            ("b", &["spiffe://dmsc.local/agent/x"]),
            ("c", &[]),
        ],
        &[],
        &[("a", 100, 10), ("b", 50, 20), ("c", 1, 1)],
    );
    assert_eq!(
        t.rate_limit_of(&t.groups_of(&agent("y"))),
        Some(Limit {
            per_second: 100,
            burst: 10
        })
    );
    assert_eq!(
        t.rate_limit_of(&t.groups_of(&agent("x"))),
        Some(Limit {
            per_second: 50,
            burst: 10
        })
    );
    assert_eq!(t.rate_limit_of(&GroupSet::EMPTY), None);
}

#[test]
fn identity_patterns() {
    for (text, ok) in [
        ("spiffe://dmsc.local/agent/a", true),
        ("spiffe://dmsc.local/agent/*", true),
        ("spiffe://dmsc.local/agent/a-*", true),
        ("spiffe://dmsc.local/gateway/gw*", true),
        ("spiffe://dmsc.local/control", true),
        ("spiffe://dmsc.local/control*", false),
        ("spiffe://dmsc.local/agent/a*b", false),
        ("spiffe://dmsc.local/agent/**", false),
        ("spiffe://dmsc.local/*", false),
        ("spiffe://dmsc.local/agent*", false),
        ("spiffe://dmsc.local/agent/", false),
        ("spiffe://other/agent/a", false),
        ("agent/a", false),
    ] {
        let parsed = IdentityPattern::parse(D, text);
        assert_eq!(parsed.is_ok(), ok, "{text}: {parsed:?}");
        if let Ok(p) = parsed {
            assert_eq!(p.to_text(D), text);
        }
    }
    assert!(matches!(
        IdentityPattern::parse(D, "spiffe://other/agent/a"),
        Err(PatternError::WrongDomain { .. })
    ));
}

#[test]
fn capability_patterns() {
    assert_eq!(
        CapabilityPattern::parse("*").unwrap(),
        CapabilityPattern::Prefix(String::new())
    );
    assert_eq!(
        CapabilityPattern::parse("a.b*").unwrap(),
        CapabilityPattern::Prefix("a.b".into())
    );
    assert_eq!(
        CapabilityPattern::parse("a.b").unwrap(),
        CapabilityPattern::Exact("a.b".into())
    );
    for bad in ["", "a*b", "**", "a b*", "a b", &"x".repeat(256)] {
        assert!(CapabilityPattern::parse(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        CapabilityPattern::parse("a.b*").unwrap().to_string(),
        "a.b*"
    );
}

#[test]
fn validate_rejects_dangling_ids_disorder_and_bad_names() {
    let good = table(
        &[("g", &["spiffe://dmsc.local/agent/*"])],
        &[(Invoke, "g", "x", Allow), (Invoke, "g", "y*", Allow)],
        &[("g", 1, 1)],
    )
    .parts()
    .clone();
    let mut p = good.clone();
    p.exact_rules[0].group = GroupId(1);
    assert!(matches!(
        validate(&p),
        Err(TableError::Invalid {
            section: "exact_rules",
            ..
        })
    ));
    let mut p = good.clone();
    p.exact_rules[0].capability = CapabilityId(1);
    assert!(validate(&p).is_err());
    let mut p = good.clone();
    p.wildcard_rules[0].pattern = PatternId(7);
    assert!(matches!(
        validate(&p),
        Err(TableError::Invalid {
            section: "wildcard_rules",
            ..
        })
    ));
    let mut p = good.clone();
    p.groups.push("a".into());
    assert!(matches!(
        validate(&p),
        Err(TableError::Invalid {
            section: "groups",
            index: 1,
            ..
        })
    ));
    let mut p = good.clone();
    p.capabilities.push("x".into());
    assert!(validate(&p).is_err());
    let mut p = good.clone();
    p.rate_limits[0].burst = 0;
    assert!(validate(&p).is_err());
    let mut p = good.clone();
    p.domain = "Bad Domain".into();
    assert!(validate(&p).is_err());
    let mut p = good.clone();
    p.members[0].pattern.name = "a/b".into();
    assert!(validate(&p).is_err());
    let mut p = good.clone();
    p.extensions.push(ExtensionSection {
        section_type: section::GROUPS,
        body: vec![1],
    });
    assert!(validate(&p).is_err());
    // Everything the encoder writes must be within the decoder's limits.
    let mut p = good.clone();
    p.gateways.push("g".repeat(256));
    assert!(matches!(
        validate(&p),
        Err(TableError::Invalid {
            section: "gateways",
            ..
        })
    ));
    let mut p = good.clone();
    p.members[0].pattern.name = "a".repeat(2049);
    p.members[0].pattern.name_match = NameMatch::Exact;
    assert!(matches!(
        validate(&p),
        Err(TableError::Invalid {
            section: "members",
            ..
        })
    ));
    assert_eq!(validate(&good), Ok(()));
    let t = Table::new(good).unwrap();
    assert_eq!(t.expect_domain(D), Ok(()));
    assert!(matches!(
        t.expect_domain("other"),
        Err(TableError::WrongDomain { .. })
    ));
}

fn minimal() -> Vec<u8> {
    Table::new(TableParts {
        domain: D.into(),
        ..Default::default()
    })
    .unwrap()
    .encoded()
    .to_vec()
}

#[test]
fn decoder_accepts_only_the_canonical_form() {
    let bytes = minimal();
    assert_eq!(bytes, b"DMTB\x01\x01\x0b\x0admsc.local");
    assert!(Table::decode(&bytes).is_ok());
    assert_eq!(Table::decode(b"DMTX\x01"), Err(TableError::BadMagic));
    assert_eq!(
        Table::decode(b"DMTB\x02"),
        Err(TableError::UnsupportedVersion(2))
    );
    assert_eq!(
        Table::decode(b"DMTB\x01"),
        Err(TableError::MissingSection("domain"))
    );
    // A two-byte encoding of the version.
    assert!(matches!(
        Table::decode(b"DMTB\x40\x01\x01\x0b\x0admsc.local"),
        Err(TableError::NotCanonical(_))
    ));
    // Trailing bytes inside the domain section.
    assert!(matches!(
        Table::decode(b"DMTB\x01\x01\x0c\x0admsc.localx"),
        Err(TableError::NotCanonical(_))
    ));
    // Repeated section.
    let mut twice = bytes.clone();
    twice.extend_from_slice(&bytes[5..]);
    assert!(matches!(
        Table::decode(&twice),
        Err(TableError::NotCanonical(_))
    ));
    // An empty list section.
    let mut empty = bytes.clone();
    empty.extend_from_slice(&[section::GROUPS as u8, 1, 0]);
    assert!(matches!(
        Table::decode(&empty),
        Err(TableError::NotCanonical(_))
    ));
    // A huge announced count is refused before anything is allocated for it.
    let mut huge = bytes.clone();
    huge.extend_from_slice(&[section::CAPABILITIES as u8, 4, 0x80, 0x1f, 0xff, 0xff]);
    assert!(matches!(
        Table::decode(&huge),
        Err(TableError::Decode(DecodeError::TooLong { .. }))
    ));
    let mut lying = bytes.clone();
    lying.extend_from_slice(&[section::CAPABILITIES as u8, 4, 0x80, 0x00, 0xff, 0xff]);
    assert!(matches!(
        Table::decode(&lying),
        Err(TableError::Decode(DecodeError::Truncated { .. }))
    ));
}

#[test]
fn unknown_sections_are_carried_through() {
    let mut bytes = minimal();
    bytes.extend_from_slice(&[0x20, 3, 1, 2, 3]);
    let t = Table::decode(&bytes).unwrap();
    assert_eq!(
        t.parts().extensions,
        [ExtensionSection {
            section_type: 0x20,
            body: vec![1, 2, 3]
        }]
    );
    assert_eq!(Table::new(t.parts().clone()).unwrap().encoded(), &bytes[..]);
}

#[test]
fn generation_is_sha256_of_the_encoding() {
    // FIPS 180-2 test vector.
    assert_eq!(
        Generation::of(b"abc").to_string(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let t = Table::decode(&minimal()).unwrap();
    assert_eq!(t.generation(), Generation::of(&minimal()));
}

#[test]
fn golden_generation() {
    // Pinned: any change to the encoding changes this hash and must be a deliberate format
    // change (a new FORMAT_VERSION or a new section type).
    let t = table(
        &[
            ("ops", &["spiffe://dmsc.local/agent/ops-*"]),
            ("web", &["spiffe://dmsc.local/agent/web"]),
        ],
        &[
            (Invoke, "ops", "*", Allow),
            (Invoke, "web", "billing.read", Allow),
            (Invoke, "web", "billing.*", Deny),
        ],
        &[("web", 100, 200)],
    );
    assert_eq!(t.generation().to_string(), GOLDEN);
}

const GOLDEN: &str = "7eb40e4d1c9b87b3c997c91c837a0b9f8766b85445f810452330c6498f50eb9b";

fn arb_parts() -> impl Strategy<Value = TableParts> {
    let names = || prop::collection::btree_set("[a-z][a-z0-9._-]{0,6}", 0..6);
    (
        prop::sample::select(vec!["dmsc.local", "a", "x-y.z"]),
        names(),
        names(),
        prop::collection::vec((0u64..3, 0u64..2, "[a-z0-9]{1,5}", any::<u16>()), 0..12),
        prop::collection::btree_set("[a-z.]{1,6}", 0..8),
        prop::collection::btree_set("[a-z.]{0,4}", 0..5),
        prop::collection::vec((0u64..3, any::<u32>(), any::<u16>(), 0u64..2), 0..16),
        prop::collection::vec((0u64..3, any::<u32>(), any::<u16>(), 0u64..2), 0..16),
        prop::collection::btree_map(any::<u16>(), (1u32.., 1u32..), 0..4),
        prop::collection::btree_map(
            10u64..100_000,
            prop::collection::vec(any::<u8>(), 1..8),
            0..3,
        ),
    )
        .prop_map(
            |(domain, gateways, groups, members, caps, pats, exact, wild, limits, ext)| {
                let groups: Vec<String> = groups.into_iter().collect();
                let capabilities: Vec<String> = caps.into_iter().collect();
                let patterns: Vec<String> = pats.into_iter().collect();
                let ng = groups.len() as u16;
                let mut parts = TableParts {
                    domain: domain.into(),
                    gateways: gateways.into_iter().collect(),
                    groups,
                    capabilities,
                    patterns,
                    extensions: ext
                        .into_iter()
                        .map(|(section_type, body)| ExtensionSection { section_type, body })
                        .collect(),
                    ..Default::default()
                };
                if ng == 0 {
                    return parts;
                }
                let mut m: Vec<Membership> = members
                    .into_iter()
                    .map(|(k, nm, name, g)| {
                        let kind = kind_from_code(k).unwrap();
                        let (name_match, name) = match kind {
                            PrincipalKind::Control => (NameMatch::Exact, String::new()),
                            _ => (NameMatch::from_code(nm).unwrap(), name),
                        };
                        Membership {
                            pattern: IdentityPattern {
                                kind,
                                name_match,
                                name,
                            },
                            group: GroupId(g % ng),
                        }
                    })
                    .collect();
                m.sort();
                m.dedup();
                parts.members = m;
                let nc = parts.capabilities.len() as u32;
                if nc > 0 {
                    let mut e: BTreeMap<_, _> = BTreeMap::new();
                    for (r, c, g, eff) in exact {
                        e.insert(
                            (
                                Relation::from_code(r).unwrap(),
                                CapabilityId(c % nc),
                                GroupId(g % ng),
                            ),
                            Effect::from_code(eff).unwrap(),
                        );
                    }
                    parts.exact_rules = e
                        .into_iter()
                        .map(|((relation, capability, group), effect)| ExactRule {
                            relation,
                            capability,
                            group,
                            effect,
                        })
                        .collect();
                }
                let np = parts.patterns.len() as u32;
                if np > 0 {
                    let mut w: BTreeMap<_, _> = BTreeMap::new();
                    for (r, p, g, eff) in wild {
                        w.insert(
                            (
                                Relation::from_code(r).unwrap(),
                                PatternId(p % np),
                                GroupId(g % ng),
                            ),
                            Effect::from_code(eff).unwrap(),
                        );
                    }
                    parts.wildcard_rules = w
                        .into_iter()
                        .map(|((relation, pattern, group), effect)| WildcardRule {
                            relation,
                            pattern,
                            group,
                            effect,
                        })
                        .collect();
                }
                let mut rl: BTreeMap<GroupId, RateLimit> = BTreeMap::new();
                for (g, (per_second, burst)) in limits {
                    let group = GroupId(g % ng);
                    rl.insert(
                        group,
                        RateLimit {
                            group,
                            per_second,
                            burst,
                        },
                    );
                }
                parts.rate_limits = rl.into_values().collect();
                // Some groups are bridges too (drawn from the same inputs).
                parts.bridges = parts
                    .rate_limits
                    .iter()
                    .filter(|r| r.per_second % 2 == 1)
                    .map(|r| r.group)
                    .collect();
                parts
            },
        )
}

proptest! {
    #[test]
    fn round_trip_and_stable_hash(parts in arb_parts()) {
        let t = Table::new(parts.clone()).unwrap();
        let d = Table::decode(t.encoded()).unwrap();
        prop_assert_eq!(d.parts(), &parts);
        prop_assert_eq!(d.generation(), t.generation());
        // Encoding twice gives the same bytes.
        prop_assert_eq!(Table::new(parts).unwrap().encoded().to_vec(), t.encoded().to_vec());
    }

    #[test]
    fn mutated_tables_never_panic_and_stay_canonical(
        parts in arb_parts(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = Table::new(parts).unwrap().encoded().to_vec();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        for candidate in [&bytes[..], &bytes[..cut.index(bytes.len() + 1)]] {
            if let Ok(t) = Table::decode(candidate) {
                // Whatever decodes re-encodes to exactly the bytes received.
                prop_assert_eq!(Table::new(t.parts().clone()).unwrap().encoded().to_vec(), candidate.to_vec());
                let _ = t.groups_of(&agent("a"));
                let _ = t.policy_column("a");
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = Table::decode(&bytes);
        let mut framed = b"DMTB\x01".to_vec();
        framed.extend_from_slice(&bytes);
        if let Ok(t) = Table::decode(&framed) {
            prop_assert_eq!(Table::new(t.parts().clone()).unwrap().encoded().to_vec(), framed.clone());
        }
    }

    #[test]
    fn column_matches_a_naive_evaluation(parts in arb_parts(), name in "[a-z.]{0,6}") {
        let t = Table::new(parts).unwrap();
        let col = t.column(Relation::Invoke, &name);
        let p = t.parts();
        for g in 0..p.groups.len() {
            // Naive: collect (specificity, effect) of every matching rule of group g.
            let mut best: Option<(usize, Effect)> = None;
            let mut consider = |spec: usize, eff: Effect| {
                best = match best {
                    Some((s, e)) if s > spec || (s == spec && e >= eff) => Some((s, e)),
                    _ => Some((spec, eff)),
                };
            };
            for r in p.wildcard_rules.iter().filter(|r| r.relation == Relation::Invoke && usize::from(r.group.0) == g) {
                let prefix = &p.patterns[r.pattern.0 as usize];
                if name.starts_with(prefix.as_str()) {
                    consider(1 + prefix.len(), r.effect);
                }
            }
            for r in p.exact_rules.iter().filter(|r| r.relation == Relation::Invoke && usize::from(r.group.0) == g) {
                if p.capabilities[r.capability.0 as usize] == name {
                    consider(usize::MAX, r.effect);
                }
            }
            let gid = GroupId(g as u16);
            prop_assert_eq!(col.allow.contains(gid), best.map(|b| b.1) == Some(Effect::Allow));
            prop_assert_eq!(col.deny.contains(gid), best.map(|b| b.1) == Some(Effect::Deny));
        }
    }
}
