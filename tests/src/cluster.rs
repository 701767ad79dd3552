//! Real processes on loopback: a control plane (`dmsc-control serve`) and gateways
//! (`dmsc-gateway --control`), started from the workspace's built binaries, with a development
//! PKI on disk that in-process SDK agents share.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use dmsc_identity::{DevPki, SpiffeId};

use crate::{Pki, DOMAIN};

/// The path of a workspace binary built beside the test executable (`cargo test --workspace`
/// builds every binary of the workspace).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// A `domain.toml` for [`Domain::new`], as a `&'static str`: trust domain `test.local` (its
/// anchor filled in by [`Domain::new`]), gateways `gw1` to `gw3`, then `$rules` (groups and
/// invoke rules, a string literal).
#[macro_export]
macro_rules! test_domain {
    ($rules:literal) => {
        concat!(
            "[domain]\nname = \"test.local\"\ntrust_anchor = \"{ca}\"\n\n",
            "[[gateway]]\nid = \"gw1\"\n[[gateway]]\nid = \"gw2\"\n[[gateway]]\nid = \"gw3\"\n",
            $rules
        )
    };
}

/// A `domain.toml` for [`Domain::new`]: trust domain `test.local`, gateways `gw1` to `gw3`,
/// and every agent allowed to advertise, discover and invoke everything.
pub const OPEN_DOMAIN: &str = crate::test_domain!(
    r#"
[groups.agents]
members = ["spiffe://test.local/agent/*"]
advertise = ["*"]
discover = ["*"]

[[invoke]]
effect = "allow"
groups = ["agents"]
capabilities = ["*"]
"#
);

/// A scratch directory removed when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new empty directory under the system temporary directory.
    pub fn new(tag: &str) -> Self {
        let mut b = [0u8; 8];
        unique_bits(&mut b);
        let dir = std::env::temp_dir().join(format!("dmsc-{tag}-{:016x}", u64::from_ne_bytes(b)));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique_bits(b: &mut [u8]) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mix = nanos ^ (u128::from(std::process::id()) << 64);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (mix >> (i * 8)) as u8;
    }
}

/// A child process whose stdout is read line by line; killed when dropped.
pub struct Proc {
    /// What it is, for messages.
    pub role: String,
    child: Child,
    lines: Receiver<String>,
    /// Every stdout line read so far.
    pub seen: Vec<String>,
}

impl Proc {
    /// Starts `exe` with `args`; its stderr goes to the test's stderr.
    pub fn spawn(role: &str, exe: &Path, args: &[String]) -> Self {
        let mut child = Command::new(exe)
            .args(args)
            .env(
                "DMSC_LOG",
                std::env::var("DMSC_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {role}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            role: role.to_owned(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits up to `timeout` for a stdout line starting with `prefix`; returns the rest of it,
    /// trimmed, or `None` on timeout or exit.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        if let Some(line) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return Some(line[prefix.len()..].trim().to_owned());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).ok()?;
            self.seen.push(line.clone());
            if let Some(rest) = line.strip_prefix(prefix) {
                return Some(rest.trim().to_owned());
            }
        }
    }

    /// Like [`Proc::wait_line`], panicking on timeout.
    pub fn expect_line(&mut self, prefix: &str) -> String {
        self.wait_line(prefix, Duration::from_secs(30))
            .unwrap_or_else(|| {
                panic!(
                    "{} never printed {prefix:?}; it printed {:?}",
                    self.role, self.seen
                )
            })
    }

    /// Sends `signal` (a `kill` signal name such as `HUP` or `KILL`).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {}", self.role);
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A domain on disk: its PKI (shared with in-process agents through [`Domain::pki`]) and its
/// `domain.toml`.
pub struct Domain {
    /// The scratch directory holding everything.
    pub dir: Scratch,
    /// The CA, for in-process agents.
    pub pki: Pki,
}

impl Domain {
    /// A new domain directory with a CA for [`DOMAIN`] and `config` as its `domain.toml`
    /// (`{ca}` in it is replaced by the CA certificate's path).
    pub fn new(tag: &str, config: &str) -> Self {
        let dir = Scratch::new(tag);
        let dev = DevPki::new(dir.0.join("pki"));
        let ca = dev.init(DOMAIN).expect("CA");
        let domain = Self {
            dir,
            pki: Pki { ca },
        };
        domain.write_config(config);
        domain
    }

    /// The configuration file's path.
    pub fn config_path(&self) -> PathBuf {
        self.dir.0.join("domain.toml")
    }

    /// Replaces `domain.toml` (`{ca}` is replaced by the CA certificate's path).
    pub fn write_config(&self, config: &str) {
        let ca = DevPki::new(self.dir.0.join("pki")).ca_cert_path();
        let text = config.replace("{ca}", &ca.display().to_string());
        std::fs::write(self.config_path(), text).expect("write domain.toml");
    }

    /// Starts `dmsc-control serve` on ephemeral ports; returns it with its `dmsc-ctl/1` and
    /// admin addresses.
    pub fn control_plane(&self, listen: Option<SocketAddr>) -> ControlPlane {
        self.control_plane_with(listen, &[])
    }

    /// [`Domain::control_plane`] with `extra` arguments to `serve`.
    pub fn control_plane_with(&self, listen: Option<SocketAddr>, extra: &[&str]) -> ControlPlane {
        let listen = listen.map_or("127.0.0.1:0".to_owned(), |a| a.to_string());
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        args.splice(
            0..0,
            [
                "serve".into(),
                "--config".into(),
                self.config_path().display().to_string(),
                "--listen".into(),
                listen,
                "--admin-listen".into(),
                "127.0.0.1:0".into(),
                "--state-dir".into(),
                self.dir.0.display().to_string(),
            ],
        );
        let mut proc = Proc::spawn("control plane", &binary("dmsc-control"), &args);
        let ctl = proc
            .expect_line("dmsc-ctl/1 on")
            .parse()
            .expect("ctl address");
        let admin = admin_addr(&proc.expect_line("admin endpoint:"));
        ControlPlane { proc, ctl, admin }
    }

    /// Starts gateway `id` (2 workers) pointed at `control`, with its state under the domain
    /// directory; returns it once it prints its listening line (it then holds a table), or
    /// `None` if it does not within `ready`.
    pub fn gateway(
        &self,
        id: &str,
        control: SocketAddr,
        extra: &[&str],
        ready: Duration,
    ) -> (Proc, Option<GatewayAddrs>) {
        let dev = DevPki::new(self.dir.0.join("pki"));
        let ca = dev.load_ca().expect("CA");
        let (cert, key) = dev
            .ensure(&ca, &SpiffeId::gateway(DOMAIN, id).expect("gateway id"))
            .expect("gateway identity");
        let mut args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--workers".into(),
            "2".into(),
            "--no-pin".into(),
            "--gateway-id".into(),
            id.into(),
            "--domain".into(),
            DOMAIN.into(),
            "--cert".into(),
            cert.display().to_string(),
            "--key".into(),
            key.display().to_string(),
            "--ca".into(),
            dev.ca_cert_path().display().to_string(),
            "--state-dir".into(),
            self.dir.0.join(id).display().to_string(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
            "--control".into(),
            control.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc = Proc::spawn(&format!("gateway {id}"), &binary("dmsc-gateway"), &args);
        let Some(table) = proc.wait_line("table generation:", ready) else {
            return (proc, None);
        };
        let admin = admin_addr(&proc.expect_line("admin endpoint:"));
        let listening = proc.expect_line("dmsc-gateway listening on");
        let addr = listening
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .parse()
            .expect("gateway address");
        let trunks = listening
            .split("trunks: ")
            .nth(1)
            .unwrap_or_default()
            .trim_end_matches(')')
            .split(", ")
            .filter_map(|a| a.parse().ok())
            .collect();
        (
            proc,
            Some(GatewayAddrs {
                addr,
                admin,
                table,
                trunks,
            }),
        )
    }
}

/// The address in an `admin endpoint:` line (`http://ADDR/...`).
fn admin_addr(line: &str) -> SocketAddr {
    line.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .unwrap_or_else(|e| panic!("admin address in {line:?}: {e}"))
}

/// A running control plane.
pub struct ControlPlane {
    /// The process.
    pub proc: Proc,
    /// Its `dmsc-ctl/1` address.
    pub ctl: SocketAddr,
    /// Its admin address.
    pub admin: SocketAddr,
}

impl ControlPlane {
    /// `GET /status`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let body = http(self.admin, "GET", "/status");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("status {body:?}: {e}"))
    }

    /// Runs `dmsc-control <args> --admin <admin>`; returns its exit code and stdout+stderr.
    pub fn command(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(binary("dmsc-control"))
            .args(args)
            .args(["--admin".to_owned(), self.admin.to_string()])
            .output()
            .expect("dmsc-control");
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Waits until every gateway in `ids` is connected and has acknowledged the current
    /// generation; returns that generation.
    pub fn wait_in_sync(&self, ids: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            let ok = ids.iter().all(|id| {
                s["gateways"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|g| g["id"] == *id && g["connected"] == true && g["in_sync"] == true)
            });
            if ok {
                return s["generation"].as_str().unwrap_or_default().to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "gateways {ids:?} not in sync: {s:#}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Where a started gateway listens.
#[derive(Debug, Clone)]
pub struct GatewayAddrs {
    /// Agents connect here.
    pub addr: SocketAddr,
    /// Its admin endpoint.
    pub admin: SocketAddr,
    /// The generation it started with.
    pub table: String,
    /// Its trunk addresses, one per worker (other gateways connect there).
    pub trunks: Vec<SocketAddr>,
}

/// A minimal HTTP/1.1 exchange (test-side only), returning the body.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    match out.split_once("\r\n\r\n") {
        Some((head, body))
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked") =>
        {
            dechunk(body)
        }
        Some((_, body)) => body.to_owned(),
        None => out,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
