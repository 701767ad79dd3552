//! The request headers of `docs/PROTOCOL.md` section 18.8 that use the optional trailing fields
//! (`target_session`, `on_behalf_of`, `via`): read from the document, decoded, and encoded back
//! to the same bytes. (The older examples are checked by `interop/python/test_vectors.py`.)

use dmsc_protocol::header::RequestHeader;
use dmsc_protocol::limits::MAX_HEADER_BYTES;

fn example(name: &str) -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");
    let text = std::fs::read_to_string(path).expect("docs/PROTOCOL.md");
    let marker = format!("<!-- example: {name} -->");
    let start = text
        .find(&marker)
        .unwrap_or_else(|| panic!("{marker} missing from docs/PROTOCOL.md"));
    let block = text[start + marker.len()..]
        .trim_start()
        .strip_prefix("```")
        .unwrap_or_else(|| panic!("{name}: no code block after the marker"));
    let end = block.find("```").expect("end of code block");
    block[..end]
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

fn round_trip(name: &str, expected: RequestHeader<'_>) {
    let bytes = example(name);
    let (decoded, used) = RequestHeader::decode(&bytes, MAX_HEADER_BYTES)
        .expect("well formed")
        .expect("complete");
    assert_eq!(used, bytes.len(), "{name}");
    assert_eq!(decoded, expected, "{name}");
    let mut encoded = Vec::new();
    expected.encode(&mut encoded).unwrap();
    assert_eq!(encoded, bytes, "{name}");
}

#[test]
fn optional_fields_as_documented() {
    let alice = "spiffe://dmsc.local/agent/alice";
    let base = RequestHeader {
        deadline_ms: 1500,
        content_type: "text/plain",
        ..RequestHeader::new("echo")
    };
    round_trip(
        "request_delegated",
        RequestHeader {
            target_session: 2,
            on_behalf_of: alice,
            ..base
        },
    );
    round_trip(
        "request_forwarded_via",
        RequestHeader {
            hop_count: 1,
            caller: alice,
            via: "spiffe://dmsc.local/agent/a2a-front",
            ..base
        },
    );
}
