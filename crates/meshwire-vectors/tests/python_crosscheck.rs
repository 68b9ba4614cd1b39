#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! meshwire's own vectors (and the shared ones), re-derived by the real
//! Python package `agentmesh` 5.0.0 from PyPI. Needing PyPI, the test is
//! `#[ignore]`d; CI runs it with `cargo test --workspace -- --ignored online_`.

use std::process::Command;

mod common;
use common::repo;

/// The AGT venv's python, installed on first use by
/// `interop/python/setup_venv.sh` (python3 and PyPI, or a ready `$AGT_VENV`).
fn agt_python() -> String {
    let setup = repo().join("interop/python/setup_venv.sh");
    let output = Command::new("bash")
        .arg(&setup)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", setup.display()));
    assert!(
        output.status.success(),
        "setup_venv.sh could not make the AGT venv (no PyPI access? set AGT_VENV to a ready one):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let venv = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    format!("{venv}/bin/python")
}

fn summary(stdout: &str) -> (usize, usize) {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.contains(" passed, "))
        .expect("no summary line");
    let mut numbers = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|n| n.parse().unwrap());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

#[test]
#[ignore = "needs PyPI (agent-governance-toolkit-core 5.0.0 into target/agt-venv); run with `-- --ignored online_`, as CI does"]
fn online_python_package_rederives_our_vectors() {
    let python = agt_python();
    let mut command = Command::new(&python);
    command
        .arg(repo().join("interop/python/crosscheck_vectors.py"))
        .arg(repo().join("vectors"));
    let shared = common::shared_vectors_dir();
    if shared.is_dir() {
        command.arg(&shared);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "cross-check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (passed, failed) = summary(&stdout);
    assert_eq!(failed, 0);
    // Every x3dh/ratchet/identity case of ours: 4 x3dh, 7 ratchet, 3 identity.
    assert!(passed >= 14, "only {passed} cases re-derived");
    for case in [
        "skip-101-rejected",
        "random-order-200",
        "large-message",
        "conversation-no-otk",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with("PASS") && l.contains(case)),
            "{case} not re-derived"
        );
    }
}
