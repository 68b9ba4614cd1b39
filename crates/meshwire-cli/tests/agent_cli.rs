#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Two agents talk through `meshwire serve` with the CLI alone (issue 11
//! §1), twice in a row: the second run reuses the saved sessions, so no
//! new KNOCK is sent or received. Also `id`, `find`, `discover`, `ping`
//! and the errors a person sees. Everything on 127.0.0.1, bounded in time.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::{spawn_piped, BIN};

const WAIT: Duration = Duration::from_secs(30);

/// A process whose stdout and stderr lines arrive on channels.
struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    err_lines: Vec<String>,
}

impl Running {
    fn spawn(command: &mut Command) -> Self {
        let (child, stdout, stderr) = spawn_piped(command);
        Self {
            child,
            stdout,
            stderr,
            err_lines: Vec::new(),
        }
    }

    fn next_stdout(&mut self) -> String {
        self.stdout
            .recv_timeout(WAIT)
            .unwrap_or_else(|e| panic!("no stdout line ({e}); stderr: {:?}", self.drain_stderr()))
    }

    fn wait_stderr(&mut self, what: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.err_lines.push(line.clone());
                    if line.contains(what) {
                        return line;
                    }
                }
                Err(e) => panic!("no stderr line with {what:?} ({e}): {:?}", self.err_lines),
            }
        }
    }

    fn drain_stderr(&mut self) -> Vec<String> {
        while let Ok(line) = self.stderr.try_recv() {
            self.err_lines.push(line);
        }
        self.err_lines.clone()
    }

    /// SIGTERM, then the stderr lines it printed.
    fn stop(mut self) -> Vec<String> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        self.drain_stderr()
    }
}

/// `meshwire` with a private HOME and data directory (the defaults land
/// there) and no MESHWIRE_* variables from the caller.
fn meshwire(home: &Path) -> Command {
    let mut command = Command::new(BIN);
    command
        .env("HOME", home)
        .env("XDG_DATA_HOME", home.join("data"))
        .env("NO_COLOR", "1");
    for key in [
        "MESHWIRE_RELAY",
        "MESHWIRE_REGISTRY",
        "MESHWIRE_IDENTITY",
        "MESHWIRE_STATE",
        "MESHWIRE_NAME",
        "MESHWIRE_RELAY_TOKEN_FILE",
    ] {
        command.env_remove(key);
    }
    command
}

fn run(command: &mut Command) -> Output {
    command.stdin(Stdio::null()).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn temp_home(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshwire-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `meshwire serve` on a free loopback port: (process, relay URL, registry URL).
fn serve(home: &Path, extra: &[&str]) -> (Running, String, String) {
    let mut server = Running::spawn(meshwire(home).args(["serve", "--listen", "127.0.0.1:0"]).args(extra));
    let mut relay = String::new();
    while !relay.starts_with("meshwire relay") {
        relay = server.next_stdout();
    }
    let registry = server.next_stdout();
    let relay = relay.strip_prefix("meshwire relay").unwrap().trim().to_owned();
    let registry = registry.strip_prefix("meshwire registry").unwrap().trim().to_owned();
    assert!(
        relay.starts_with("ws://127.0.0.1:") && relay.ends_with("/ws"),
        "{relay}"
    );
    (server, relay, registry)
}

fn listen(home: &Path, relay: &str, registry: &str, extra: &[&str]) -> Running {
    let mut listener = Running::spawn(
        meshwire(home)
            .args([
                "listen",
                "--json",
                "--name",
                "bob",
                "--relay",
                relay,
                "--registry",
                registry,
                "-v",
            ])
            .args(extra),
    );
    listener.wait_stderr("listening as");
    listener
}

fn send(home: &Path, relay: &str, registry: &str, message: &str, extra: &[&str]) -> Output {
    let out = run(meshwire(home)
        .args([
            "send",
            "--name",
            "alice",
            "--to",
            "bob",
            "--relay",
            relay,
            "--registry",
            registry,
            "-v",
            message,
        ])
        .args(extra));
    assert!(out.status.success(), "send failed: {}", text(&out.stderr));
    out
}

fn did_of(home: &Path, name: &str) -> String {
    let out = run(meshwire(home).args(["id", "show", "--name", name]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

#[test]
fn two_agents_talk_twice_and_the_second_run_opens_no_session() {
    let home = temp_home("talk");
    let (server, relay, registry) = serve(&home, &[]);

    // Run 1: the first message opens the session (one KNOCK).
    let mut bob = listen(&home, &relay, &registry, &[]);
    let out = send(&home, &relay, &registry, "hello bob", &[]);
    let alice_did = did_of(&home, "alice");
    let id1 = text(&out.stdout).trim().to_owned();
    assert!(text(&out.stderr).contains("knock=1"), "{}", text(&out.stderr));
    let line: serde_json::Value = serde_json::from_str(&bob.next_stdout()).unwrap();
    assert_eq!(line["from"], alice_did.as_str());
    assert_eq!(line["id"], id1.as_str());
    assert_eq!(line["payload"], serde_json::json!({"text": "hello bob"}));
    bob.wait_stderr(&format!("knock from {alice_did}: accepted"));
    let bob_did = did_of(&home, "bob");
    bob.stop();

    // Run 2: both agents restart from their saved state: no KNOCK at all.
    let mut bob = listen(&home, &relay, &registry, &["--echo"]);
    // This time `send` also waits for bob's end-to-end receipt.
    let out = send(&home, &relay, &registry, "hello again", &["--wait-receipt"]);
    let sent = text(&out.stderr);
    assert!(sent.contains("frames sent:") && sent.contains("message="), "{sent}");
    assert!(
        !sent.contains("knock"),
        "the second run sent a KNOCK: {sent}\nbob: {:#?}",
        bob.drain_stderr()
    );
    let line: serde_json::Value = serde_json::from_str(&bob.next_stdout()).unwrap();
    assert_eq!(line["payload"], serde_json::json!({"text": "hello again"}));
    assert_eq!(line["id"], text(&out.stdout).trim());

    // find, discover and ping (bob echoes in this run).
    let out = run(meshwire(&home).args(["find", "bob", "--registry", &registry]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), bob_did);
    let out = run(meshwire(&home).args(["discover", "--registry", &registry]));
    assert!(text(&out.stdout).contains(&bob_did), "{}", text(&out.stdout));
    let out = run(meshwire(&home).args([
        "ping",
        "bob",
        "-c",
        "2",
        "--name",
        "alice",
        "--relay",
        &relay,
        "--registry",
        &registry,
    ]));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pings = text(&out.stdout);
    assert_eq!(pings.matches("reply from bob").count(), 2, "{pings}");
    let bob_log = bob.stop();
    assert!(
        !bob_log.iter().any(|l| l.contains("knock from")),
        "the second run received a KNOCK: {bob_log:?}"
    );
    server.stop();
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn identity_files() {
    let home = temp_home("id");
    let file = home.join("new").join("folder").join("id.json");
    let out = run(meshwire(&home).args(["id", "new", "--out"]).arg(&file));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let did = text(&out.stdout).trim().to_owned();
    assert!(did.starts_with("did:mesh:"), "{did}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let out = run(meshwire(&home).args(["id", "show"]).arg(&file));
    assert_eq!(text(&out.stdout).trim(), did);
    // A file others can read is refused, its mode written in octal.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = run(meshwire(&home).args(["id", "show"]).arg(&file));
        let err = text(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains("(mode 0644)") && err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // No overwrite without --force.
    let out = run(meshwire(&home).args(["id", "new", "--out"]).arg(&file));
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("exists already"), "{}", text(&out.stderr));
    // A folder given as an identity file says so.
    let out = run(meshwire(&home).args(["id", "show"]).arg(&home));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("is a folder, not a file"),
        "{err}"
    );
    // A missing folder is an error where the command does not create files.
    let out = run(meshwire(&home)
        .args(["send", "--to", "did:mesh:0000", "x", "--identity"])
        .arg(home.join("missing").join("id.json")));
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("does not exist (create it first)"), "{err}");
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn connect_failures_are_named_quickly() {
    let home = temp_home("errors");
    let (server, _relay, registry) = serve(&home, &["--relay-token", "tok3n"]);
    // A relay nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let out = run(meshwire(&home).args([
        "listen",
        "--name",
        "carol",
        "--relay",
        &format!("ws://127.0.0.1:{port}"),
        "--registry",
        &registry,
    ]));
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("connection refused"), "{err}");
    assert!(
        !err.contains("Error {") && !err.contains("kind:"),
        "Debug output: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // The relay wants a token: without it, 4003; with it, joined.
    let relay = registry.replacen("http://", "ws://", 1);
    let out = run(meshwire(&home).args([
        "send",
        "--name",
        "carol",
        "--to",
        "nobody",
        "x",
        "--relay",
        &relay,
        "--registry",
        &registry,
    ]));
    let err = text(&out.stderr);
    assert!(err.contains("close code 4003"), "{err}");
    let token = home.join("token");
    std::fs::write(&token, "tok3n\n").unwrap();
    let out = run(meshwire(&home)
        .args([
            "send",
            "--name",
            "carol",
            "--to",
            "nobody",
            "x",
            "--relay",
            &relay,
            "--registry",
            &registry,
        ])
        .arg("--relay-token-file")
        .arg(&token));
    let err = text(&out.stderr);
    assert!(err.contains("no agent named \"nobody\""), "{err}");
    server.stop();
    let _ = std::fs::remove_dir_all(&home);
}
