use proptest::prelude::*;

use dmsc_protocol::spiffe::SpiffeId;
use dmsc_protocol::table::{allowed, Relation};

use super::*;

const EXAMPLE: &str = include_str!("../../domain.example.toml");

fn example() -> DomainConfig {
    DomainConfig::from_toml("domain.example.toml", EXAMPLE).unwrap()
}

fn may(t: &Table, relation: Relation, who: &str, cap: &str) -> bool {
    let id = SpiffeId::agent(&t.parts().domain, who).unwrap();
    allowed(&t.groups_of(&id), &t.column(relation, cap))
}

#[test]
fn the_example_compiles_to_the_documented_policy() {
    let t = compile(&example()).unwrap();
    let p = t.parts();
    assert_eq!(p.groups, ["billing", "frontend", "fx", "quarantine"]);
    assert_eq!(p.gateways, ["edge-1", "edge-2"]);
    assert_eq!(
        p.capabilities,
        ["billing.invoice", "billing.refund", "fx.convert"]
    );
    assert_eq!(p.patterns, ["", "billing.", "fx."]);
    use Relation::*;
    assert!(may(&t, Invoke, "web", "billing.invoice"));
    assert!(!may(&t, Invoke, "web", "billing.refund"));
    assert!(may(&t, Invoke, "web", "fx.convert"));
    assert!(!may(&t, Invoke, "web-canary", "fx.convert"));
    assert!(may(&t, Invoke, "billing-eu", "fx.convert"));
    assert!(!may(&t, Invoke, "billing-eu", "fx.history"));
    assert!(!may(&t, Invoke, "stranger", "fx.convert"));
    assert!(may(&t, Advertise, "billing-eu", "billing.new_thing"));
    assert!(!may(&t, Advertise, "billing-eu", "fx.convert"));
    assert!(may(&t, Discover, "web", "anything"));
    assert!(!may(&t, Discover, "fx-rates", "anything"));
    let limit = t.rate_limit_of(&t.groups_of(&SpiffeId::agent("example.org", "web").unwrap()));
    assert_eq!(limit.map(|l| (l.per_second, l.burst)), Some((1000, 1000)));
}

#[test]
fn development_domain_allows_everything_to_every_agent() {
    let t = compile(&DomainConfig::development()).unwrap();
    for relation in Relation::ALL {
        assert!(may(&t, relation, "anyone", "any.capability"));
    }
    let gw = SpiffeId::gateway("dmsc.local", "gw1").unwrap();
    assert!(t.groups_of(&gw).is_empty());
}

#[test]
fn same_input_same_bytes_and_pinned_generation() {
    let a = compile(&example()).unwrap();
    let b = compile(&example()).unwrap();
    assert_eq!(a.encoded(), b.encoded());
    assert_eq!(a.generation(), b.generation());
    // Pinned: the example's generation changes only with the example or the format.
    assert_eq!(a.generation().to_string(), EXAMPLE_GENERATION);
    // A change of policy is a new generation.
    let mut changed = example();
    changed.invoke.pop();
    assert_ne!(compile(&changed).unwrap().generation(), a.generation());
}

const EXAMPLE_GENERATION: &str = "4fe6edad5b256d2e91aa062756795b83e64aeeeab2367a17fb410bd1297efd1f";

#[test]
fn allow_and_deny_of_the_same_pattern_compile_to_deny() {
    let text = "[domain]\nname = \"d\"\ntrust_anchor = \"x\"\n[groups.g]\nmembers = [\"spiffe://d/agent/*\"]\n\
        [[invoke]]\neffect = \"allow\"\ngroups = [\"g\"]\ncapabilities = [\"x\", \"y*\"]\n\
        [[invoke]]\neffect = \"deny\"\ngroups = [\"g\"]\ncapabilities = [\"x\", \"y*\"]\n\
        [[invoke]]\neffect = \"allow\"\ngroups = [\"g\"]\ncapabilities = [\"x\", \"y*\"]\n";
    let t = compile(&DomainConfig::from_toml("t", text).unwrap()).unwrap();
    assert_eq!(t.parts().exact_rules.len(), 1);
    assert_eq!(t.parts().wildcard_rules.len(), 1);
    assert!(!may(&t, Relation::Invoke, "a", "x"));
    assert!(!may(&t, Relation::Invoke, "a", "yz"));
}

/// Permutes every list whose order carries no meaning.
fn shuffled(config: &DomainConfig, seed: &[prop::sample::Index]) -> DomainConfig {
    let mut c = config.clone();
    let mut n = 0;
    let mut next = || {
        n += 1;
        seed[n % seed.len()]
    };
    fn perm<T>(v: &mut [T], mut pick: impl FnMut() -> prop::sample::Index) {
        for i in (1..v.len()).rev() {
            v.swap(i, pick().index(i + 1));
        }
    }
    perm(&mut c.gateway, &mut next);
    perm(&mut c.invoke, &mut next);
    perm(&mut c.capabilities, &mut next);
    for rule in &mut c.invoke {
        perm(&mut rule.groups, &mut next);
        perm(&mut rule.capabilities, &mut next);
    }
    for group in c.groups.values_mut() {
        perm(&mut group.members, &mut next);
        perm(&mut group.advertise, &mut next);
        perm(&mut group.discover, &mut next);
        // Repeating an entry changes nothing either.
        if let Some(first) = group.members.first().cloned() {
            group.members.push(first);
        }
    }
    c
}

proptest! {
    #[test]
    fn list_order_does_not_change_the_table(seed in prop::collection::vec(any::<prop::sample::Index>(), 1..32)) {
        let base = example();
        let want = compile(&base).unwrap();
        let got = compile(&shuffled(&base, &seed)).unwrap();
        prop_assert_eq!(got.encoded(), want.encoded());
    }
}

#[test]
fn bridge_groups_compile_to_the_bridges_section() {
    let text = r#"
[domain]
name = "example.org"
trust_anchor = "ca.pem"

[groups.doors]
members = ["spiffe://example.org/agent/a2a-front*"]
bridge = true

[groups.people]
members = ["spiffe://example.org/agent/alice"]
"#;
    let t = compile(&DomainConfig::from_toml("domain.toml", text).unwrap()).unwrap();
    assert_eq!(t.parts().bridges, [GroupId(0)]);
    let groups = |who: &str| t.groups_of(&SpiffeId::agent("example.org", who).unwrap());
    assert!(t.bridges().intersects(&groups("a2a-front-1")));
    assert!(!t.bridges().intersects(&groups("alice")));
    // Round trip through the wire format keeps it.
    let decoded = Table::decode(t.encoded()).unwrap();
    assert_eq!(decoded.parts().bridges, [GroupId(0)]);
}
