//! Test backends: the embedded meshwire server, or the real AGT 5.0.0 relay
//! and registry started from the project's venv.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod fake_relay;

use meshwire::{ClientConfig, ClientEvent, Identity, MeshClient, Persistence};
use meshwire_server::{RunningServer, ServerConfig};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The reference runtimes' golden vectors: `$MESHWIRE_SHARED_VECTORS`, else
/// `../shared/vectors` beside the repository (where CI puts them). They are
/// not part of the repository: without them the tests that read them say
/// that they skipped (see [`skipped`]) and get None.
pub fn shared_vectors() -> Option<PathBuf> {
    let dir = std::env::var_os("MESHWIRE_SHARED_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/vectors"));
    if dir.is_dir() {
        Some(dir)
    } else {
        skipped(&format!(
            "no shared vectors at {} (set MESHWIRE_SHARED_VECTORS to their folder)",
            dir.display()
        ));
        None
    }
}

/// Prints `SKIPPED <test>: <reason>` straight to the process's stderr:
/// libtest captures only `print!`/`eprint!`, so the line shows without
/// `--nocapture`, next to the test's `ok`.
pub fn skipped(reason: &str) {
    use std::io::Write;
    let thread = std::thread::current();
    let test = thread.name().filter(|n| *n != "main").unwrap_or("a test");
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {reason}");
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The AGT venv's python, installed on first use by
/// `interop/python/setup_venv.sh` (python3 and PyPI, or a ready `$AGT_VENV`).
/// Only tests `#[ignore]`d for needing PyPI call it (`online_` in their
/// names: `cargo test --workspace -- --ignored online_` runs them), so a
/// missing prerequisite fails the test that was asked for, naming it.
pub fn agt_python() -> PathBuf {
    let has_python = Command::new("python3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        has_python.is_ok_and(|s| s.success()),
        "python3 is not available: the AGT relay and registry need it"
    );
    let output = Command::new("bash")
        .arg(repo().join("interop/python/setup_venv.sh"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "setup_venv.sh could not make the AGT venv (no PyPI access? set AGT_VENV to a ready one):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let venv = String::from_utf8(output.stdout).unwrap().trim().to_owned();
    Path::new(&venv).join("bin/python")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `python -m agentmesh.<module>` process, killed on drop.
pub struct AgtProcess {
    child: Child,
    pub port: u16,
    log: PathBuf,
}

impl Drop for AgtProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AgtProcess {
    pub async fn start(python: &Path, module: &str, port: u16, env: &[(&str, &str)]) -> Self {
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("agt-{module}-{port}.log"));
        let mut command = Command::new(python);
        command
            .args([
                "-m",
                &format!("agentmesh.{module}"),
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args(["--log-level", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut process = Self {
            child: command.spawn().unwrap(),
            port,
            log,
        };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!("agentmesh.{module} exited with {status}:\n{}", process.log_text());
            }
            if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/health")).send().await {
                if r.status().is_success() {
                    return process;
                }
            }
            assert!(
                Instant::now() < deadline,
                "agentmesh.{module} did not start:\n{}",
                process.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

enum Relay {
    Embedded(Option<RunningServer>, SocketAddr),
    Agt(Option<AgtProcess>, PathBuf, u16),
}

/// A relay and a registry; the relay can be restarted (losing what it held)
/// without touching the registry.
pub struct Backend {
    pub name: &'static str,
    relay: Relay,
    registry: Option<RunningServer>,
    agt_registry: Option<AgtProcess>,
    registry_url: String,
}

impl Backend {
    pub async fn embedded() -> Self {
        let registry = meshwire_server::start(ServerConfig::default()).await.unwrap();
        let relay = meshwire_server::start(ServerConfig::default()).await.unwrap();
        let addr = relay.relay_addr();
        Self {
            name: "embedded",
            registry_url: registry.registry_url(),
            registry: Some(registry),
            agt_registry: None,
            relay: Relay::Embedded(Some(relay), addr),
        }
    }

    /// The real AGT relay and registry (see [`agt_python`]).
    pub async fn agt() -> Self {
        let python = agt_python();
        let registry = AgtProcess::start(&python, "registry", free_port(), &[]).await;
        let relay_port = free_port();
        let relay = AgtProcess::start(&python, "relay", relay_port, &[]).await;
        Self {
            name: "agt",
            registry_url: format!("http://127.0.0.1:{}", registry.port),
            registry: None,
            agt_registry: Some(registry),
            relay: Relay::Agt(Some(relay), python, relay_port),
        }
    }

    pub fn relay_url(&self) -> String {
        match &self.relay {
            Relay::Embedded(_, addr) => format!("ws://{addr}"),
            Relay::Agt(_, _, port) => format!("ws://127.0.0.1:{port}"),
        }
    }

    pub fn registry_url(&self) -> String {
        self.registry_url.clone()
    }

    pub async fn stop_relay(&mut self) {
        match &mut self.relay {
            Relay::Embedded(server, _) => {
                if let Some(s) = server.take() {
                    s.shutdown().await;
                }
            }
            Relay::Agt(process, _, _) => drop(process.take()),
        }
    }

    pub async fn start_relay(&mut self) {
        match &mut self.relay {
            Relay::Embedded(server, addr) => {
                let mut tries = 0;
                let listener = loop {
                    match tokio::net::TcpListener::bind(*addr).await {
                        Ok(l) => break l,
                        Err(e) if tries < 50 => {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            let _ = e;
                        }
                        Err(e) => panic!("rebinding {addr}: {e}"),
                    }
                };
                *server = Some(RunningServer::spawn(ServerConfig::default(), listener, None).unwrap());
            }
            Relay::Agt(process, python, port) => {
                *process = Some(AgtProcess::start(python, "relay", *port, &[]).await);
            }
        }
    }

    pub fn config(&self, name: &str) -> ClientConfig {
        let mut config = ClientConfig::new(self.relay_url(), self.registry_url());
        config.display_name = Some(name.to_owned());
        config.reconnect_base = Duration::from_millis(100);
        config.reconnect_max = Duration::from_millis(500);
        config.retransmit_after = Duration::from_millis(1500);
        // Longer than the join settle time: a retake must not land while
        // the other instance is still joining.
        config.takeover_backoff = Duration::from_millis(400);
        config
    }

    pub async fn agent(&self, name: &str) -> MeshClient {
        self.agent_with(Identity::generate(&mut rand_core::OsRng), name, None)
            .await
    }

    pub async fn agent_with(&self, identity: Identity, name: &str, store: Option<Arc<dyn Persistence>>) -> MeshClient {
        MeshClient::connect(identity, self.config(name), store, None)
            .await
            .unwrap()
    }
}

/// Waits for the first event matching `want`, failing after `timeout`.
pub async fn expect_event(client: &MeshClient, timeout: Duration, want: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_event_timeout(left).await {
            Some(e) if want(&e) => return e,
            Some(e) => seen.push(e),
            None => panic!("no matching event within {timeout:?}; saw {seen:#?}"),
        }
    }
}
