//! The worked examples of `docs/CONTROL.md` section 6.12 (`dmsc-ctl/1`): every byte string
//! there is what `ctl::encode_frame` produces for the frame described, and `ctl::decode_frame`
//! gives the frame back. The byte strings are written out here and also read from the document
//! (the `<!-- example: NAME -->` blocks), so the two cannot drift apart.

use dmsc_protocol::ctl::{
    decode_frame, encode_frame, CloseCode, Frame, Hello, NackCode, Push, PushBody, Rejection,
    Status, MAX_FRAME_BYTES, MAX_PUSH_BYTES, VERSION,
};
use dmsc_protocol::table::sections::{apply_delta, diff, section_version, SectionRef};
use dmsc_protocol::table::{Generation, Table};

/// The smallest valid table, for trust domain `dmsc.local` (`docs/CONTROL.md` section 3.7).
const TABLE_1: &str = "44 4d 54 42 01 01 0b 0a 64 6d 73 63 2e 6c 6f 63 61 6c";
/// Its generation (SHA-256 of `TABLE_1`).
const GEN_1: &str = "18a398b57012657378df2343d1c8e957255a31eb35539fa5e948f2d2a65c85aa";
/// The version of its one section, `DOMAIN` (SHA-256 of the body `0a 64 6d ... 6c`).
const DOMAIN_VERSION: &str = "584bc14dd7314543cbda3794d7cb5d5a81d53758f6deaf88a24a8f5ccd748173";
/// The body of a `GATEWAYS` section listing `gw1`.
const GATEWAYS_BODY: &str = "01 03 67 77 31";
/// The generation of `TABLE_1` plus that `GATEWAYS` section.
const GEN_2: &str = "b892f665fbb06d27b66eb393232317b4e09f59cf12e0e9b25ea139cbf50106d3";

const HELLO: &str = "
01 12 01 03 67 77 31 0a 64 6d 73 63 2e 6c 6f 63
61 6c 00 00";

const HELLO_HELD: &str = "
01 40 53 01 03 67 77 31 0a 64 6d 73 63 2e 6c 6f
63 61 6c 01 18 a3 98 b5 70 12 65 73 78 df 23 43
d1 c8 e9 57 25 5a 31 eb 35 53 9f a5 e9 48 f2 d2
a6 5c 85 aa 01 01 58 4b c1 4d d7 31 45 43 cb da
37 94 d7 cb 5d 5a 81 d5 37 58 f6 de af 88 a2 4a
8f 5c cd 74 81 73";

const PUSH_SNAPSHOT: &str = "
02 35 01 18 a3 98 b5 70 12 65 73 78 df 23 43 d1
c8 e9 57 25 5a 31 eb 35 53 9f a5 e9 48 f2 d2 a6
5c 85 aa 00 12 44 4d 54 42 01 01 0b 0a 64 6d 73
63 2e 6c 6f 63 61 6c";

const ACK: &str = "
03 21 01 ab ab ab ab ab ab ab ab ab ab ab ab ab
ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab ab
ab ab ab";

const PUSH_DELTA: &str = "
02 40 4b 02 b8 92 f6 65 fb b0 6d 27 b6 6e b3 93
23 23 17 b4 e0 9f 59 cf 12 e0 e9 b2 5e a1 39 cb
f5 01 06 d3 01 18 a3 98 b5 70 12 65 73 78 df 23
43 d1 c8 e9 57 25 5a 31 eb 35 53 9f a5 e9 48 f2
d2 a6 5c 85 aa 01 02 05 01 03 67 77 31 00";

const NACK: &str = "
04 32 02 b8 92 f6 65 fb b0 6d 27 b6 6e b3 93 23
23 17 b4 e0 9f 59 cf 12 e0 e9 b2 5e a1 39 cb f5
01 06 d3 01 01 00 0d 62 61 73 65 20 6e 6f 74 20
68 65 6c 64";

const STATUS: &str = "
05 40 41 02 03 02 1f 73 70 69 66 66 65 3a 2f 2f
64 6d 73 63 2e 6c 6f 63 61 6c 2f 61 67 65 6e 74
2f 61 6c 69 63 65 1d 73 70 69 66 66 65 3a 2f 2f
64 6d 73 63 2e 6c 6f 63 61 6c 2f 61 67 65 6e 74
2f 62 6f 62";

const UNKNOWN: &str = "21 02 aa bb";

fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

fn hash(text: &str) -> [u8; 32] {
    let bytes: Vec<u8> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect();
    bytes.try_into().expect("32 bytes")
}

/// Encodes `frame`, compares with `bytes`, and decodes `bytes` back to `frame`.
fn check(name: &str, frame: Frame<'_>, bytes: &str) {
    let bytes = hex(bytes);
    let mut out = Vec::new();
    encode_frame(&frame, &mut out);
    assert_eq!(out, bytes, "{name}: encoding differs from the example");
    let (back, used) = decode_frame(&bytes)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .unwrap_or_else(|| panic!("{name}: incomplete"));
    assert_eq!(used, bytes.len(), "{name}: bytes used");
    assert_eq!(back, frame, "{name}: decoded frame");
}

#[test]
fn the_tables_and_generations_of_the_examples() {
    let t1 = Table::decode(&hex(TABLE_1)).unwrap();
    assert_eq!(t1.generation(), Generation(hash(GEN_1)));
    assert_eq!(t1.section_versions(), vec![(1, hash(DOMAIN_VERSION))]);
    assert_eq!(section_version(&hex(TABLE_1)[7..]), hash(DOMAIN_VERSION));

    // The delta of the `PUSH_DELTA` example turns table 1 into generation 2.
    let gateways = hex(GATEWAYS_BODY);
    let upserts = [SectionRef {
        ty: 2,
        body: &gateways,
    }];
    let t2 = apply_delta(&t1, &upserts, &[]).unwrap();
    assert_eq!(t2.generation(), Generation(hash(GEN_2)));
    assert_eq!(t2.encoded().len(), 25);
    // And it is what the control plane computes from the HELLO's section versions.
    let (up, removes) = diff(&t1.section_versions(), &t2);
    assert_eq!(up, upserts);
    assert!(removes.is_empty());
}

#[test]
fn hello_holding_nothing() {
    check(
        "ctl_hello",
        Frame::Hello(Hello {
            version: VERSION,
            gateway_id: "gw1".into(),
            domain: "dmsc.local".into(),
            held: None,
            sections: vec![],
        }),
        HELLO,
    );
}

#[test]
fn hello_holding_the_smallest_table() {
    check(
        "ctl_hello_held",
        Frame::Hello(Hello {
            version: VERSION,
            gateway_id: "gw1".into(),
            domain: "dmsc.local".into(),
            held: Some(Generation(hash(GEN_1))),
            sections: vec![(1, hash(DOMAIN_VERSION))],
        }),
        HELLO_HELD,
    );
}

#[test]
fn push_snapshot() {
    let table = hex(TABLE_1);
    check(
        "ctl_push_snapshot",
        Frame::Push(Push {
            nonce: 1,
            generation: Generation(hash(GEN_1)),
            body: PushBody::Snapshot(&table),
        }),
        PUSH_SNAPSHOT,
    );
}

#[test]
fn ack() {
    check(
        "ctl_ack",
        Frame::Ack {
            nonce: 1,
            generation: Generation([0xab; 32]),
        },
        ACK,
    );
}

#[test]
fn push_delta() {
    let gateways = hex(GATEWAYS_BODY);
    check(
        "ctl_push_delta",
        Frame::Push(Push {
            nonce: 2,
            generation: Generation(hash(GEN_2)),
            body: PushBody::Delta {
                base: Generation(hash(GEN_1)),
                upserts: vec![SectionRef {
                    ty: 2,
                    body: &gateways,
                }],
                removes: vec![],
            },
        }),
        PUSH_DELTA,
    );
}

#[test]
fn nack() {
    check(
        "ctl_nack",
        Frame::Nack {
            nonce: 2,
            generation: Generation(hash(GEN_2)),
            code: NackCode::BaseMismatch,
            rejections: vec![Rejection {
                resource: 0,
                reason: "base not held".into(),
            }],
        },
        NACK,
    );
}

#[test]
fn status() {
    check(
        "ctl_status",
        Frame::Status(Status {
            agents: 2,
            capabilities: 3,
            identities: vec![
                "spiffe://dmsc.local/agent/alice".into(),
                "spiffe://dmsc.local/agent/bob".into(),
            ],
        }),
        STATUS,
    );
}

#[test]
fn unknown_extension_frames_are_skipped() {
    let bytes = hex(UNKNOWN);
    assert_eq!(decode_frame(&bytes), Ok(Some((Frame::Unknown(0x21), 4))));
}

#[test]
fn receiving_rules_of_section_6_3() {
    let close = |bytes: &[u8]| decode_frame(bytes).unwrap_err().close_code();
    // Unknown types below 0x20, including 0x00, are violations.
    assert_eq!(close(&[0x00, 0x00]), CloseCode::ProtocolViolation);
    assert_eq!(close(&[0x06, 0x00]), CloseCode::ProtocolViolation);
    assert_eq!(close(&[0x1f, 0x00]), CloseCode::ProtocolViolation);
    // Bytes after the last field are a violation.
    let mut ack = hex(ACK);
    ack[1] += 1;
    ack.push(0);
    assert_eq!(close(&ack), CloseCode::ProtocolViolation);
    // A length over the type's limit is refused from the prefix alone, for any type.
    let mut prefix = vec![0x03];
    prefix.extend_from_slice(&(0x8000_0000u32 | (MAX_FRAME_BYTES as u32 + 1)).to_be_bytes());
    assert_eq!(close(&prefix), CloseCode::FrameTooLarge);
    let mut prefix = vec![0x21];
    prefix.extend_from_slice(&(0x8000_0000u32 | (MAX_FRAME_BYTES as u32 + 1)).to_be_bytes());
    assert_eq!(close(&prefix), CloseCode::FrameTooLarge);
    let mut prefix = vec![0x02];
    prefix.extend_from_slice(&(0x8000_0000u32 | (MAX_PUSH_BYTES as u32 + 1)).to_be_bytes());
    assert_eq!(close(&prefix), CloseCode::FrameTooLarge);
    let mut prefix = vec![0x02];
    prefix.extend_from_slice(&(0x8000_0000u32 | MAX_PUSH_BYTES as u32).to_be_bytes());
    assert_eq!(decode_frame(&prefix), Ok(None));
    // Every strict prefix of an example asks for more bytes.
    let push = hex(PUSH_DELTA);
    for cut in 0..push.len() {
        assert_eq!(decode_frame(&push[..cut]), Ok(None), "prefix {cut}");
    }
}

#[test]
fn the_document_holds_the_same_bytes() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/CONTROL.md");
    let text = std::fs::read_to_string(path).expect("docs/CONTROL.md");
    for (name, bytes) in [
        ("ctl_hello", HELLO),
        ("ctl_hello_held", HELLO_HELD),
        ("ctl_push_snapshot", PUSH_SNAPSHOT),
        ("ctl_ack", ACK),
        ("ctl_push_delta", PUSH_DELTA),
        ("ctl_nack", NACK),
        ("ctl_status", STATUS),
        ("ctl_unknown", UNKNOWN),
    ] {
        let marker = format!("<!-- example: {name} -->");
        let start = text
            .find(&marker)
            .unwrap_or_else(|| panic!("{marker} missing from docs/CONTROL.md"));
        let block = &text[start + marker.len()..];
        let block = block
            .trim_start()
            .strip_prefix("```")
            .unwrap_or_else(|| panic!("{name}: no code block after the marker"));
        let end = block.find("```").expect("end of code block");
        assert_eq!(hex(&block[..end]), hex(bytes), "{name}: document differs");
    }
}
