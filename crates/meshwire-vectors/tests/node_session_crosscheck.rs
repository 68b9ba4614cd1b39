#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! meshwire's legacy-KDF mesh sessions (and the shared 4.0.0 recording),
//! re-recorded byte for byte by two MeshClients of the published npm SDK
//! 4.0.0 (`interop/node/record_session.mjs`).

use std::path::Path;
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Whether node and the pinned SDK (`npm ci` in interop/node) are there;
/// outside CI their absence skips the test, in CI it fails it.
fn sdk_ready() -> bool {
    let sdk = repo().join("interop/node/node_modules/@microsoft/agent-governance-sdk/package.json");
    let node = Command::new("node").arg("--version").output();
    let missing = match (&node, sdk.is_file()) {
        (Ok(out), true) if out.status.success() => return true,
        (Ok(out), _) if out.status.success() => format!("{} (run `npm ci` in interop/node)", sdk.display()),
        _ => "node".to_owned(),
    };
    assert!(std::env::var_os("CI").is_none(), "CI without {missing}");
    eprintln!("skipping: no {missing}");
    false
}

#[test]
fn npm_sdk_rerecords_our_legacy_mesh_sessions() {
    if !sdk_ready() {
        return;
    }
    let mut command = Command::new("node");
    command
        .current_dir(repo().join("interop/node"))
        .arg("record_session.mjs")
        .arg(repo().join("vectors/mesh-session-legacy-ff-salt.json"));
    let shared = repo().join("../shared/vectors/ts-sdk-4.0.0");
    if shared.is_dir() {
        command.arg(&shared);
    }
    let output = command.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "record_session.mjs failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for case in [
        "mesh-alice-bob",
        "mesh-conversation",
        "mesh-knock-rejected",
        "mesh-knock-verdicts",
        "mesh-buffered-before-knock",
        "mesh-pending-after-reconnect",
        "mesh-disconnect",
        "mesh-relay-frames",
        "mesh-plaintext-peers",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("PASS") && l.contains("mesh-session-legacy-ff-salt.json") && l.contains(case)),
            "{case} not re-recorded by the SDK"
        );
    }
    assert!(!stdout.lines().any(|l| l.starts_with("FAIL")));
}
