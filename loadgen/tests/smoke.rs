//! End-to-end runs of the built `dmsc-loadgen` binary: the short self-contained run CI does,
//! a short `compare`, a small `attach`, and a refused flag. They check outcomes and files, never
//! timings.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const LOADGEN: &str = env!("CARGO_BIN_EXE_dmsc-loadgen");

/// A fresh directory under the system temporary directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dmsc-loadgen-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(dir: &Path, args: &[&str]) -> Output {
    let output = Command::new(LOADGEN)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the loadgen runs");
    eprintln!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn assert_clean(summary: &Value, mode: &str) {
    assert_eq!(summary["mode"], mode);
    assert!(summary["requests"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(summary["errors"], serde_json::json!({}), "{summary}");
    assert!(summary["p50_us"].as_u64().unwrap() > 0);
    assert!(summary["p50_us"].as_u64() <= summary["p99_us"].as_u64());
    assert!(summary["requests_per_sec"].as_f64().unwrap() > 0.0);
}

fn assert_written(path: PathBuf) {
    let len = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .len();
    assert!(len > 0, "{} is empty", path.display());
}

#[test]
fn a_short_self_contained_run_succeeds_and_writes_its_files() {
    let dir = scratch("smoke");
    let output = run(
        &dir,
        &[
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--json",
            "summary.json",
        ],
    );
    assert!(output.status.success(), "exit status {}", output.status);
    let summary = read_json(&dir.join("summary.json"));
    assert_clean(&summary, "gateway");
    assert_eq!(summary["concurrency"], 64);
    assert!(summary["rate"].is_null());
    // The A2A path ran too (default 2 s): answered, and without errors.
    let a2a = &summary["a2a"];
    assert!(a2a["requests"].as_u64().unwrap_or(0) > 0, "{a2a}");
    assert_eq!(a2a["errors"], 0, "{a2a}");
    for file in ["latency.hgrm", "latency.hlog", "latency.svg"] {
        assert_written(dir.join("loadgen-out").join(file));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A short `compare` in `dir` (8 in flight, two rounds of 300 ms per mode), writing
/// `compare.json` and `out/`, with `extra` flags.
fn short_compare(dir: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "compare",
        "--concurrency",
        "8",
        "--duration",
        "600ms",
        "--rounds",
        "2",
        "--warmup",
        "200ms",
        "--json",
        "compare.json",
        "--out",
        "out",
    ];
    args.extend_from_slice(extra);
    run(dir, &args)
}

#[test]
fn compare_runs_both_modes_against_the_same_agents() {
    let dir = scratch("compare");
    // The gateway on the last CPU this process may use, everything else on the first (one and
    // the same with one CPU): the run must work so placed, and say so in its summary.
    let cpus = dmsc_loadgen::affinity::allowed();
    let (first, last) = (cpus[0].to_string(), cpus[cpus.len() - 1].to_string());
    let output = short_compare(&dir, &["--gateway-cpu", &last, "--load-cpu", &first]);
    assert!(output.status.success(), "exit status {}", output.status);
    let doc = read_json(&dir.join("compare.json"));
    assert_clean(&doc["gateway"], "gateway");
    assert_clean(&doc["direct"], "direct");
    assert!(doc["direct"]["cpu_us_per_request"]["gateway"].is_null());
    // The gateway's own packet counts, ACK-only ones included, read from its metrics; none
    // in direct mode.
    let gateway = &doc["gateway"]["per_request"]["gateway"];
    let sent = gateway["datagrams_sent"]
        .as_f64()
        .expect("gateway datagrams");
    let ack_only = gateway["ack_only_sent"].as_f64().expect("gateway ACK-only");
    assert!(sent > 0.0 && (0.0..=sent).contains(&ack_only), "{gateway}");
    assert!(doc["direct"]["per_request"]["gateway"]["ack_only_sent"].is_null());
    // Where the roles ran, for whoever reads the file later.
    assert_eq!(doc["gateway"]["gateway_busy_poll_us"], 0);
    assert_eq!(doc["gateway"]["gateway_cpu"].to_string(), last);
    assert_eq!(doc["direct"]["load_cpu"].to_string(), first);
    assert!(doc["direct"]["gateway_cpu"].is_null());
    assert!(doc["ratios"]["requests_per_sec"].as_f64().unwrap() > 0.0);
    assert!(doc["added_latency_us"]["p50"].is_i64());
    for file in [
        "gateway.hgrm",
        "gateway.hlog",
        "direct.hgrm",
        "direct.hlog",
        "latency.svg",
    ] {
        assert_written(dir.join("out").join(file));
    }
    let svg = std::fs::read_to_string(dir.join("out/latency.svg")).unwrap();
    assert_eq!(svg.matches("<polyline class=\"series\"").count(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compare_with_two_gateways_runs_three_modes_side_by_side() {
    let dir = scratch("compare2");
    let output = short_compare(&dir, &["--gateways", "2"]);
    assert!(output.status.success(), "exit status {}", output.status);
    let doc = read_json(&dir.join("compare.json"));
    assert_clean(&doc["two_gateways"], "two-gateways");
    assert_clean(&doc["gateway"], "gateway");
    assert_clean(&doc["direct"], "direct");
    for key in ["two_gateways_vs_one", "two_gateways_vs_direct"] {
        assert!(
            doc[key]["requests_per_sec"].as_f64().unwrap() > 0.0,
            "{doc}"
        );
        assert!(doc[key]["added_latency_us"]["p50"].is_i64(), "{doc}");
    }
    assert!(doc["two_gateways"]["cpu_us_per_request"]["gateway"].is_f64());
    assert_written(dir.join("out").join("two-gateways.hgrm"));
    let svg = std::fs::read_to_string(dir.join("out/latency.svg")).unwrap();
    assert_eq!(svg.matches("<polyline class=\"series\"").count(), 3);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("two gateways vs one gateway"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn attach_attaches_every_agent_and_reports_the_gateway_memory() {
    let dir = scratch("attach");
    let output = run(
        &dir,
        &[
            "attach",
            "--agents",
            "50",
            "--concurrency",
            "8",
            "--idle",
            "200ms",
            "--max-streams-per-connection",
            "64",
            "--json",
            "attach.json",
        ],
    );
    assert!(output.status.success(), "exit status {}", output.status);
    let doc = read_json(&dir.join("attach.json"));
    assert_eq!(doc["agents"], 50);
    assert_eq!(doc["attached"], 50);
    assert_eq!(doc["failures"], serde_json::json!({}), "{doc}");
    assert!(doc["attaches_per_sec"].as_f64().unwrap() > 0.0);
    assert!(doc["attach_p50_us"].as_u64().unwrap() > 0);
    assert!(doc["attach_p50_us"].as_u64() <= doc["attach_p99_us"].as_u64());
    assert!(doc["duration_s"].as_f64().unwrap() > 0.0);
    assert_eq!(doc["max_streams_per_connection"], 64);
    let per_worker: u64 = doc["agents_per_worker"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(per_worker, 50);
    if cfg!(target_os = "linux") {
        assert!(doc["rss_before_bytes"].as_u64().unwrap() > 0);
        assert!(doc["rss_after_bytes"].as_u64().unwrap() > 0);
        assert!(doc["rss_per_agent_bytes"].is_i64(), "{doc}");
        assert!(doc["gateway_cpu_us_per_attach"].is_f64(), "{doc}");
        assert!(doc["loadgen_cpu_percent"].is_f64(), "{doc}");
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("B per idle attached agent"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_flag_is_a_usage_error_that_names_it() {
    let dir = scratch("usage");
    let output = run(&dir, &["--duration", "5"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--duration"), "{stderr}");
    assert!(stderr.contains("add a unit"), "{stderr}");
    let output = run(&dir, &["--callers", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--callers must be between"));
    let output = run(&dir, &["--gateways", "3"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--gateways must be between"));
    let output = run(&dir, &["--gateways", "2", "--mode", "direct"]);
    assert_eq!(output.status.code(), Some(2));
    let output = run(&dir, &["attach", "--agents", "0"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--agents must be between"));
    let _ = std::fs::remove_dir_all(&dir);
}
