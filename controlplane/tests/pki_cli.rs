//! End-to-end test of `dmsc-control pki`: init, issue an agent and a gateway identity, show,
//! and check the SPIFFE IDs inside the written certificates.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dmsc_identity::{load_cert_chain, load_private_key, spiffe_id_from_cert};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "dmsc-pki-cli-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn control(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmsc-control"))
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("run dmsc-control")
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn failed(output: &Output) -> String {
    assert_eq!(output.status.code(), Some(1), "expected exit code 1");
    assert!(output.stdout.is_empty());
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn spiffe_id_of(cert: &Path) -> String {
    let chain = load_cert_chain(cert).unwrap();
    spiffe_id_from_cert(&chain[0]).unwrap().to_string()
}

#[test]
fn init_issue_show() {
    let tmp = TempDir::new("flow");
    let dir = tmp.0.join("pki");

    let stderr = failed(&control(&["pki", "issue", "--agent", "weather"], &dir));
    assert!(stderr.contains("pki init"), "{stderr}");

    let out = ok(&control(&["pki", "init", "--domain", "test.dmsc"], &dir));
    assert!(
        out.contains("CA for trust domain test.dmsc created"),
        "{out}"
    );
    assert!(
        out.contains(&dir.join("ca.pem").display().to_string()),
        "{out}"
    );
    let out = ok(&control(&["pki", "init"], &dir));
    assert!(
        out.contains("CA for trust domain test.dmsc exists"),
        "{out}"
    );
    let stderr = failed(&control(&["pki", "init", "--domain", "other"], &dir));
    assert!(stderr.contains("\"test.dmsc\""), "{stderr}");

    let out = ok(&control(&["pki", "issue", "--agent", "weather"], &dir));
    assert!(
        out.contains("issued spiffe://test.dmsc/agent/weather"),
        "{out}"
    );
    let agent_cert = dir.join("agents/weather.pem");
    assert!(out.contains(&agent_cert.display().to_string()), "{out}");
    assert_eq!(
        spiffe_id_of(&agent_cert),
        "spiffe://test.dmsc/agent/weather"
    );
    load_private_key(&dir.join("agents/weather.key")).unwrap();

    let out = ok(&control(&["pki", "issue", "--gateway", "gw-1"], &dir));
    assert!(
        out.contains("issued spiffe://test.dmsc/gateway/gw-1"),
        "{out}"
    );
    let gateway_cert = dir.join("gateways/gw-1.pem");
    assert_eq!(
        spiffe_id_of(&gateway_cert),
        "spiffe://test.dmsc/gateway/gw-1"
    );

    // No silent overwrite; --force replaces.
    let before = std::fs::read(&agent_cert).unwrap();
    let stderr = failed(&control(&["pki", "issue", "--agent", "weather"], &dir));
    assert!(stderr.contains("--force"), "{stderr}");
    assert_eq!(std::fs::read(&agent_cert).unwrap(), before);
    ok(&control(
        &["pki", "issue", "--agent", "weather", "--force"],
        &dir,
    ));
    assert_ne!(std::fs::read(&agent_cert).unwrap(), before);
    assert_eq!(
        spiffe_id_of(&agent_cert),
        "spiffe://test.dmsc/agent/weather"
    );

    let stderr = failed(&control(&["pki", "issue", "--agent", "../escape"], &dir));
    assert!(stderr.contains("invalid agent name"), "{stderr}");

    let out = ok(&control(&["pki", "show"], &dir));
    assert!(out.contains("trust domain:   test.dmsc"), "{out}");
    assert!(out.contains("spiffe://test.dmsc/agent/weather"), "{out}");
    assert!(out.contains("spiffe://test.dmsc/gateway/gw-1"), "{out}");
    assert!(!out.contains("INVALID"), "{out}");
}

#[test]
fn usage_errors_exit_nonzero() {
    let tmp = TempDir::new("usage");
    let output = control(&["pki", "issue", "--agent", "a", "--gateway", "g"], &tmp.0);
    assert!(!output.status.success());
    let output = control(&["pki", "issue"], &tmp.0);
    assert!(!output.status.success());
}
