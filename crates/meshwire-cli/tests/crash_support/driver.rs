//! The parent side of a scenario: starts the relay and two agents, kills
//! and restarts them on a seeded schedule while both send, then checks
//! what the ledger adds up to.

use super::ledger::{Ledger, ROLES};
use super::procs::{copy_dir, log_tail, AgentProc, AgtRegistry, Ev, RelayKind, RelayProc, Rng};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

/// How long a restarted agent may take to print READY.
const READY_MAX: Duration = Duration::from_secs(30);
/// How long the end of a scenario waits for every reported send to arrive.
const DRAIN_MAX: Duration = Duration::from_secs(60);
/// How long each message of the final exchange may take.
const FINAL_MAX: Duration = Duration::from_secs(30);
/// Watched after the final exchange, for late duplicates (longer than the
/// agents' retransmission delay).
const SETTLE: Duration = Duration::from_millis(2500);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// What a scenario adds up to.
#[derive(Debug, Clone)]
pub struct Summary {
    pub scenario: &'static str,
    pub seed: u64,
    pub rounds: u32,
    /// SIGKILLs of A, B and the relay.
    pub kills: [u32; 3],
    /// Older states put back.
    pub restores: u32,
    /// Messages reported sent A->B and B->A (final exchange excluded).
    pub sent: [usize; 2],
    /// Of those, never handed to the other application.
    pub lost: [usize; 2],
    pub dup_after_ack: u64,
    pub redelivered_again: u64,
    pub redelivered_first: u64,
    pub dup_unflagged: u64,
    pub id_mismatch: u64,
    /// Directions of the final exchange that failed (0, 1 or 2).
    pub dead: usize,
    pub unreported: usize,
    pub send_errors: u64,
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CRASH SUMMARY scenario={} seed={:#018x} rounds={} kills(A/B/relay)={}/{}/{} restores={} \
             messages A->B={} B->A={} lost={} (A->B {}, B->A {}) duplicated_after_ack={} \
             redelivered={} (first-seen redelivered {}) unflagged_duplicates={} id_mismatches={} \
             dead_sessions={} (directions of the final exchange) unreported_but_delivered={} \
             send_errors={} elapsed={:.1}s",
            self.scenario,
            self.seed,
            self.rounds,
            self.kills[0],
            self.kills[1],
            self.kills[2],
            self.restores,
            self.sent[0],
            self.sent[1],
            self.lost[0] + self.lost[1],
            self.lost[0],
            self.lost[1],
            self.dup_after_ack,
            self.redelivered_again,
            self.redelivered_first,
            self.dup_unflagged,
            self.id_mismatch,
            self.dead,
            self.unreported,
            self.send_errors,
            self.elapsed.as_secs_f64(),
        )
    }
}

/// One scenario's processes and records.
pub struct Harness {
    pub scenario: &'static str,
    pub seed: u64,
    pub dir: PathBuf,
    rng: Rng,
    // Dropped first: the agents, then the relay, then the registry.
    agents: [AgentProc; 2],
    relay: RelayProc,
    _agt_registry: Option<AgtRegistry>,
    registry_url: String,
    tx: Sender<Ev>,
    rx: Receiver<Ev>,
    pub ledger: Ledger,
    ready: [u64; 2],
    /// Things that should not happen (an agent dying by itself, a restart
    /// that never became ready, an unexpected message); any fails the test.
    pub anomalies: Vec<String>,
    kills: [u32; 3],
    restores: u32,
    rounds: u32,
    send_errors: u64,
    error_lines: u64,
    /// The first few send/connect/ack errors, for the report.
    pub errors: Vec<String>,
    running: bool,
    final_phase: bool,
    started: Instant,
    rounds_log: std::fs::File,
}

/// A fresh directory under the target's tmp dir for this scenario.
fn scenario_dir(scenario: &str, seed: u64) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("crash-{scenario}-{seed:016x}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scenario dir");
    dir
}

fn agent_seed(seed: u64, scenario: &str, who: usize) -> [u8; 32] {
    let tag = scenario.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = Rng::new(seed ^ tag ^ (who as u64 + 1).wrapping_mul(0x9E37_79B9));
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    out
}

impl Harness {
    /// `meshwire serve --data-dir` as relay and registry.
    pub fn embedded(scenario: &'static str, seed: u64) -> Self {
        let dir = scenario_dir(scenario, seed);
        let relay = RelayProc::new(
            RelayKind::Serve {
                data_dir: dir.join("relay-data"),
            },
            &dir,
        );
        let registry_url = format!("http://127.0.0.1:{}", relay.port);
        Self::new(scenario, seed, dir, relay, None, registry_url)
    }

    /// The AGT relay and registry, from the venv's `python`.
    pub fn agt(scenario: &'static str, seed: u64, python: &Path) -> Self {
        let dir = scenario_dir(scenario, seed);
        let registry =
            AgtRegistry::start(python, &dir).unwrap_or_else(|e| panic!("the AGT registry did not start: {e}"));
        let relay = RelayProc::new(
            RelayKind::Agt {
                python: python.to_owned(),
            },
            &dir,
        );
        let registry_url = format!("http://127.0.0.1:{}", registry.port);
        Self::new(scenario, seed, dir, relay, Some(registry), registry_url)
    }

    fn new(
        scenario: &'static str,
        seed: u64,
        dir: PathBuf,
        relay: RelayProc,
        agt_registry: Option<AgtRegistry>,
        registry_url: String,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let agents = [
            AgentProc::new(0, agent_seed(seed, scenario, 0), &dir),
            AgentProc::new(1, agent_seed(seed, scenario, 1), &dir),
        ];
        let rounds_log = std::fs::File::create(dir.join("rounds.log")).expect("rounds log");
        Self {
            scenario,
            seed,
            rng: Rng::new(seed),
            agents,
            relay,
            _agt_registry: agt_registry,
            registry_url,
            tx,
            rx,
            ledger: Ledger::default(),
            ready: [0; 2],
            anomalies: Vec::new(),
            kills: [0; 3],
            restores: 0,
            rounds: 0,
            send_errors: 0,
            error_lines: 0,
            errors: Vec::new(),
            running: false,
            final_phase: false,
            started: Instant::now(),
            rounds_log,
            dir,
        }
    }

    fn note(&mut self, line: &str) {
        let _ = writeln!(
            self.rounds_log,
            "[{:8.3}s] {line}",
            self.started.elapsed().as_secs_f64()
        );
    }

    fn anomaly(&mut self, what: String) {
        self.note(&format!("ANOMALY {what}"));
        self.anomalies.push(what);
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Exit { who, inc } => {
                let agent = &mut self.agents[who];
                if agent.alive && agent.inc == inc {
                    agent.alive = false;
                    let status = agent.exited().unwrap_or_else(|| "unknown status".into());
                    let tail = log_tail(&agent.log, 15);
                    self.anomaly(format!(
                        "agent {} incarnation {inc} exited by itself ({status}); log tail:\n{tail}",
                        ROLES[who]
                    ));
                }
            }
            Ev::Line { who, inc, text } => {
                if self.parse_line(who, inc, &text).is_none() {
                    self.anomaly(format!("agent {} incarnation {inc} printed {text:?}", ROLES[who]));
                }
            }
        }
    }

    fn parse_line(&mut self, who: usize, inc: u64, text: &str) -> Option<()> {
        let mut parts = text.splitn(6, ' ');
        let head = parts.next()?;
        let key = |parts: &mut std::str::SplitN<'_, char>| -> Option<(u64, u64)> {
            Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        };
        match head {
            "READY" => self.ready[who] = inc,
            "SENT" => {
                let k = key(&mut parts)?;
                let _id = parts.next()?;
                let fin = parts.next()? == "true";
                self.ledger.sent(who, k, self.final_phase && fin);
            }
            "RECV" => {
                let k = key(&mut parts)?;
                let redelivered = parts.next()? == "true";
                let id = parts.next()?;
                self.ledger.received(who, k, redelivered, id, inc);
            }
            "ACKED" => {
                let k = key(&mut parts)?;
                self.ledger.acked(who, k);
            }
            "ACKAGAIN" => self.ledger.ack_again += 1,
            "SENDERR" | "CONNECTERR" | "ACKERR" => {
                if head == "SENDERR" {
                    self.send_errors += 1;
                }
                if head == "ACKERR" {
                    self.anomaly(format!("agent {} incarnation {inc}: {text}", ROLES[who]));
                }
                self.error_lines += 1;
                let line = format!("agent {} incarnation {inc}: {text}", ROLES[who]);
                // The first 50, then one in 100: a stuck sender retries for a minute.
                if self.error_lines <= 50 || self.error_lines % 100 == 0 {
                    self.note(&format!("{line} (error line {})", self.error_lines));
                }
                if self.errors.len() < 10 {
                    self.errors.push(line);
                }
            }
            "ODD" => self.anomaly(format!("agent {} got an unexpected message: {text}", ROLES[who])),
            _ => return None,
        }
        Some(())
    }

    /// Handles child reports until `cond` holds (true) or `bound` passed
    /// (false).
    fn pump_until(&mut self, bound: Duration, cond: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + bound;
        loop {
            if cond(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.rx.recv_timeout(left.min(ms(100))) {
                Ok(ev) => self.handle(ev),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("the harness holds a sender"),
            }
        }
    }

    fn pump(&mut self, d: Duration) {
        self.pump_until(d, |_| false);
    }

    fn start_agent(&mut self, who: usize) -> bool {
        let peer = self.agents[1 - who].did.clone();
        let relay_url = self.relay.relay_url();
        let registry_url = self.registry_url.clone();
        let running = self.running;
        let tx = self.tx.clone();
        self.agents[who].start(&peer, &relay_url, &registry_url, running, &tx);
        let inc = self.agents[who].inc;
        self.note(&format!("start {} incarnation {inc}", ROLES[who]));
        if self.pump_until(READY_MAX, |h| h.ready[who] == inc || !h.agents[who].alive) && self.ready[who] == inc {
            return true;
        }
        if self.agents[who].alive {
            let tail = log_tail(&self.agents[who].log, 15);
            self.anomaly(format!(
                "agent {} incarnation {inc} not ready within {READY_MAX:?}; log tail:\n{tail}",
                ROLES[who]
            ));
        }
        false
    }

    fn start_relay(&mut self) -> bool {
        match self.relay.start() {
            Ok(()) => {
                self.note("relay started");
                true
            }
            Err(e) => {
                self.anomaly(e);
                false
            }
        }
    }

    fn kill_agent(&mut self, who: usize) {
        self.agents[who].kill();
        self.kills[who] += 1;
        self.note(&format!("SIGKILL {} incarnation {}", ROLES[who], self.agents[who].inc));
    }

    /// Starts the relay and both agents, and opens the session with one
    /// message each way (deterministically, before anything is killed).
    pub fn start(&mut self) {
        self.note(&format!("scenario {} seed {:#018x}", self.scenario, self.seed));
        assert!(self.start_relay(), "{:#?}", self.anomalies);
        for who in 0..2 {
            assert!(self.start_agent(who), "{:#?}", self.anomalies);
        }
        for who in 0..2 {
            self.agents[who].command("ONE");
            let opened = self.pump_until(FINAL_MAX, |h| {
                h.ledger.sent_count(who) > 0 && h.ledger.all_delivered(who)
            });
            assert!(
                opened,
                "warm-up {}->{} failed; logs in {}; errors {:#?}; anomalies {:#?}",
                ROLES[who],
                ROLES[1 - who],
                self.dir.display(),
                self.errors,
                self.anomalies
            );
        }
        self.running = true;
        for agent in &mut self.agents {
            agent.command("RUN");
        }
        self.note("warm-up done: both sending");
    }

    /// `rounds` rounds: run a random while, SIGKILL A, B or the relay,
    /// leave it down a random while, restart it from its store.
    pub fn crash_rounds(&mut self, rounds: u32) {
        for round in 0..rounds {
            if !self.anomalies.is_empty() {
                break;
            }
            let run = self.rng.range(100, 1500);
            let target = self.rng.range(0, 3) as usize;
            let down = self.rng.range(0, 800);
            self.note(&format!(
                "round {round}: run {run} ms, then kill {} for {down} ms",
                ["A", "B", "relay"][target]
            ));
            self.pump(ms(run));
            if target < 2 {
                self.kill_agent(target);
                self.pump(ms(down));
                self.start_agent(target);
            } else {
                self.relay.kill();
                self.kills[2] += 1;
                self.note("SIGKILL relay");
                self.pump(ms(down));
                self.start_relay();
            }
            self.rounds += 1;
        }
    }

    /// `rounds` rounds: SIGKILL an agent, copy its state aside, restart it
    /// and run; then let what it sent arrive (so that nothing it said lives
    /// only in the state about to be thrown away), SIGKILL it again, put
    /// the older copy back and restart it.
    pub fn rollback_rounds(&mut self, rounds: u32) {
        for round in 0..rounds {
            if !self.anomalies.is_empty() {
                break;
            }
            let victim = self.rng.range(0, 2) as usize;
            let before = self.rng.range(200, 1500);
            let between = self.rng.range(500, 3000);
            self.note(&format!(
                "rollback round {round}: {} snapshot after {before} ms, rolled back after {between} ms more",
                ROLES[victim]
            ));
            self.pump(ms(before));
            self.kill_agent(victim);
            let snapshot = self.dir.join(format!("snapshot-{round}"));
            copy_dir(&self.agents[victim].state_dir, &snapshot);
            if !self.start_agent(victim) {
                break;
            }
            self.pump(ms(between));
            self.agents[victim].command("PAUSE");
            self.pump(ms(300));
            if !self.pump_until(DRAIN_MAX, |h| h.ledger.all_delivered(victim)) {
                let lost = self.ledger.lost(victim);
                self.anomaly(format!(
                    "before the rollback of {}: {} of its messages never arrived (first: {:?})",
                    ROLES[victim],
                    lost.len(),
                    &lost[..lost.len().min(10)]
                ));
                break;
            }
            self.kill_agent(victim);
            let state = self.agents[victim].state_dir.clone();
            copy_dir(&snapshot, &state);
            self.restores += 1;
            self.note(&format!("restored {} from {}", ROLES[victim], snapshot.display()));
            self.start_agent(victim);
            self.rounds += 1;
        }
    }

    /// Stops killing: both pause, every reported send must arrive, then
    /// one message each way, then a while for late duplicates.
    pub fn finish(&mut self) -> Summary {
        self.running = false;
        for agent in &mut self.agents {
            agent.command("PAUSE");
        }
        self.note("pause: draining");
        self.pump(ms(500));
        let drained = self.pump_until(DRAIN_MAX, |h| h.ledger.all_delivered(0) && h.ledger.all_delivered(1));
        self.note(&format!("drained: {drained}"));
        for who in 0..2 {
            let lost = self.ledger.lost(who);
            if !lost.is_empty() {
                self.note(&format!(
                    "not arrived {}->{} (incarnation, number): {:?}",
                    ROLES[who],
                    ROLES[1 - who],
                    &lost[..lost.len().min(50)]
                ));
            }
        }
        self.final_phase = true;
        for agent in &mut self.agents {
            agent.command("ONE");
        }
        self.pump_until(FINAL_MAX, |h| {
            h.ledger.finals(0) == (1, 1) && h.ledger.finals(1) == (1, 1)
        });
        self.pump(SETTLE);
        let dead = (0..2).filter(|who| self.ledger.finals(*who).1 == 0).count();
        if let Some(status) = self.relay.exited() {
            self.anomaly(format!("the relay exited by itself ({status})"));
        }
        for (who, role) in ROLES.iter().enumerate() {
            if !self.agents[who].alive {
                self.anomaly(format!("agent {role} is not running at the end"));
            }
        }
        Summary {
            scenario: self.scenario,
            seed: self.seed,
            rounds: self.rounds,
            kills: self.kills,
            restores: self.restores,
            sent: [self.ledger.sent_count(0), self.ledger.sent_count(1)],
            lost: [self.ledger.lost(0).len(), self.ledger.lost(1).len()],
            dup_after_ack: self.ledger.dup_after_ack,
            redelivered_again: self.ledger.redelivered_again,
            redelivered_first: self.ledger.redelivered_first,
            dup_unflagged: self.ledger.dup_unflagged,
            id_mismatch: self.ledger.id_mismatch,
            dead,
            unreported: self.ledger.unreported(0) + self.ledger.unreported(1),
            send_errors: self.send_errors,
            elapsed: self.started.elapsed(),
        }
    }

    /// Everything that explains a failure: lost messages, duplicates,
    /// anomalies, errors, where the logs are.
    pub fn evidence(&self) -> String {
        let mut out = String::new();
        for who in 0..2 {
            let lost = self.ledger.lost(who);
            if !lost.is_empty() {
                out += &format!(
                    "lost {}->{} (incarnation, number): {:?}\n",
                    ROLES[who],
                    ROLES[1 - who],
                    &lost[..lost.len().min(20)]
                );
            }
        }
        for e in &self.ledger.evidence {
            out += &format!("duplicate: {e}\n");
        }
        for a in &self.anomalies {
            out += &format!("anomaly: {a}\n");
        }
        for e in &self.errors {
            out += &format!("error: {e}\n");
        }
        out += &format!("logs, rounds.log and state: {} (kept)\n", self.dir.display());
        out
    }

    /// Stops every process (also done on drop).
    pub fn stop(&mut self) {
        for agent in &mut self.agents {
            agent.kill();
        }
        self.relay.kill();
        self._agt_registry = None;
    }
}
