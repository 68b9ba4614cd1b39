#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The README cannot drift: every ```rust block of it appears verbatim
//! below, inside a function that gives it what it assumes, and runs; every
//! `meshwire` command of its ```sh blocks parses (run with `--help`), its
//! vector command succeeds on this checkout (with or without
//! `../shared/vectors`), and every example it names exists and every
//! example there is names.

use std::error::Error;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const README: &str = include_str!("../../../README.md");
const THIS_FILE: &str = include_str!("readme.rs");
const BIN: &str = env!("CARGO_BIN_EXE_meshwire");

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

// ── The README's Rust blocks, verbatim (the check below keeps them so) ──

#[rustfmt::skip]
async fn readme_using_the_client(relay_url: String, registry_url: String) -> Result<meshwire::Message, Box<dyn Error>> {
    use meshwire::{Identity, MeshClient};
    use serde_json::json;
    use std::time::Duration;

    let me = MeshClient::builder(Identity::generate(&mut rand_core::OsRng), relay_url, registry_url)
        .display_name("planner")
        .connect()                                   // register (proof of possession), publish pre-keys, join the relay
        .await?;
    let worker = me.find("worker").await?.ok_or("no agent called worker")?;
    me.send(&worker, &json!({"task": "summarize", "doc": 42})).await?;   // X3DH + KNOCK on first use
    let reply = me.recv_from_any(&[worker.as_str()], Duration::from_secs(30)).await?;
    me.close().await;
    Ok(reply)
}

/// The application's handling of a message (the README's `handle`).
fn handle(message: &meshwire::Message) -> Result<(), Box<dyn Error>> {
    let _ = message;
    Ok(())
}

#[rustfmt::skip]
#[allow(dead_code)] // compiled, not run: it would write under /var/lib
async fn readme_crash_consistent(identity: meshwire::Identity, relay_url: String, registry_url: String) -> Result<(), Box<dyn Error>> {
    use meshwire::MeshClient;

    let agent = MeshClient::builder(identity, relay_url, registry_url)
        .state_dir("/var/lib/my-agent/state")   // SQLite, one file per agent, 0600
        .connect()
        .await?;
    while let Some(message) = agent.recv().await {
        handle(&message)?;   // acknowledged when the loop asks for the next one
    }
    Ok(())
}

#[rustfmt::skip]
fn readme_using_the_core() -> Result<(), Box<dyn Error>> {
    use meshwire_proto::{Identity, KdfDialect, PreKeys, SecureChannel};
    use rand_core::OsRng;

    let alice = Identity::generate(&mut OsRng);
    let bob = Identity::generate(&mut OsRng);
    let mut bob_keys = PreKeys::generate(&mut OsRng, &bob);
    let otk = bob_keys.generate_one_time_keys(&mut OsRng, 1)?[0];
    let bundle = bob_keys.bundle(&bob, Some(otk));          // what the registry serves

    let (mut to_bob, establishment) =
        SecureChannel::initiate(&mut OsRng, &alice, bob.did(), &bundle, KdfDialect::Spec)?;
    let first = to_bob.encrypt(&mut OsRng, b"hello")?;
    // Bob's one-time key is removed only once this first message decrypted.
    let (mut to_alice, text) = SecureChannel::accept(
        &mut OsRng, &bob, &mut bob_keys, alice.did(), &establishment, &first, KdfDialect::Spec)?;

    assert_eq!(text, b"hello");
    assert_eq!(bob_keys.one_time_key_count(), 0);
    let reply = to_alice.encrypt(&mut OsRng, b"hi")?;
    assert_eq!(to_bob.decrypt(&mut OsRng, &reply)?, b"hi");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_block_runs_against_the_embedded_server() {
    let server = meshwire_server::start(meshwire_server::ServerConfig::default())
        .await
        .unwrap();
    let worker = meshwire::MeshClient::builder(
        meshwire::Identity::generate(&mut rand_core::OsRng),
        server.relay_url(),
        server.registry_url(),
    )
    .display_name("worker")
    .connect()
    .await
    .unwrap();
    let answering = tokio::spawn(async move {
        let task = worker.recv_timeout(Duration::from_secs(30)).await.unwrap();
        let reply = serde_json::json!({"summary": "done", "task": task.payload.as_json().cloned()});
        worker.send(&task.from, &reply).await.unwrap();
        (worker, task)
    });
    let reply = readme_using_the_client(server.relay_url(), server.registry_url())
        .await
        .unwrap();
    let (worker, task) = answering.await.unwrap();
    assert_eq!(
        task.payload.as_json(),
        Some(&serde_json::json!({"task": "summarize", "doc": 42}))
    );
    assert_eq!(reply.from, worker.did());
    assert_eq!(
        reply.payload.as_json(),
        Some(&serde_json::json!({"summary": "done", "task": {"task": "summarize", "doc": 42}}))
    );
    worker.close().await;
}

#[test]
fn the_core_block_runs() {
    readme_using_the_core().unwrap();
}

// ── The check that the blocks above are the README's ──

/// The README's fenced blocks of `language`, as lists of lines.
fn blocks(language: &str) -> Vec<Vec<&'static str>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in README.lines() {
        match (&mut current, line.trim_start().strip_prefix("```")) {
            (None, Some(tag)) if tag.trim() == language => current = Some(Vec::new()),
            (Some(_), Some("")) => blocks.extend(current.take()),
            (Some(block), _) => block.push(line),
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "unclosed ```{language} block in README.md");
    blocks
}

/// Whether `block` appears in `text` as consecutive lines, all indented by
/// the same amount (blank lines match blank lines).
fn appears_verbatim(block: &[&str], text: &str) -> bool {
    let lines: Vec<&str> = text.lines().collect();
    let Some(first) = block.first() else { return true };
    (0..lines.len()).any(|start| {
        let Some(indent) = lines[start].strip_suffix(first) else {
            return false;
        };
        indent.chars().all(|c| c == ' ')
            && block.iter().enumerate().all(|(i, want)| match lines.get(start + i) {
                Some(have) if want.is_empty() => have.trim().is_empty(),
                Some(have) => have.strip_prefix(indent) == Some(*want),
                None => false,
            })
    })
}

#[test]
fn every_rust_block_of_the_readme_is_compiled_here() {
    let rust = blocks("rust");
    assert!(rust.len() >= 2, "found {} ```rust blocks", rust.len());
    for block in rust {
        assert!(
            appears_verbatim(&block, THIS_FILE),
            "this README block is not in crates/meshwire-cli/tests/readme.rs \
             (copy it into the readme_* function it belongs to):\n{}",
            block.join("\n")
        );
    }
}

// ── The README's shell commands ──

/// Splits a command line on spaces, keeping "double-quoted" words whole.
fn words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// The `meshwire` invocations of the README's sh blocks: the words after
/// `meshwire` (or after `cargo run -p meshwire-cli --`).
fn meshwire_commands() -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    for block in blocks("sh") {
        for line in block {
            let code = line.split(" #").next().unwrap_or_default();
            for segment in code.split('|') {
                let w = words(segment.trim());
                if w.first().map(String::as_str) == Some("meshwire") {
                    commands.push(w[1..].to_vec());
                } else if w.starts_with(&[
                    "cargo".into(),
                    "run".into(),
                    "-p".into(),
                    "meshwire-cli".into(),
                    "--".into(),
                ]) {
                    commands.push(w[5..].to_vec());
                }
            }
        }
    }
    commands
}

fn meshwire_command() -> Command {
    let mut command = Command::new(BIN);
    command.current_dir(repo()).stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESHWIRE_") {
            command.env_remove(key);
        }
    }
    command
}

#[test]
fn every_meshwire_command_of_the_readme_parses() {
    let commands = meshwire_commands();
    assert!(commands.len() >= 6, "found only {commands:?}");
    for args in commands {
        let out = meshwire_command().args(&args).arg("--help").output().unwrap();
        assert!(
            out.status.success(),
            "`meshwire {} --help` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The README's `vectors verify` command ends cleanly on this checkout,
/// whether `../shared/vectors` is there or not.
#[test]
fn the_readme_vector_command_succeeds_with_or_without_shared_vectors() {
    let verify: Vec<Vec<String>> = meshwire_commands()
        .into_iter()
        .filter(|args| args.starts_with(&["vectors".into(), "verify".into()]))
        .collect();
    assert_eq!(verify.len(), 1, "{verify:?}");
    let out = meshwire_command().args(&verify[0]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "`meshwire {}` failed:\n{stdout}",
        verify[0].join(" ")
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.contains(" passed, 0 failed"), "{last}");
    if !repo().join("../shared/vectors").is_dir() {
        assert!(
            stdout.contains("SKIP ../shared/vectors: no such file or folder"),
            "{stdout}"
        );
    }
}

/// Every example exists, and every example is in the README.
#[test]
fn the_readme_names_every_example_and_only_real_ones() {
    let mut examples = Vec::new();
    for manifest in [
        "crates/meshwire/Cargo.toml",
        "crates/meshwire-proto/Cargo.toml",
        "crates/meshwire-server/Cargo.toml",
    ] {
        let text = std::fs::read_to_string(repo().join(manifest)).unwrap();
        for line in text.lines() {
            if let Some(path) = line.strip_prefix("path = \"") {
                if let Some(stem) = path.strip_suffix(".rs\"").and_then(|p| p.rsplit('/').next()) {
                    if path.contains("examples/") {
                        examples.push(stem.to_owned());
                    }
                }
            }
        }
    }
    for dir in ["examples", "crates/meshwire/examples"] {
        for entry in std::fs::read_dir(repo().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
                assert!(
                    examples.contains(&stem),
                    "{} is not declared as an example",
                    path.display()
                );
            }
        }
    }
    assert!(examples.len() >= 5, "{examples:?}");
    for name in &examples {
        assert!(
            README.contains(&format!("--example {name}")),
            "the README does not mention `--example {name}`"
        );
    }
    let named: Vec<&str> = README
        .split("--example ")
        .skip(1)
        .filter_map(|rest| rest.split([' ', '`']).next())
        .collect();
    for name in named {
        assert!(
            examples.iter().any(|e| e == name),
            "the README names example {name:?}, which does not exist"
        );
    }
    for entry in std::fs::read_dir(repo().join("examples/python")).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".py") {
            assert!(
                README.contains(&format!("examples/python/{name}")),
                "the README does not mention examples/python/{name}"
            );
        }
    }
}
