//! `dmsc-control compile`: a valid domain prints its generation (the same for the same input),
//! an invalid one exits 64 with the file, line and key.

use std::process::{Command, Output};

fn control(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmsc-control"))
        .args(args)
        .output()
        .expect("run dmsc-control")
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("dmsc-compile-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn the_example_compiles_to_a_stable_generation() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/domain.example.toml");
    let first = control(&["compile", "--config", example]);
    assert!(first.status.success(), "{first:?}");
    let text = String::from_utf8(first.stdout).unwrap();
    let generation = text
        .lines()
        .find_map(|l| l.strip_prefix("generation"))
        .map(str::trim)
        .expect("a generation line")
        .to_owned();
    assert_eq!(generation.len(), 64, "{text}");
    let again = control(&["compile", "--config", example]);
    assert!(String::from_utf8(again.stdout)
        .unwrap()
        .contains(&generation));
    // The embedded development domain compiles too.
    assert!(control(&["compile"]).status.success());
}

#[test]
fn an_invalid_domain_exits_64_naming_the_place() {
    let path = write(
        "bad.toml",
        "[domain]\nname = \"x.test\"\ntrust_anchor = \"ca.pem\"\nbogus = 1\n",
    );
    let out = control(&["compile", "--config", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains(":4:") && err.contains("bogus"), "{err}");
}
