//! Agent cards: the published fixtures parse, malformed cards are rejected with the offending
//! field's path, cards round-trip through `to_json`, and no input makes the parser panic.

use dmsc_protocol::card::{
    validate_capability_name, AgentCard, AgentInterface, CardError, Skill, MAX_CARD_BYTES,
    MAX_SKILLS, MAX_STRING_BYTES, MAX_TAGS_PER_SKILL,
};
use proptest::prelude::*;
use serde_json::{json, Value};

const AIR_TICKETING_V03: &[u8] =
    include_bytes!("fixtures/agent-cards/air_ticketing_agent.v0.3.json");
const CURRENCY_V03: &[u8] = include_bytes!("fixtures/agent-cards/currency_agent.v0.3.json");
const CURRENCY_V10: &[u8] = include_bytes!("fixtures/agent-cards/currency_agent.v1.0.json");

fn error_of(card: Value) -> String {
    AgentCard::from_json(card.to_string().as_bytes())
        .expect_err("card should be rejected")
        .to_string()
}

fn valid_card() -> Value {
    json!({
        "name": "Agent",
        "description": "d",
        "version": "1",
        "skills": [
            {"id": "a", "name": "A", "tags": ["x", "y"]},
            {"id": "b", "name": "B"},
            {"id": "c", "name": "C", "tags": ["p", "q"]}
        ]
    })
}

#[test]
fn air_ticketing_v03_fixture() {
    let card = AgentCard::from_json(AIR_TICKETING_V03).unwrap();
    assert_eq!(card.name, "Air Ticketing Agent");
    assert_eq!(card.version, "1.0.0");
    assert_eq!(card.url.as_deref(), Some("http://localhost:10103/"));
    assert_eq!(card.preferred_transport, None);
    assert!(card.interfaces.is_empty());
    assert_eq!(
        card.capabilities().collect::<Vec<_>>(),
        ["book_air_tickets"]
    );
    let skill = &card.skills[0];
    assert_eq!(skill.name, "Book Air Tickets");
    assert_eq!(skill.tags, ["Book air tickets"]);
    assert_eq!(skill.examples.len(), 1);
    assert_eq!(skill.effective_input_modes(&card), ["text", "text/plain"]);
    assert_eq!(skill.effective_output_modes(&card), ["text", "text/plain"]);
}

#[test]
fn currency_v03_fixture() {
    let card = AgentCard::from_json(CURRENCY_V03).unwrap();
    assert_eq!(card.name, "Currency Conversion Agent");
    assert_eq!(card.description, "Currency Conversion Agent");
    assert_eq!(card.url.as_deref(), Some("http://localhost:10999"));
    assert_eq!(card.preferred_transport.as_deref(), Some("JSONRPC"));
    assert_eq!(card.protocol_version.as_deref(), Some("0.3.0"));
    assert_eq!(
        card.capabilities().collect::<Vec<_>>(),
        ["currency_conversion"]
    );
    assert_eq!(card.skills[0].tags, ["currency", "conversion"]);
    assert_eq!(
        card.default_input_modes,
        ["text", "text/plain", "application/json"]
    );
}

#[test]
fn currency_v10_fixture() {
    let card = AgentCard::from_json(CURRENCY_V10).unwrap();
    assert_eq!(card.url, None);
    assert_eq!(card.preferred_transport, None);
    assert_eq!(
        card.interfaces,
        [
            AgentInterface {
                url: "http://localhost:10999".into(),
                protocol_binding: "JSONRPC".into(),
                protocol_version: Some("1.0".into()),
            },
            AgentInterface {
                url: "http://localhost:10999".into(),
                protocol_binding: "JSONRPC".into(),
                protocol_version: Some("0.3".into()),
            },
        ]
    );
    assert_eq!(
        card.capabilities().collect::<Vec<_>>(),
        ["currency_conversion"]
    );
    assert_eq!(card.skills[0].tags, ["currency", "conversion"]);
    // Both shapes of the same agent describe the same skills.
    assert_eq!(
        card.skills,
        AgentCard::from_json(CURRENCY_V03).unwrap().skills
    );
}

#[test]
fn fixtures_round_trip() {
    for bytes in [AIR_TICKETING_V03, CURRENCY_V03, CURRENCY_V10] {
        let card = AgentCard::from_json(bytes).unwrap();
        let json = card.to_json();
        assert_eq!(AgentCard::from_json(&json).unwrap(), card);
        // The output is v1.0-shaped.
        let value: Value = serde_json::from_slice(&json).unwrap();
        assert!(value["supportedInterfaces"].is_array());
    }
}

#[test]
fn built_card_round_trips() {
    let card = AgentCard::new("Weather", "Forecasts", "2.1")
        .with_interface(AgentInterface {
            url: "quic://gw.local:4433".into(),
            protocol_binding: "DMSC".into(),
            protocol_version: None,
        })
        .with_default_modes(vec!["text/plain".into()], vec!["application/json".into()])
        .with_skill(
            Skill::new("forecast", "Forecast")
                .with_description("Tomorrow's weather")
                .with_tags(["weather", "forecast"])
                .with_examples(["Will it rain in Oslo?"])
                .with_input_modes(["text/plain", "application/json"]),
        )
        .with_skill(Skill::new("alerts", "Alerts").with_output_modes(["text/html"]));
    card.validate().unwrap();
    let back = AgentCard::from_json(&card.to_json()).unwrap();
    assert_eq!(back, card);
    assert_eq!(
        back.skills[0].effective_input_modes(&back),
        ["text/plain", "application/json"]
    );
    assert_eq!(
        back.skills[0].effective_output_modes(&back),
        ["application/json"]
    );
    assert_eq!(back.skills[1].effective_input_modes(&back), ["text/plain"]);
    assert_eq!(back.skills[1].effective_output_modes(&back), ["text/html"]);
    assert_eq!(
        back.capabilities().collect::<Vec<_>>(),
        ["forecast", "alerts"]
    );
}

#[test]
fn unknown_fields_are_ignored() {
    let mut card = valid_card();
    card["securitySchemes"] = json!({"bearer": {"type": "http"}});
    card["skills"][0]["futureField"] = json!([1, 2, 3]);
    assert!(AgentCard::from_json(card.to_string().as_bytes()).is_ok());
}

#[test]
fn errors_name_the_field() {
    let mut card = valid_card();
    card["skills"][0].as_object_mut().unwrap().remove("id");
    assert_eq!(error_of(card), "skills[0].id: missing");

    let mut card = valid_card();
    card["skills"][2]["tags"][1] = json!(7);
    assert_eq!(
        error_of(card),
        "skills[2].tags[1]: expected a string, found number"
    );

    let mut card = valid_card();
    card["name"] = json!(42);
    assert_eq!(error_of(card), "name: expected a string, found number");

    let mut card = valid_card();
    card.as_object_mut().unwrap().remove("name");
    assert_eq!(error_of(card), "name: missing");

    let mut card = valid_card();
    card["name"] = json!("");
    assert_eq!(error_of(card), "name: must not be empty");

    let mut card = valid_card();
    card.as_object_mut().unwrap().remove("skills");
    assert_eq!(error_of(card), "skills: missing");

    let mut card = valid_card();
    card["skills"] = json!([]);
    assert!(error_of(card).starts_with("skills: must list at least one skill"));

    let mut card = valid_card();
    card["skills"] = json!({"id": "a"});
    assert_eq!(error_of(card), "skills: expected an array, found object");

    let mut card = valid_card();
    card["skills"][1] = json!("b");
    assert_eq!(
        error_of(card),
        "skills[1]: expected an object, found string"
    );

    let mut card = valid_card();
    card["skills"][1].as_object_mut().unwrap().remove("name");
    assert_eq!(error_of(card), "skills[1].name: missing");

    let mut card = valid_card();
    card["skills"][1]["id"] = json!("has space");
    assert!(error_of(card).starts_with("skills[1].id: contains whitespace"));

    let mut card = valid_card();
    card["skills"][1]["id"] = json!("");
    assert_eq!(error_of(card), "skills[1].id: must not be empty");

    let mut card = valid_card();
    card["skills"][2]["id"] = json!("a");
    assert_eq!(
        error_of(card),
        "skills[2].id: duplicate skill id \"a\" (already used by skills[0])"
    );

    let mut card = valid_card();
    card["defaultInputModes"] = json!(["text", null]);
    assert_eq!(
        error_of(card),
        "defaultInputModes[1]: expected a string, found null"
    );

    let mut card = valid_card();
    card["supportedInterfaces"] = json!([{"url": "http://h", "protocolBinding": true}]);
    assert_eq!(
        error_of(card),
        "supportedInterfaces[0].protocolBinding: expected a string, found boolean"
    );

    let mut card = valid_card();
    card["skills"][0]["description"] = json!("x".repeat(MAX_STRING_BYTES + 1));
    assert!(error_of(card).starts_with("skills[0].description: is 4097 bytes long"));

    let mut card = valid_card();
    card["skills"][0]["tags"] = json!(vec!["t"; MAX_TAGS_PER_SKILL + 1]);
    assert_eq!(error_of(card), "skills[0].tags: more than 32 entries");
}

#[test]
fn limits_are_enforced() {
    let skills: Vec<Value> = (0..=MAX_SKILLS)
        .map(|i| json!({"id": format!("s{i}"), "name": "n"}))
        .collect();
    let card = json!({"name": "a", "skills": skills});
    assert_eq!(
        AgentCard::from_json(card.to_string().as_bytes()).unwrap_err(),
        CardError::TooMany {
            path: "skills".into(),
            limit: MAX_SKILLS
        }
    );

    let big = vec![b' '; MAX_CARD_BYTES + 1];
    assert_eq!(
        AgentCard::from_json(&big).unwrap_err(),
        CardError::TooLarge {
            len: MAX_CARD_BYTES + 1,
            limit: MAX_CARD_BYTES
        }
    );

    let card = AgentCard::new("a", "b", "c").with_skill(Skill::new("x".repeat(256), "X"));
    assert!(
        matches!(card.validate(), Err(CardError::Field { path, .. }) if path == "skills[0].id")
    );
}

#[test]
fn invalid_json_reports_position() {
    let err = AgentCard::from_json(b"{\"name\": \"a\",\n \"skills\": [}").unwrap_err();
    assert!(
        matches!(err, CardError::Json { line: 2, .. }),
        "unexpected {err:?}"
    );
    assert!(matches!(
        AgentCard::from_json(b"\xff\xfe"),
        Err(CardError::Json { .. })
    ));
    assert!(matches!(
        AgentCard::from_json(b"{\"name\":\"\xff\",\"skills\":[]}"),
        Err(CardError::Json { .. })
    ));
}

#[test]
fn capability_name_rules() {
    assert!(validate_capability_name("book_air_tickets").is_ok());
    assert!(validate_capability_name("tab\tin").is_err());
    assert!(validate_capability_name("new\nline").is_err());
}

/// A JSON value built from a small grammar, biased towards card-like shapes.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[a-z_ \t]{0,12}".prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        let key = prop_oneof![
            Just("name".to_owned()),
            Just("id".to_owned()),
            Just("skills".to_owned()),
            Just("tags".to_owned()),
            Just("url".to_owned()),
            Just("supportedInterfaces".to_owned()),
            Just("additionalInterfaces".to_owned()),
            Just("protocolBinding".to_owned()),
            Just("transport".to_owned()),
            Just("defaultInputModes".to_owned()),
            Just("inputModes".to_owned()),
            "[a-zA-Z]{1,8}",
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One edit of a card: replace the value at a path (given as indexes into object keys and
/// array elements), or remove it.
#[derive(Debug, Clone)]
enum Mutation {
    Replace(Vec<usize>, Value),
    Remove(Vec<usize>),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    let path = prop::collection::vec(0usize..16, 0..5);
    prop_oneof![
        (path.clone(), arb_json()).prop_map(|(p, v)| Mutation::Replace(p, v)),
        path.prop_map(Mutation::Remove),
    ]
}

fn apply(value: &mut Value, mutation: &Mutation) {
    let (path, replacement) = match mutation {
        Mutation::Replace(path, v) => (path, Some(v)),
        Mutation::Remove(path) => (path, None),
    };
    let Some((last, init)) = path.split_last() else {
        if let Some(v) = replacement {
            *value = v.clone();
        }
        return;
    };
    let mut target = value;
    for &step in init {
        target = match target {
            Value::Array(items) if !items.is_empty() => {
                let len = items.len();
                &mut items[step % len]
            }
            Value::Object(map) if !map.is_empty() => {
                let len = map.len();
                let Some((_, v)) = map.iter_mut().nth(step % len) else {
                    return;
                };
                v
            }
            _ => return,
        };
    }
    match target {
        Value::Array(items) if !items.is_empty() => {
            let at = last % items.len();
            match replacement {
                Some(v) => items[at] = v.clone(),
                None => {
                    items.remove(at);
                }
            }
        }
        Value::Object(map) if !map.is_empty() => {
            let Some(key) = map.keys().nth(last % map.len()).cloned() else {
                return;
            };
            match replacement {
                Some(v) => {
                    map.insert(key, v.clone());
                }
                None => {
                    map.remove(&key);
                }
            }
        }
        _ => {}
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = AgentCard::from_json(&bytes);
    }

    #[test]
    fn mutated_cards_never_panic(
        fixture in 0usize..3,
        mutations in prop::collection::vec(arb_mutation(), 1..6),
    ) {
        let source = [AIR_TICKETING_V03, CURRENCY_V03, CURRENCY_V10][fixture];
        let mut value: Value = serde_json::from_slice(source).unwrap();
        for mutation in &mutations {
            apply(&mut value, mutation);
        }
        let text = value.to_string();
        if let Ok(card) = AgentCard::from_json(text.as_bytes()) {
            // Whatever is accepted must survive the round trip and validate.
            prop_assert_eq!(card.validate(), Ok(()));
            prop_assert_eq!(AgentCard::from_json(&card.to_json()), Ok(card));
        }
        // Truncations of the mutated text are fine too.
        for cut in [text.len() / 3, text.len() / 2, text.len().saturating_sub(1)] {
            if let Some(prefix) = text.get(..cut) {
                let _ = AgentCard::from_json(prefix.as_bytes());
            }
        }
    }

    #[test]
    fn arbitrary_json_never_panics(value in arb_json()) {
        let _ = AgentCard::from_json(value.to_string().as_bytes());
    }
}
