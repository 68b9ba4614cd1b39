#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! meshwire's legacy-KDF mesh sessions (and the shared 4.0.0 recording),
//! re-recorded byte for byte by two MeshClients of the published npm SDK
//! 4.0.0 (`interop/node/record_session.mjs`). Needing node and the npm
//! registry, the test is `#[ignore]`d; CI runs it (after `npm ci` in
//! interop/node) with `cargo test --workspace -- --ignored online_`.

use std::process::Command;

mod common;
use common::repo;

/// Fails the test, naming what is missing, unless node and the pinned SDK
/// (`npm ci` in interop/node) are there.
fn assert_sdk_ready() {
    let sdk = repo().join("interop/node/node_modules/@microsoft/agent-governance-sdk/package.json");
    let node = Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|out| out.status.success()),
        "node is not available: this test runs the npm SDK 4.0.0"
    );
    assert!(sdk.is_file(), "no {} (run `npm ci` in interop/node)", sdk.display());
}

#[test]
#[ignore = "needs node and the npm registry (`npm ci` in interop/node); run with `-- --ignored online_`, as CI does"]
fn online_npm_sdk_rerecords_our_legacy_mesh_sessions() {
    assert_sdk_ready();
    let mut command = Command::new("node");
    command
        .current_dir(repo().join("interop/node"))
        .arg("record_session.mjs")
        .arg(repo().join("vectors/mesh-session-legacy-ff-salt.json"));
    let shared = common::shared_vectors_dir().join("ts-sdk-4.0.0");
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
