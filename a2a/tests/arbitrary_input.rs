//! Whatever JSON arrives, from a caller or from an agent, the bridge's parsing and conversion
//! answer with a value or a typed error: they never panic.

use dmsc_a2a::binding::{self, Call, LineBuffer};
use dmsc_a2a::convert;
use dmsc_a2a::method::Method;
use dmsc_a2a::sse::SseParser;
use dmsc_a2a::task_id;
use dmsc_agent::SessionId;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Arbitrary JSON, a few levels deep, biased towards the member names A2A uses.
fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[a-z~0-9 ]{0,12}".prop_map(Value::from),
    ];
    let key = prop_oneof![
        Just("message".to_owned()),
        Just("parts".to_owned()),
        Just("kind".to_owned()),
        Just("text".to_owned()),
        Just("data".to_owned()),
        Just("file".to_owned()),
        Just("role".to_owned()),
        Just("task".to_owned()),
        Just("taskId".to_owned()),
        Just("id".to_owned()),
        Just("status".to_owned()),
        Just("statusUpdate".to_owned()),
        Just("artifactUpdate".to_owned()),
        Just("artifact".to_owned()),
        Just("history".to_owned()),
        Just("configuration".to_owned()),
        Just("referenceTaskIds".to_owned()),
        Just("result".to_owned()),
        Just("error".to_owned()),
        "[a-z]{1,6}",
    ];
    leaf.prop_recursive(4, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|members| Value::Object(members.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

const METHODS: [Method; 6] = [
    Method::SendMessage,
    Method::SendStreamingMessage,
    Method::GetTask,
    Method::CancelTask,
    Method::SubscribeToTask,
    Method::ListTasks,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn conversions_never_panic(value in arb_json(), m in 0..METHODS.len()) {
        let method = METHODS[m];
        let _ = convert::params_v03_to_v1(method, &value);
        let _ = convert::result_v1_to_v03(method, &value);
        let _ = convert::event_v1_to_v03(&value);
        let mut params = value.clone();
        let _ = task_id::strip(method, &mut params, SessionId(7));
        let _ = task_id::referenced(method, &value);
        let mut answer = json!({"result": value});
        task_id::qualify_answer(method, &mut answer, SessionId(7));
    }

    #[test]
    fn decoding_never_panics(value in arb_json(), bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let text = value.to_string();
        let _ = Call::decode(text.as_bytes());
        let _ = Call::decode(&bytes);
        let _ = binding::parse_answer(text.as_bytes());
        let _ = binding::parse_answer(&bytes);
        let mut lines = LineBuffer::new(64);
        let mut out = Vec::new();
        let _ = lines.push(&bytes, &mut out);
        let mut sse = SseParser::new(64);
        let mut events = Vec::new();
        let _ = sse.push(&bytes, &mut events);
    }

    #[test]
    fn qualified_ids_round_trip(session in 1..u64::MAX >> 2, id in "[a-z0-9~-]{1,20}") {
        let qualified = task_id::qualify(SessionId(session), &id);
        prop_assert_eq!(task_id::session_of(&qualified), Some(SessionId(session)));
        let mut params = json!({"id": qualified});
        task_id::strip(Method::GetTask, &mut params, SessionId(session)).unwrap();
        prop_assert_eq!(&params["id"], &json!(id));
    }
}
