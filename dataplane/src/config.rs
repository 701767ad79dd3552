//! Gateway configuration: defaults, the TOML file, and validation.
//!
//! Every setting has a default, so `dmsc-gateway` runs with no file at all. A TOML file
//! (`--config`) may set any key below; command-line flags override the file. The whole
//! configuration is validated before any port is bound, and an error names the offending key.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown key, wrong type, ...).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said, naming the key.
        message: String,
    },
    /// A value is out of its allowed range.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid {
        /// The configuration key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// The complete gateway configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address all workers listen on with `SO_REUSEPORT` (agents connect here).
    pub listen: SocketAddr,
    /// Number of worker threads; 0 means one per available core.
    pub workers: usize,
    /// First per-worker lane port (worker i listens on `lane_base_port + i`); 0 picks free
    /// ports.
    pub lane_base_port: u16,
    /// Whether to offer lanes at all. Without lanes, requests whose target's connection lives
    /// on another worker are handed off across cores.
    pub lanes: bool,
    /// Whether to take part in a domain of gateways: bind a trunk socket per worker, accept
    /// trunks from the gateways of the installed table and open trunks to those the domain
    /// routes name (`docs/TRUNK.md`).
    pub trunks: bool,
    /// First per-worker trunk port (worker i listens on `trunk_base_port + i`); 0 picks free
    /// ports.
    pub trunk_base_port: u16,
    /// Address put in lane addresses sent to agents and in the trunk addresses reported to the
    /// control plane; defaults to the listen address's IP.
    pub advertise_ip: Option<IpAddr>,
    /// Pin each worker to one core.
    pub pin_workers: bool,
    /// Before a worker would sleep, it keeps polling its sockets and inbox for this many
    /// microseconds (0: off, at most 1000), yielding its core between polls. Cuts the kernel's
    /// wake-up latency from a request's path, at the price of CPU: each worker stays runnable
    /// up to this long after every burst of work. Use no more polling workers than cores the
    /// gateway has to itself.
    pub busy_poll_us: u64,
    /// This gateway's id: its certificate is `spiffe://<domain>/gateway/<gateway_id>`.
    pub gateway_id: String,
    /// The trust domain agents must belong to.
    pub domain: String,
    /// Where the development PKI lives when `cert`/`key`/`ca` are not given.
    pub state_dir: PathBuf,
    /// The gateway's certificate chain (PEM). Requires `key` and `ca`.
    pub cert: Option<PathBuf>,
    /// The gateway's private key (PEM).
    pub key: Option<PathBuf>,
    /// The domain CA certificate(s) agents must chain to (PEM).
    pub ca: Option<PathBuf>,
    /// Address of the admin HTTP endpoint (`/metrics`, `/agents`, `/healthz`); `None` turns
    /// it off. Keep it on loopback or a management network: it is not authenticated.
    pub admin_listen: Option<SocketAddr>,
    /// The control plane's `dmsc-ctl/1` address; `None` runs standalone (every authenticated
    /// agent may invoke everything).
    pub control: Option<SocketAddr>,
    /// With `control`: how long to wait for the first pushed table before starting from the
    /// last good table saved under `state_dir`, in milliseconds.
    pub control_timeout_ms: u64,
    /// Limits on what peers may send and hold.
    pub limits: Limits,
}

/// Limits on everything a peer controls. Every one can be set in the `[limits]` table of the
/// config file or by the flag of the same name.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request header block accepted, in bytes (protocol ceiling: 16384).
    pub max_header_bytes: usize,
    /// Largest agent card accepted, in bytes (protocol ceiling: 65536).
    pub max_card_bytes: usize,
    /// Most concurrent request streams an agent may open on one connection. quinn-proto keeps
    /// state for every stream a peer may open (about 84 bytes each), so this is also the main
    /// term of the memory an idle agent costs.
    pub max_streams_per_connection: u32,
    /// Most requests a worker keeps in flight to one agent (lower if the agent asks).
    pub max_inflight_per_agent: u32,
    /// Most agents attached to the gateway at once.
    pub max_agents: usize,
    /// Most QUIC connections per worker (agents, lanes and handshakes).
    pub max_connections_per_worker: usize,
    /// Most connections (primary plus lanes) one agent identity may hold per worker.
    pub max_connections_per_identity: usize,
    /// Idle timeout of agent connections, in milliseconds.
    pub idle_timeout_ms: u64,
    /// How long a new connection may take to send `ATTACH` or `LANE`, in milliseconds.
    pub attach_timeout_ms: u64,
    /// How long a caller may take to send a whole request header once it opened the stream,
    /// in milliseconds.
    pub header_timeout_ms: u64,
    /// An attached agent's connection that sends nothing (not even acknowledgements of the
    /// gateway's keep-alives, sent every third of this) for this long is closed with
    /// `UNRESPONSIVE` and its requests fail with `TARGET_FAILED`, in milliseconds; 0 turns the
    /// check and the gateway's keep-alives off (the idle timeout still applies).
    pub peer_timeout_ms: u64,
    /// An exchange whose queued bytes a leg refuses (a caller that does not read its answer, a
    /// target that does not read its request) for this long after the answer began is ended
    /// on both legs with `STALLED`, in milliseconds.
    pub stall_timeout_ms: u64,
    /// Above this many connections on a worker, a new connection from an address that has not
    /// proven it can receive there is answered with a QUIC Retry first (one extra round trip,
    /// no state kept); 0 sends a Retry to every new connection.
    pub retry_above_connections: usize,
    /// Deadline applied to requests that carry none, in milliseconds.
    pub default_deadline_ms: u64,
    /// Longest deadline honoured; longer ones are cut to this, in milliseconds.
    pub max_deadline_ms: u64,
    /// Requests with a hop count at or above this are answered `LOOP_DETECTED`.
    pub max_hops: u8,
    /// How long a draining gateway waits for in-flight requests, in milliseconds.
    pub drain_timeout_ms: u64,
    /// Per-stream receive window, in bytes: how much of one request body a caller may send
    /// ahead of the target. A connection's window is this times
    /// `max_streams_per_connection`, so that no request can take another's share: a caller
    /// connection may hold at most that many bytes unread in the gateway.
    pub stream_window_bytes: u32,
    /// Capacity of each worker's inbox of cross-worker messages.
    pub handoff_queue: usize,
    /// Capabilities that get metrics of their own (per worker); the rest are reported together
    /// as `capability="_other"`.
    pub max_metric_capabilities: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            workers: 0,
            lane_base_port: 0,
            lanes: true,
            trunks: true,
            trunk_base_port: 0,
            advertise_ip: None,
            pin_workers: true,
            busy_poll_us: 0,
            gateway_id: "gw1".into(),
            domain: "dmsc.local".into(),
            state_dir: PathBuf::from("dmsc-state"),
            cert: None,
            key: None,
            ca: None,
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 4480))),
            control: None,
            control_timeout_ms: 10_000,
            limits: Limits::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 4096,
            max_card_bytes: 64 * 1024,
            max_streams_per_connection: 100,
            max_inflight_per_agent: 1024,
            max_agents: 16_384,
            max_connections_per_worker: 32_768,
            max_connections_per_identity: 64,
            idle_timeout_ms: 30_000,
            attach_timeout_ms: 5_000,
            header_timeout_ms: 5_000,
            peer_timeout_ms: 5_000,
            stall_timeout_ms: 10_000,
            retry_above_connections: 4_096,
            default_deadline_ms: 30_000,
            max_deadline_ms: 300_000,
            max_hops: 8,
            drain_timeout_ms: 10_000,
            stream_window_bytes: 256 * 1024,
            handoff_queue: 8192,
            max_metric_capabilities: 64,
        }
    }
}

impl Config {
    /// Reads a TOML file; keys absent from it keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses TOML text; the error message names the offending key.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// The effective number of workers.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Checks every value; call before binding anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.worker_count() > 256 {
            return invalid("workers", "at most 256 (set it explicitly on larger hosts)");
        }
        if self.busy_poll_us > 1000 {
            return invalid("busy_poll_us", "at most 1000");
        }
        if self.lane_base_port != 0
            && u32::from(self.lane_base_port) + self.worker_count() as u32 > 65_536
        {
            return invalid("lane_base_port", "lane_base_port + workers exceeds 65535");
        }
        if self.trunk_base_port != 0
            && u32::from(self.trunk_base_port) + self.worker_count() as u32 > 65_536
        {
            return invalid("trunk_base_port", "trunk_base_port + workers exceeds 65535");
        }
        if self.gateway_id.is_empty()
            || !self
                .gateway_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return invalid("gateway_id", "1 or more of [A-Za-z0-9._-]");
        }
        if dmsc_protocol::spiffe::SpiffeId::gateway(&self.domain, &self.gateway_id).is_err() {
            return invalid(
                "domain",
                "not a valid SPIFFE trust domain ([a-z0-9._-], lowercase)",
            );
        }
        match (&self.cert, &self.key, &self.ca) {
            (None, None, None) | (Some(_), Some(_), Some(_)) => {}
            _ => {
                return invalid(
                    "cert",
                    "`cert`, `key` and `ca` go together: set all or none",
                )
            }
        }
        if !(64..=dmsc_protocol::limits::MAX_HEADER_BYTES).contains(&l.max_header_bytes) {
            return invalid("limits.max_header_bytes", "between 64 and 16384");
        }
        if !(256..=dmsc_protocol::limits::MAX_CARD_BYTES).contains(&l.max_card_bytes) {
            return invalid("limits.max_card_bytes", "between 256 and 65536");
        }
        if !(1..=100_000).contains(&l.max_streams_per_connection) {
            return invalid("limits.max_streams_per_connection", "between 1 and 100000");
        }
        if !(1..=1_000_000).contains(&l.max_inflight_per_agent) {
            return invalid("limits.max_inflight_per_agent", "between 1 and 1000000");
        }
        if l.max_agents == 0 {
            return invalid("limits.max_agents", "at least 1");
        }
        if l.max_connections_per_worker == 0 {
            return invalid("limits.max_connections_per_worker", "at least 1");
        }
        if l.max_connections_per_identity == 0 {
            return invalid("limits.max_connections_per_identity", "at least 1");
        }
        if !(1_000..=3_600_000).contains(&l.idle_timeout_ms) {
            return invalid("limits.idle_timeout_ms", "between 1000 and 3600000");
        }
        if !(100..=600_000).contains(&l.attach_timeout_ms) {
            return invalid("limits.attach_timeout_ms", "between 100 and 600000");
        }
        if !(100..=600_000).contains(&l.header_timeout_ms) {
            return invalid("limits.header_timeout_ms", "between 100 and 600000");
        }
        if l.peer_timeout_ms != 0 && !(300..=3_600_000).contains(&l.peer_timeout_ms) {
            return invalid(
                "limits.peer_timeout_ms",
                "0 (off) or between 300 and 3600000",
            );
        }
        if !(100..=3_600_000).contains(&l.stall_timeout_ms) {
            return invalid("limits.stall_timeout_ms", "between 100 and 3600000");
        }
        if l.default_deadline_ms == 0 || l.default_deadline_ms > l.max_deadline_ms {
            return invalid(
                "limits.default_deadline_ms",
                "at least 1 and at most limits.max_deadline_ms",
            );
        }
        if l.max_deadline_ms > 86_400_000 {
            return invalid("limits.max_deadline_ms", "at most 86400000 (one day)");
        }
        if l.max_hops == 0 {
            return invalid("limits.max_hops", "at least 1");
        }
        if l.drain_timeout_ms > 600_000 {
            return invalid("limits.drain_timeout_ms", "at most 600000");
        }
        if !(16 * 1024..=64 * 1024 * 1024).contains(&l.stream_window_bytes) {
            return invalid("limits.stream_window_bytes", "between 16384 and 67108864");
        }
        if !(16..=1_000_000).contains(&l.handoff_queue) {
            return invalid("limits.handoff_queue", "between 16 and 1000000");
        }
        if l.max_metric_capabilities > 10_000 {
            return invalid("limits.max_metric_capabilities", "at most 10000");
        }
        Ok(())
    }
}

impl Limits {
    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// How often the gateway pings an agent connection: a third of the peer timeout (so two
    /// pings may be lost before the peer counts as unresponsive) or of the idle timeout,
    /// whichever is shorter, so that an agent whose own keep-alives are too rare for the
    /// gateway's idle timeout still stays connected; `None` when the check is off.
    pub fn keep_alive_interval(&self) -> Option<Duration> {
        (self.peer_timeout_ms > 0)
            .then(|| Duration::from_millis(self.peer_timeout_ms.min(self.idle_timeout_ms) / 3))
    }

    /// The receive window of a whole connection: every stream's full window at once.
    pub fn connection_window_bytes(&self) -> u64 {
        u64::from(self.stream_window_bytes) * u64::from(self.max_streams_per_connection)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn file_keys_override_defaults() {
        let c =
            Config::from_toml("listen = \"127.0.0.1:5000\"\nworkers = 2\n[limits]\nmax_hops = 4\n")
                .unwrap();
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.workers, 2);
        assert_eq!(c.limits.max_hops, 4);
        assert_eq!(c.limits.max_header_bytes, 4096);
    }

    #[test]
    fn errors_name_the_key() {
        let e = Config::from_toml("[limits]\nmax_hopz = 4\n").unwrap_err();
        assert!(e.contains("max_hopz"), "{e}");
        let e = Config::from_toml("workers = \"two\"\n").unwrap_err();
        assert!(e.contains("workers"), "{e}");
        let c = Config {
            limits: Limits {
                max_header_bytes: 1,
                ..Limits::default()
            },
            ..Config::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("limits.max_header_bytes"), "{e}");
        let c = Config {
            cert: Some("a.pem".into()),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("`cert`"));
    }
}
