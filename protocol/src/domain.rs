//! The domain's view of its agents: what gateways report to the control plane (`REPORT`) and
//! the routes it compiles and pushes back (`ROUTES`), plus the trunk figures a gateway
//! reports (`TRUNKS`) and a refused report (`REPORT_REJECTED`). These are `dmsc-ctl/1` frames
//! (types 0x06 to 0x09); their layout is normative in `docs/CONTROL.md` section 7.

use crate::codec::{put_bytes, Reader};
use crate::limits::{MAX_ADDRESS_BYTES, MAX_CAPABILITY_BYTES, MAX_IDENTITY_BYTES, MAX_LANES};
use crate::{varint, DecodeError};

/// Largest `ROUTES` payload.
pub const MAX_ROUTES_BYTES: usize = 16 * 1024 * 1024;
/// Most skills one agent may be reported with (a control plane may set a lower limit).
pub const MAX_REPORT_SKILLS: usize = 1024;
/// Most changes in one `REPORT` frame.
pub const MAX_REPORT_CHANGES: usize = 4096;
/// Most tags, input modes or output modes per reported skill.
pub const MAX_SKILL_LIST: usize = 16;
/// Longest tag or mode string in a report or route, bytes.
pub const MAX_SKILL_STRING_BYTES: usize = 64;
/// Longest skill description in a report or route, bytes (longer ones are cut by the sender).
pub const MAX_SKILL_DESCRIPTION_BYTES: usize = 256;
/// Most gateways in `ROUTES` and in `TRUNKS`.
pub const MAX_ROUTE_GATEWAYS: usize = 4096;
/// Most capabilities in `ROUTES`.
pub const MAX_ROUTE_CAPABILITIES: usize = 1 << 20;
/// Longest gateway id, bytes.
pub const MAX_GATEWAY_ID_BYTES: usize = 255;

/// What describes a capability in discovery: one provider's skill, trimmed to the limits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Skill {
    /// The skill id: the capability name.
    pub id: String,
    /// At most [`MAX_SKILL_DESCRIPTION_BYTES`].
    pub description: String,
    /// At most [`MAX_SKILL_LIST`] tags.
    pub tags: Vec<String>,
    /// Media types accepted.
    pub input_modes: Vec<String>,
    /// Media types produced.
    pub output_modes: Vec<String>,
}

impl Skill {
    /// `self` cut to the report limits, on character boundaries.
    pub fn trimmed(mut self) -> Self {
        cut(&mut self.description, MAX_SKILL_DESCRIPTION_BYTES);
        for list in [
            &mut self.tags,
            &mut self.input_modes,
            &mut self.output_modes,
        ] {
            list.truncate(MAX_SKILL_LIST);
            for s in list.iter_mut() {
                cut(s, MAX_SKILL_STRING_BYTES);
            }
        }
        self
    }

    fn encode(&self, out: &mut Vec<u8>) {
        put_bytes(out, self.id.as_bytes());
        put_bytes(out, self.description.as_bytes());
        for list in [&self.tags, &self.input_modes, &self.output_modes] {
            varint::encode(list.len() as u64, out);
            for s in list {
                put_bytes(out, s.as_bytes());
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let id = r.str("skill id", MAX_CAPABILITY_BYTES)?.to_owned();
        if id.is_empty() {
            return Err(DecodeError::InvalidValue {
                what: "skill id",
                reason: "empty",
            });
        }
        let description = r
            .str("skill description", MAX_SKILL_DESCRIPTION_BYTES)?
            .to_owned();
        let mut lists: [Vec<String>; 3] = Default::default();
        for list in &mut lists {
            let n = r.count("skill list", MAX_SKILL_LIST)?;
            for _ in 0..n {
                list.push(r.str("skill string", MAX_SKILL_STRING_BYTES)?.to_owned());
            }
        }
        let [tags, input_modes, output_modes] = lists;
        Ok(Self {
            id,
            description,
            tags,
            input_modes,
            output_modes,
        })
    }

    /// Bytes this skill takes encoded.
    pub fn encoded_len(&self) -> usize {
        let s = |x: &String| varint::encoded_len(x.len() as u64) + x.len();
        s(&self.id)
            + s(&self.description)
            + [&self.tags, &self.input_modes, &self.output_modes]
                .iter()
                .map(|l| varint::encoded_len(l.len() as u64) + l.iter().map(s).sum::<usize>())
                .sum::<usize>()
    }
}

fn cut(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// One attached agent as its gateway reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentReport {
    /// The agent's session id on its gateway (unique there while it is attached).
    pub session: u64,
    /// The agent's SPIFFE ID.
    pub identity: String,
    /// SHA-256 of the agent card's JSON as attached.
    pub card_digest: [u8; 32],
    /// Size of that card, bytes.
    pub card_bytes: u64,
    /// Requests in flight to the agent when reported.
    pub load: u64,
    /// Most requests the agent takes at once.
    pub limit: u64,
    /// The capabilities the gateway routes to the agent (admitted by policy).
    pub skills: Vec<Skill>,
}

/// One change in a `REPORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentChange {
    /// The agent attached, or what is known of it changed (replaces the previous report).
    Up(AgentReport),
    /// The agent with this session detached.
    Down {
        /// Its session id.
        session: u64,
    },
}

/// `REPORT` (gateway -> control plane): the gateway's attachments.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    /// Forget everything this gateway reported before (the first frame of a full report).
    pub reset: bool,
    /// More frames of the same batch follow: the control plane waits for the last one before
    /// compiling, so a full report never shows half a gateway.
    pub more: bool,
    /// With `reset`: the gateway's trunk addresses, one per worker (`host:port`). Ignored
    /// otherwise.
    pub addresses: Vec<String>,
    /// Agents up and down, applied in order.
    pub changes: Vec<AgentChange>,
}

/// A gateway in `ROUTES`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteGateway {
    /// The gateway id.
    pub id: String,
    /// Its trunk addresses, one per worker.
    pub addresses: Vec<String>,
}

/// Who offers a capability behind one gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Provider {
    /// Index into [`Routes::gateways`].
    pub gateway: u32,
    /// Agents of that gateway offering the capability.
    pub agents: u64,
    /// Their reported requests in flight, summed.
    pub load: u64,
}

/// A capability in `ROUTES`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteCapability {
    /// What describes it (one provider's skill).
    pub skill: Skill,
    /// The gateways whose agents offer it, ascending by gateway index.
    pub providers: Vec<Provider>,
}

/// `ROUTES` (control plane -> gateway): every capability of the domain and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Routes {
    /// Strictly increasing for one control plane run; restarts from 1 with a new `epoch`.
    pub version: u64,
    /// Names the control plane run (random at its start, nonzero, below 2^62 like every
    /// varint), so that versions of two runs are never compared.
    pub epoch: u64,
    /// The domain's gateways that reported, ascending by id.
    pub gateways: Vec<RouteGateway>,
    /// Capabilities, ascending by name.
    pub capabilities: Vec<RouteCapability>,
}

/// One trunk of a gateway, summed over its workers, in `TRUNKS`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrunkFigures {
    /// The peer gateway's id.
    pub gateway: String,
    /// Workers with a connected trunk to it.
    pub connected: u64,
    /// Requests forwarded to it since start.
    pub requests: u64,
    /// Of those, ended with a gateway status or a trunk failure.
    pub errors: u64,
}

/// `TRUNKS` (gateway -> control plane): which routes the gateway holds, and its trunks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trunks {
    /// The `epoch` of the routes installed (0 if none).
    pub routes_epoch: u64,
    /// The `version` of the routes installed (0 if none).
    pub routes_version: u64,
    /// Per peer gateway.
    pub trunks: Vec<TrunkFigures>,
}

/// `REPORT_REJECTED` (control plane -> gateway): a reported agent (or the whole report, with
/// session 0) was refused; the rest of the domain keeps its tables.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReportRejected {
    /// The refused agent's session, or 0 for the report as a whole.
    pub session: u64,
    /// Why, for operators.
    pub reason: String,
}

pub(crate) fn encode_report(r: &Report, p: &mut Vec<u8>) {
    varint::encode(u64::from(r.reset) | u64::from(r.more) << 1, p);
    varint::encode(r.addresses.len() as u64, p);
    for a in &r.addresses {
        put_bytes(p, a.as_bytes());
    }
    varint::encode(r.changes.len() as u64, p);
    for c in &r.changes {
        match c {
            AgentChange::Up(a) => {
                varint::encode(0, p);
                varint::encode(a.session, p);
                put_bytes(p, a.identity.as_bytes());
                p.extend_from_slice(&a.card_digest);
                varint::encode(a.card_bytes, p);
                varint::encode(a.load, p);
                varint::encode(a.limit, p);
                varint::encode(a.skills.len() as u64, p);
                for s in &a.skills {
                    s.encode(p);
                }
            }
            AgentChange::Down { session } => {
                varint::encode(1, p);
                varint::encode(*session, p);
            }
        }
    }
}

pub(crate) fn decode_report(r: &mut Reader<'_>) -> Result<Report, DecodeError> {
    let flags = r.bounded("report flags", 3, "unknown flag")?;
    let n = r.count("addresses", MAX_LANES)?;
    let mut addresses = Vec::with_capacity(n);
    for _ in 0..n {
        addresses.push(r.str("address", MAX_ADDRESS_BYTES)?.to_owned());
    }
    let n = r.count("changes", MAX_REPORT_CHANGES)?;
    let mut changes = Vec::with_capacity(n.min(256));
    for _ in 0..n {
        changes.push(match r.varint("change kind")? {
            0 => {
                let session = r.varint("session")?;
                let identity = r.str("identity", MAX_IDENTITY_BYTES)?.to_owned();
                let card_digest = r.array("card digest")?;
                let card_bytes = r.varint("card bytes")?;
                let load = r.varint("load")?;
                let limit = r.varint("limit")?;
                let k = r.count("skills", MAX_REPORT_SKILLS)?;
                let mut skills = Vec::with_capacity(k.min(64));
                for _ in 0..k {
                    skills.push(Skill::decode(r)?);
                }
                AgentChange::Up(AgentReport {
                    session,
                    identity,
                    card_digest,
                    card_bytes,
                    load,
                    limit,
                    skills,
                })
            }
            1 => AgentChange::Down {
                session: r.varint("session")?,
            },
            _ => {
                return Err(DecodeError::InvalidValue {
                    what: "change kind",
                    reason: "not 0 (up) or 1 (down)",
                })
            }
        });
    }
    Ok(Report {
        reset: flags & 1 != 0,
        more: flags & 2 != 0,
        addresses,
        changes,
    })
}

pub(crate) fn encode_routes(routes: &Routes, p: &mut Vec<u8>) {
    varint::encode(routes.version, p);
    varint::encode(routes.epoch, p);
    varint::encode(routes.gateways.len() as u64, p);
    for g in &routes.gateways {
        put_bytes(p, g.id.as_bytes());
        varint::encode(g.addresses.len() as u64, p);
        for a in &g.addresses {
            put_bytes(p, a.as_bytes());
        }
    }
    varint::encode(routes.capabilities.len() as u64, p);
    for c in &routes.capabilities {
        c.skill.encode(p);
        varint::encode(c.providers.len() as u64, p);
        for pr in &c.providers {
            varint::encode(u64::from(pr.gateway), p);
            varint::encode(pr.agents, p);
            varint::encode(pr.load, p);
        }
    }
}

pub(crate) fn decode_routes(r: &mut Reader<'_>) -> Result<Routes, DecodeError> {
    let version = r.varint("routes version")?;
    let epoch = r.varint("routes epoch")?;
    let n = r.count("gateways", MAX_ROUTE_GATEWAYS)?;
    let mut gateways = Vec::with_capacity(n.min(256));
    for _ in 0..n {
        let id = r.str("gateway id", MAX_GATEWAY_ID_BYTES)?.to_owned();
        let k = r.count("addresses", MAX_LANES)?;
        let mut addresses = Vec::with_capacity(k);
        for _ in 0..k {
            addresses.push(r.str("address", MAX_ADDRESS_BYTES)?.to_owned());
        }
        gateways.push(RouteGateway { id, addresses });
    }
    let n = r.count("capabilities", MAX_ROUTE_CAPABILITIES)?;
    let mut capabilities = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let skill = Skill::decode(r)?;
        let k = r.count("providers", gateways.len())?;
        let mut providers = Vec::with_capacity(k);
        for _ in 0..k {
            let gateway = r.varint("provider gateway")?;
            if gateway >= gateways.len() as u64 {
                return Err(DecodeError::InvalidValue {
                    what: "provider gateway",
                    reason: "not an index of the gateway list",
                });
            }
            providers.push(Provider {
                gateway: gateway as u32,
                agents: r.varint("provider agents")?,
                load: r.varint("provider load")?,
            });
        }
        capabilities.push(RouteCapability { skill, providers });
    }
    Ok(Routes {
        version,
        epoch,
        gateways,
        capabilities,
    })
}

pub(crate) fn encode_trunks(t: &Trunks, p: &mut Vec<u8>) {
    varint::encode(t.routes_epoch, p);
    varint::encode(t.routes_version, p);
    varint::encode(t.trunks.len() as u64, p);
    for f in &t.trunks {
        put_bytes(p, f.gateway.as_bytes());
        varint::encode(f.connected, p);
        varint::encode(f.requests, p);
        varint::encode(f.errors, p);
    }
}

pub(crate) fn decode_trunks(r: &mut Reader<'_>) -> Result<Trunks, DecodeError> {
    let routes_epoch = r.varint("routes epoch")?;
    let routes_version = r.varint("routes version")?;
    let n = r.count("trunks", MAX_ROUTE_GATEWAYS)?;
    let mut trunks = Vec::with_capacity(n.min(256));
    for _ in 0..n {
        trunks.push(TrunkFigures {
            gateway: r.str("gateway id", MAX_GATEWAY_ID_BYTES)?.to_owned(),
            connected: r.varint("connected")?,
            requests: r.varint("requests")?,
            errors: r.varint("errors")?,
        });
    }
    Ok(Trunks {
        routes_epoch,
        routes_version,
        trunks,
    })
}

pub(crate) fn encode_rejected(x: &ReportRejected, p: &mut Vec<u8>) {
    varint::encode(x.session, p);
    put_bytes(p, x.reason.as_bytes());
}

pub(crate) fn decode_rejected(r: &mut Reader<'_>) -> Result<ReportRejected, DecodeError> {
    Ok(ReportRejected {
        session: r.varint("session")?,
        reason: r.str("reason", crate::ctl::MAX_REASON_BYTES)?.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::{decode_frame, encode_frame, frame_type, Frame};
    use proptest::prelude::*;

    #[test]
    fn every_frame_round_trips() {
        let skill = Skill {
            id: "echo".into(),
            description: "Echoes".into(),
            tags: vec!["t".into()],
            input_modes: vec!["text/plain".into()],
            output_modes: vec![],
        };
        let frames = [
            Frame::Report(Report {
                reset: true,
                more: true,
                addresses: vec!["127.0.0.1:4500".into()],
                changes: vec![
                    AgentChange::Up(AgentReport {
                        session: 7,
                        identity: "spiffe://d/agent/a".into(),
                        card_digest: [3; 32],
                        card_bytes: 120,
                        load: 2,
                        limit: 64,
                        skills: vec![skill.clone()],
                    }),
                    AgentChange::Down { session: 8 },
                ],
            }),
            Frame::Routes(Routes {
                version: 4,
                epoch: 99,
                gateways: vec![RouteGateway {
                    id: "gw1".into(),
                    addresses: vec!["127.0.0.1:4500".into()],
                }],
                capabilities: vec![RouteCapability {
                    skill,
                    providers: vec![Provider {
                        gateway: 0,
                        agents: 1,
                        load: 0,
                    }],
                }],
            }),
            Frame::Trunks(Trunks {
                routes_epoch: 99,
                routes_version: 4,
                trunks: vec![TrunkFigures {
                    gateway: "gw2".into(),
                    connected: 2,
                    requests: 10,
                    errors: 1,
                }],
            }),
            Frame::ReportRejected(ReportRejected {
                session: 7,
                reason: "too many skills".into(),
            }),
        ];
        for frame in frames {
            let mut out = Vec::new();
            encode_frame(&frame, &mut out);
            let (back, used) = decode_frame(&out).unwrap().unwrap();
            assert_eq!(used, out.len());
            assert_eq!(back, frame);
        }
    }

    #[test]
    fn a_provider_outside_the_gateway_list_is_malformed() {
        let routes = Routes {
            version: 1,
            epoch: 1,
            gateways: vec![RouteGateway {
                id: "gw1".into(),
                addresses: vec![],
            }],
            capabilities: vec![RouteCapability {
                skill: Skill {
                    id: "x".into(),
                    ..Skill::default()
                },
                providers: vec![Provider {
                    gateway: 0,
                    agents: 1,
                    load: 0,
                }],
            }],
        };
        let frame = |p: &[u8]| {
            let mut framed = Vec::new();
            varint::encode(frame_type::ROUTES, &mut framed);
            put_bytes(&mut framed, p);
            framed
        };
        let mut p = Vec::new();
        encode_routes(&routes, &mut p);
        assert!(decode_frame(&frame(&p)).is_ok());
        // The payload ends with the provider: gateway 0, agents 1, load 0.
        let n = p.len();
        assert_eq!(&p[n - 3..], &[0, 1, 0]);
        p[n - 3] = 1;
        assert!(decode_frame(&frame(&p)).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(
            ty in prop::sample::select(vec![
                frame_type::REPORT,
                frame_type::ROUTES,
                frame_type::TRUNKS,
                frame_type::REPORT_REJECTED,
            ]),
            payload in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut framed = Vec::new();
            varint::encode(ty, &mut framed);
            put_bytes(&mut framed, &payload);
            let _ = decode_frame(&framed);
        }
    }
}
