//! Packets and wake-ups per role, read around each measured window, to explain where each
//! role's CPU goes (issue: "fewer completions per wake-up" and "more datagrams per request").
//!
//! - **Wake-ups**: voluntary context switches of every thread of a process
//!   (`/proc/<pid>/task/*/status`), that is, how often its threads blocked (in `epoll_wait`,
//!   a channel, a lock) and were woken again. The same measure for every role.
//! - **Datagrams of the callers**: quinn's own count over the callers' connections (passed in
//!   by the caller threads).
//! - **Datagrams of the gateway**: its `dmsc_datagrams_{sent,received}_total` metrics, from its
//!   admin endpoint (a GSO batch counts once when sent), and of those sent, the ones that
//!   carried nothing but a QUIC acknowledgement (`dmsc_ack_only_sent_total`).
//! - **Datagrams of the agents**: the machine's UDP counters (`/proc/net/snmp`, `InDatagrams`,
//!   `OutDatagrams`) minus the callers' and the gateway's: everything else on the machine is
//!   counted with them (the control plane's keep-alives, a few per second, and any other UDP
//!   traffic), so on a busy machine the figure is an upper bound.

use std::net::SocketAddr;

/// What one role did over a window (`None`: unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    /// UDP datagrams sent.
    pub sent: Option<u64>,
    /// UDP datagrams received.
    pub received: Option<u64>,
    /// Voluntary context switches of all its threads.
    pub wakeups: Option<u64>,
    /// Of the datagrams sent, those that carried only an acknowledgement (known for the
    /// gateway only).
    pub ack_only: Option<u64>,
}

impl Counts {
    /// The sum of two windows.
    pub fn plus(self, other: Counts) -> Counts {
        let add = |a: Option<u64>, b: Option<u64>| Some(a? + b?);
        Counts {
            sent: add(self.sent, other.sent),
            received: add(self.received, other.received),
            wakeups: add(self.wakeups, other.wakeups),
            ack_only: add(self.ack_only, other.ack_only),
        }
    }

    /// Zero of everything (the start of a sum).
    pub fn zero() -> Counts {
        Counts {
            sent: Some(0),
            received: Some(0),
            wakeups: Some(0),
            ack_only: Some(0),
        }
    }
}

/// Every role's counts over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RoleCounts {
    /// This process's caller threads.
    pub callers: Counts,
    /// The gateway process.
    pub gateway: Counts,
    /// The agents process.
    pub agents: Counts,
}

impl RoleCounts {
    /// The sum of two windows.
    pub fn plus(self, other: RoleCounts) -> RoleCounts {
        RoleCounts {
            callers: self.callers.plus(other.callers),
            gateway: self.gateway.plus(other.gateway),
            agents: self.agents.plus(other.agents),
        }
    }

    /// Zero of everything.
    pub fn zero() -> RoleCounts {
        RoleCounts {
            callers: Counts::zero(),
            gateway: Counts::zero(),
            agents: Counts::zero(),
        }
    }
}

/// The raw readings at one instant; two of them make a window ([`Snapshot::since`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    callers_wakeups: Option<u64>,
    gateway_wakeups: Option<u64>,
    agents_wakeups: Option<u64>,
    /// The gateway's (received, sent, sent ACK-only).
    gateway_datagrams: Option<(u64, u64, u64)>,
    /// The machine's UDP (InDatagrams, OutDatagrams).
    system: Option<(u64, u64)>,
}

impl Snapshot {
    /// Reads everything now: this process, the gateway (`pid`, admin endpoint) and agents pids.
    pub fn take(gateway: Option<(u32, Option<SocketAddr>)>, agents: Option<u32>) -> Snapshot {
        Snapshot {
            callers_wakeups: wakeups("self"),
            gateway_wakeups: gateway.and_then(|(pid, _)| wakeups(&pid.to_string())),
            agents_wakeups: agents.and_then(|pid| wakeups(&pid.to_string())),
            gateway_datagrams: gateway.and_then(|(_, admin)| gateway_datagrams(admin?)),
            system: system_udp(),
        }
    }

    /// The window from `earlier` to `self`, with the callers' datagrams as quinn counted them
    /// (sent, received).
    pub fn since(&self, earlier: &Snapshot, callers_datagrams: Option<(u64, u64)>) -> RoleCounts {
        let d = |a: Option<u64>, b: Option<u64>| Some(a?.saturating_sub(b?));
        let gateway = match (self.gateway_datagrams, earlier.gateway_datagrams) {
            (Some((r1, s1, a1)), Some((r0, s0, a0))) => {
                Some((r1 - r0.min(r1), s1 - s0.min(s1), a1 - a0.min(a1)))
            }
            _ => None,
        };
        let system = match (self.system, earlier.system) {
            (Some((i1, o1)), Some((i0, o0))) => Some((i1 - i0.min(i1), o1 - o0.min(o1))),
            _ => None,
        };
        let rest = |total: Option<u64>, callers: Option<u64>, gateway: Option<u64>| {
            Some(total?.saturating_sub(callers.unwrap_or(0) + gateway.unwrap_or(0)))
        };
        let (callers_sent, callers_received) = match callers_datagrams {
            Some((s, r)) => (Some(s), Some(r)),
            None => (None, None),
        };
        let (gateway_received, gateway_sent, gateway_ack_only) = match gateway {
            Some((r, s, a)) => (Some(r), Some(s), Some(a)),
            None => (None, None, None),
        };
        RoleCounts {
            callers: Counts {
                sent: callers_sent,
                received: callers_received,
                wakeups: d(self.callers_wakeups, earlier.callers_wakeups),
                ack_only: None,
            },
            gateway: Counts {
                sent: gateway_sent,
                received: gateway_received,
                wakeups: d(self.gateway_wakeups, earlier.gateway_wakeups),
                ack_only: gateway_ack_only,
            },
            agents: Counts {
                sent: rest(system.map(|s| s.1), callers_sent, gateway_sent),
                received: rest(system.map(|s| s.0), callers_received, gateway_received),
                wakeups: d(self.agents_wakeups, earlier.agents_wakeups),
                ack_only: None,
            },
        }
    }
}

/// Voluntary context switches summed over the threads of `/proc/<pid>`.
fn wakeups(pid: &str) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        // A thread that exited since the directory was listed has no status to read: it
        // counts for nothing, it does not make the whole reading unknown.
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        total += parse_switches(&status).unwrap_or(0);
    }
    Some(total)
}

fn parse_switches(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()
}

/// The machine's UDP datagrams (received, sent) from `/proc/net/snmp`.
fn system_udp() -> Option<(u64, u64)> {
    parse_snmp(&std::fs::read_to_string("/proc/net/snmp").ok()?)
}

fn parse_snmp(text: &str) -> Option<(u64, u64)> {
    let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let get = |name: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse().ok()
    };
    Some((get("InDatagrams")?, get("OutDatagrams")?))
}

/// The gateway's (received, sent, sent ACK-only) datagram counters, from its admin endpoint.
fn gateway_datagrams(admin: SocketAddr) -> Option<(u64, u64, u64)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(5)))
        .build()
        .into();
    let body = agent
        .get(&format!("http://{admin}/metrics"))
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()?;
    let value = |name: &str| -> Option<u64> {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))?
            .trim()
            .parse()
            .ok()
    };
    Some((
        value("dmsc_datagrams_received_total")?,
        value("dmsc_datagrams_sent_total")?,
        value("dmsc_ack_only_sent_total")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t42\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_switches(status), Some(42));
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\n\
                    Udp: 100 1 0 90 0\nUdpLite: InDatagrams\nUdpLite: 0\n";
        assert_eq!(parse_snmp(snmp), Some((100, 90)));
        assert_eq!(parse_snmp("Ip: 1\nIp: 2\n"), None);
        if cfg!(target_os = "linux") {
            assert!(wakeups("self").is_some());
            assert!(system_udp().is_some());
        }
    }

    #[test]
    fn the_agents_get_what_the_others_did_not_send() {
        let before = Snapshot {
            callers_wakeups: Some(10),
            gateway_wakeups: Some(20),
            agents_wakeups: Some(30),
            gateway_datagrams: Some((1000, 900, 300)),
            system: Some((5000, 5000)),
        };
        let after = Snapshot {
            callers_wakeups: Some(15),
            gateway_wakeups: Some(40),
            agents_wakeups: Some(33),
            gateway_datagrams: Some((1200, 1100, 340)),
            system: Some((5400, 5400)),
        };
        let w = after.since(&before, Some((100, 110)));
        assert_eq!(w.callers.wakeups, Some(5));
        assert_eq!(w.gateway.received, Some(200));
        assert_eq!(w.gateway.sent, Some(200));
        assert_eq!(w.gateway.ack_only, Some(40));
        assert_eq!(w.callers.ack_only, None);
        assert_eq!(w.agents.sent, Some(100));
        assert_eq!(w.agents.received, Some(90));
        assert_eq!(w.agents.wakeups, Some(3));
    }
}
