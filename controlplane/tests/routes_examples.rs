//! The worked examples of `docs/CONTROL.md` section 7.10 (domain routes): every byte string
//! there is checked against the encoder and the decoder, and the document is checked to hold the
//! same bytes (the `<!-- example: NAME -->` blocks), so the two cannot drift apart.

use dmsc_protocol::ctl::{decode_frame, encode_frame, Frame};
use dmsc_protocol::domain::{
    AgentChange, AgentReport, Provider, Report, ReportRejected, RouteCapability, RouteGateway,
    Routes, Skill, TrunkFigures, Trunks,
};

fn examples() -> Vec<(&'static str, Frame<'static>)> {
    vec![
        (
            "domain_report",
            Frame::Report(Report {
                reset: true,
                more: false,
                addresses: vec!["10.0.0.1:4433".into()],
                changes: vec![AgentChange::Up(AgentReport {
                    session: 1,
                    identity: "spiffe://dmsc.local/agent/alice".into(),
                    card_digest: [0xab; 32],
                    card_bytes: 512,
                    load: 2,
                    limit: 8,
                    skills: vec![Skill {
                        id: "echo".into(),
                        description: "Echoes".into(),
                        tags: vec!["test".into()],
                        input_modes: vec!["text/plain".into()],
                        output_modes: vec![],
                    }],
                })],
            }),
        ),
        (
            "domain_report_down",
            Frame::Report(Report {
                reset: false,
                more: true,
                addresses: vec![],
                changes: vec![AgentChange::Down { session: 1 }],
            }),
        ),
        (
            "domain_routes",
            Frame::Routes(Routes {
                version: 3,
                epoch: 42,
                gateways: vec![
                    RouteGateway {
                        id: "gw1".into(),
                        addresses: vec!["10.0.0.1:4433".into()],
                    },
                    RouteGateway {
                        id: "gw2".into(),
                        addresses: vec![],
                    },
                ],
                capabilities: vec![RouteCapability {
                    skill: Skill {
                        id: "echo".into(),
                        ..Default::default()
                    },
                    providers: vec![
                        Provider {
                            gateway: 0,
                            agents: 1,
                            load: 2,
                        },
                        Provider {
                            gateway: 1,
                            agents: 3,
                            load: 0,
                        },
                    ],
                }],
            }),
        ),
        (
            "domain_trunks",
            Frame::Trunks(Trunks {
                routes_epoch: 42,
                routes_version: 3,
                trunks: vec![TrunkFigures {
                    gateway: "gw2".into(),
                    connected: 2,
                    requests: 100,
                    errors: 1,
                }],
            }),
        ),
        (
            "domain_report_rejected",
            Frame::ReportRejected(ReportRejected {
                session: 7,
                reason: "too many skills".into(),
            }),
        ),
    ]
}

fn hex(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
        .collect()
}

#[test]
fn the_document_holds_the_encodings() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/CONTROL.md");
    let text = std::fs::read_to_string(path).expect("docs/CONTROL.md");
    for (name, frame) in examples() {
        let marker = format!("<!-- example: {name} -->");
        let start = text
            .find(&marker)
            .unwrap_or_else(|| panic!("{marker} missing from docs/CONTROL.md"));
        let block = text[start + marker.len()..]
            .trim_start()
            .strip_prefix("```")
            .unwrap_or_else(|| panic!("{name}: no code block after the marker"));
        let end = block.find("```").expect("end of code block");
        let bytes = hex(&block[..end]);
        let mut encoded = Vec::new();
        encode_frame(&frame, &mut encoded);
        assert_eq!(
            encoded, bytes,
            "{name}: the document differs from the encoder"
        );
        let (decoded, used) = decode_frame(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len(), "{name}");
        assert_eq!(decoded, frame, "{name}: the decoder differs");
        for cut in 0..bytes.len() {
            assert_eq!(
                decode_frame(&bytes[..cut]),
                Ok(None),
                "{name}: prefix {cut}"
            );
        }
    }
}
