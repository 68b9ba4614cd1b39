#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The `echo` example (issue 11 §2): two echo agents, one started with
//! `--greet` toward the other, exchange one greeting and one echo, then
//! stop; echoes are never echoed. Bounded: two processes on 127.0.0.1 for
//! a few seconds.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Builds the example (a no-op when fresh) and returns its path.
fn echo_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", "meshwire", "--example", "echo"])
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the echo example failed");
    // target/<profile>/deps/<this test> -> target/<profile>/examples/echo
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|p| p.parent()).unwrap();
    let echo = profile_dir
        .join("examples")
        .join(format!("echo{}", std::env::consts::EXE_SUFFIX));
    assert!(echo.is_file(), "{} missing", echo.display());
    echo
}

struct Agent {
    child: Child,
    did: String,
}

fn start(echo: &PathBuf, relay: &str, registry: &str, name: &str, greet: Option<&str>) -> Agent {
    let mut command = Command::new(echo);
    command
        .args(["--relay", relay, "--registry", registry, "--name", name])
        .env_remove("MESHWIRE_GREET")
        .env_remove("MESHWIRE_IDENTITY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(did) = greet {
        command.args(["--greet", did]);
    }
    let mut child = command.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let did = line.trim().to_owned();
    assert!(did.starts_with("did:mesh:"), "first line: {line:?}");
    Agent { child, did }
}

fn stop(mut agent: Agent) -> String {
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    let mut log = String::new();
    agent.child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn two_echo_agents_do_not_bounce_forever() {
    let echo = echo_binary();
    let server = meshwire_server::start(Default::default()).await.unwrap();
    let (relay, registry) = (server.relay_url(), server.registry_url());
    let quiet = start(&echo, &relay, &registry, "echo-quiet", None);
    let greeter = start(&echo, &relay, &registry, "echo-greeter", Some(&quiet.did));
    // Long enough for dozens of round trips had they bounced.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let greeter_did = greeter.did.clone();
    let greeter_log = stop(greeter);
    let quiet_log = stop(quiet);
    let count = |log: &str, what: &str| log.lines().filter(|l| l.contains(what)).count();
    // The quiet agent answered the greeting, once.
    assert_eq!(
        count(&quiet_log, &format!("from {greeter_did}: answered")),
        1,
        "{quiet_log}"
    );
    assert_eq!(count(&quiet_log, "not answering"), 0, "{quiet_log}");
    // The greeter got the echo and did not answer it.
    assert_eq!(count(&greeter_log, "not answering an echo"), 1, "{greeter_log}");
    assert_eq!(count(&greeter_log, "answered"), 0, "{greeter_log}");
    server.shutdown().await;
}
