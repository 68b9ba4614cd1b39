//! The processes a scenario runs: agent children, `meshwire serve`, the
//! AGT relay and registry. Every one is killed (SIGKILL) when its handle
//! is dropped, so a panicking test leaves nothing behind.

use super::agent::{ChildSpec, CHILD_ENV, MARK};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The test that runs an agent child (it does nothing otherwise).
pub const CHILD_TEST: &str = "crash_child";
const BIN: &str = env!("CARGO_BIN_EXE_meshwire");

/// A small deterministic generator (SplitMix64): rounds replay from a seed.
pub struct Rng(u64);

impl Rng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
}

/// What an agent child's stdout reader reports.
pub enum Ev {
    /// A protocol line (without [`MARK`]) of agent `who`, incarnation `inc`.
    Line { who: usize, inc: u64, text: String },
    /// Agent `who`'s incarnation `inc` closed its stdout (it died).
    Exit { who: usize, inc: u64 },
}

/// A port no one listens on right now (kept for the life of the scenario,
/// so that clients find a restarted server where they left it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn append_log(path: &Path) -> Stdio {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("log file");
    Stdio::from(file)
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn kill_child(child: &mut Child) {
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

/// One agent, across its incarnations.
pub struct AgentProc {
    pub who: usize,
    pub seed_hex: String,
    pub did: String,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    /// The current (or last) incarnation.
    pub inc: u64,
    /// Started by us and not killed by us.
    pub alive: bool,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    reader: Option<JoinHandle<()>>,
}

impl AgentProc {
    pub fn new(who: usize, seed: [u8; 32], dir: &Path) -> Self {
        let did = meshwire::Identity::from_seed(&seed).did().to_string();
        let role = super::ledger::ROLES[who];
        Self {
            who,
            seed_hex: hex::encode(seed),
            did,
            state_dir: dir.join(format!("state-{role}")),
            log: dir.join(format!("agent-{role}.log")),
            inc: 0,
            alive: false,
            child: None,
            stdin: None,
            reader: None,
        }
    }

    /// Starts the next incarnation.
    pub fn start(&mut self, peer: &str, relay_url: &str, registry_url: &str, running: bool, tx: &Sender<Ev>) {
        assert!(self.child.is_none(), "agent already running");
        self.inc += 1;
        let spec = ChildSpec {
            role: super::ledger::ROLES[self.who].to_owned(),
            seed: self.seed_hex.clone(),
            peer: peer.to_owned(),
            relay_url: relay_url.to_owned(),
            registry_url: registry_url.to_owned(),
            state_dir: self.state_dir.display().to_string(),
            inc: self.inc,
            pace_ms: 30,
            running,
        };
        if let Ok(mut log) = std::fs::OpenOptions::new().create(true).append(true).open(&self.log) {
            let _ = writeln!(log, "==== incarnation {} ====", self.inc);
        }
        let exe = std::env::current_exe().expect("the test binary");
        let mut child = Command::new(exe)
            .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, serde_json::to_string(&spec).expect("spec"))
            .env(
                "RUST_LOG",
                std::env::var("MESHWIRE_CRASH_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(append_log(&self.log))
            .spawn()
            .expect("spawn agent child");
        let stdout = child.stdout.take().expect("stdout");
        self.stdin = child.stdin.take();
        let (who, inc, tx) = (self.who, self.inc, tx.clone());
        self.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(text) = line.strip_prefix(MARK) {
                    let _ = tx.send(Ev::Line {
                        who,
                        inc,
                        text: text.to_owned(),
                    });
                }
            }
            let _ = tx.send(Ev::Exit { who, inc });
        }));
        self.child = Some(child);
        self.alive = true;
    }

    /// Writes a command line to the child (ignored if it is gone).
    pub fn command(&mut self, cmd: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = writeln!(stdin, "{cmd}");
            let _ = stdin.flush();
        }
    }

    /// SIGKILL, then waits until everything it printed was read (so that
    /// its lines are all queued before the next incarnation's).
    pub fn kill(&mut self) {
        self.alive = false;
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
        self.stdin = None;
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// The child's exit status if it ended.
    pub fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten().map(|s| s.to_string())
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The relay (and, for `meshwire serve`, the registry) of a scenario.
pub enum RelayKind {
    /// `meshwire serve --data-dir`: relay and registry in one process.
    Serve { data_dir: PathBuf },
    /// `python -m agentmesh.relay` (AGT 5.0.0); the registry runs apart.
    Agt { python: PathBuf },
}

/// A restartable relay process on a fixed port.
pub struct RelayProc {
    pub kind: RelayKind,
    pub port: u16,
    pub log: PathBuf,
    child: Option<Child>,
}

impl RelayProc {
    pub fn new(kind: RelayKind, dir: &Path) -> Self {
        Self {
            kind,
            port: free_port(),
            log: dir.join("relay.log"),
            child: None,
        }
    }

    pub fn relay_url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    /// Starts it and waits until it serves (bounded); retries a few times
    /// if the port is not free yet.
    pub fn start(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "relay already running");
        let mut last = String::new();
        for _ in 0..10 {
            if let Ok(mut log) = std::fs::OpenOptions::new().create(true).append(true).open(&self.log) {
                let _ = writeln!(log, "==== start ====");
            }
            let result = match &self.kind {
                RelayKind::Serve { data_dir } => start_serve(self.port, data_dir, &self.log),
                RelayKind::Agt { python } => start_agt(python, "relay", self.port, &self.log),
            };
            match result {
                Ok(child) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(e) => {
                    last = e;
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }
        Err(format!("relay did not start: {last}\n{}", log_tail(&self.log, 20)))
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child);
        }
    }

    /// Why it is not running, if it stopped on its own.
    pub fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten().map(|s| s.to_string())
    }
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `meshwire serve` on `port`, once it printed its relay URL.
fn start_serve(port: u16, data_dir: &Path, log: &Path) -> Result<Child, String> {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .env_remove("MESHWIRE_NATS_URL")
        .env_remove("MESHWIRE_RELAY_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(append_log(log))
        .spawn()
        .map_err(|e| format!("spawn meshwire serve: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx): (Sender<String>, Receiver<String>) = mpsc::channel();
    std::thread::spawn(move || {
        // Read to the end, so the server never writes to a closed pipe.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(line) if line.starts_with("meshwire relay") && line.contains(&format!(":{port}/")) => Ok(child),
        Ok(line) => {
            kill_child(&mut child);
            Err(format!("meshwire serve printed {line:?}"))
        }
        Err(_) => {
            let status = child.try_wait().ok().flatten();
            kill_child(&mut child);
            Err(format!("meshwire serve did not print its URL (exit: {status:?})"))
        }
    }
}

/// `python -m agentmesh.<module>` on `port`, once `/health` answers 200.
pub fn start_agt(python: &Path, module: &str, port: u16, log: &Path) -> Result<Child, String> {
    let mut child = Command::new(python)
        .args(["-m", &format!("agentmesh.{module}"), "--host", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args(["--log-level", "warning"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(append_log(log))
        .spawn()
        .map_err(|e| format!("spawn agentmesh.{module}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("agentmesh.{module} exited with {status}"));
        }
        if health_ok(port) {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    kill_child(&mut child);
    Err(format!("agentmesh.{module} did not answer /health within 60 s"))
}

/// `GET /health` answered 200 (plain HTTP/1.0 on loopback).
fn health_ok(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

/// The AGT registry, killed on drop.
pub struct AgtRegistry {
    pub port: u16,
    child: Child,
}

impl AgtRegistry {
    pub fn start(python: &Path, dir: &Path) -> Result<Self, String> {
        let port = free_port();
        let child = start_agt(python, "registry", port, &dir.join("registry.log"))?;
        Ok(Self { port, child })
    }
}

impl Drop for AgtRegistry {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// The AGT venv's python: `interop/python/setup_venv.sh` makes it (or finds
/// `$AGT_VENV` ready); the reason when it cannot.
pub fn agt_python() -> Result<PathBuf, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../interop/python/setup_venv.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(format!(
            "setup_venv.sh could not make the AGT venv (no python3 or PyPI? set AGT_VENV to a ready one): {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    let venv = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let python = Path::new(&venv).join("bin/python");
    if python.exists() {
        Ok(python)
    } else {
        Err(format!("setup_venv.sh printed {venv:?}, which has no bin/python"))
    }
}

/// Copies the files of `from` (a state directory; flat) into a fresh `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("create copy dir");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).expect("chmod 0700");
    }
    for entry in std::fs::read_dir(from).expect("read state dir") {
        let entry = entry.expect("dir entry");
        if entry.file_type().map(|t| t.is_file()).unwrap_or(false) {
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy state file");
        }
    }
}
