//! Exit codes of the `dmsc-gateway` binary (docs/OPERATIONS.md, "Exit codes"): an invalid
//! configuration file or command line exits with 64 (`EX_USAGE`) and a message naming the
//! problem, before anything is bound or created.

use std::path::PathBuf;
use std::process::{Command, Output};

const EX_USAGE: i32 = 64;

fn gateway(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmsc-gateway"))
        .args(args)
        .env("DMSC_LOG", "off")
        .output()
        .expect("running dmsc-gateway")
}

/// A config file with `text`, removed when dropped.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "dmsc-exit-codes-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).expect("writing the config file");
        Self(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("UTF-8 temp path")
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unknown_config_key_exits_64_naming_the_key() {
    let file = TempConfig::new("unknown-key", "[limits]\nmax_hopz = 4\n");
    let out = gateway(&["--config", file.path()]);
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", stderr(&out));
    assert!(stderr(&out).contains("max_hopz"), "{}", stderr(&out));
}

#[test]
fn out_of_range_value_exits_64_naming_the_key() {
    let file = TempConfig::new("bad-value", "[limits]\nmax_header_bytes = 1\n");
    let out = gateway(&["--config", file.path()]);
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("limits.max_header_bytes"),
        "{}",
        stderr(&out)
    );
    // The same value given as a flag.
    let out = gateway(&["--max-header-bytes", "1"]);
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", stderr(&out));
}

#[test]
fn unreadable_config_file_exits_64() {
    let out = gateway(&["--config", "/nonexistent/dmsc-gateway.toml"]);
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("/nonexistent/dmsc-gateway.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_flags_exit_64_and_help_exits_0() {
    let out = gateway(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", stderr(&out));
    assert!(stderr(&out).contains("--no-such-flag"), "{}", stderr(&out));
    let out = gateway(&["--workers", "two"]);
    assert_eq!(out.status.code(), Some(EX_USAGE), "{}", stderr(&out));
    let out = gateway(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
