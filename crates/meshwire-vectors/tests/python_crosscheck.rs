#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! meshwire's own vectors (and the shared ones), re-derived by the real
//! Python package `agentmesh` 5.0.0 from PyPI.

use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The AGT venv, installed on first use; None (skip) only outside CI when
/// python3 is missing.
fn agt_python() -> Option<String> {
    let setup = repo().join("interop/python/setup_venv.sh");
    let output = match Command::new("bash").arg(&setup).output() {
        Ok(output) => output,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: cannot run {}: {e}", setup.display());
            return None;
        }
        Err(e) => panic!("{}: {e}", setup.display()),
    };
    assert!(
        output.status.success(),
        "setup_venv.sh failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let venv = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    Some(format!("{venv}/bin/python"))
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
fn python_package_rederives_our_vectors() {
    let Some(python) = agt_python() else { return };
    let mut command = Command::new(&python);
    command
        .arg(repo().join("interop/python/crosscheck_vectors.py"))
        .arg(repo().join("vectors"));
    let shared = repo().join("../shared/vectors");
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
