//! The agent commands: `id new|show`, `send`, `listen`, `find`, `discover`
//! and `ping`, with the options they share ([`AgentOpts`]).
//!
//! Every agent command connects as the identity in `--identity` (created
//! on first use), keeps its sessions in `--state` between runs (so a second
//! `send` to the same peer opens no new session), and exits non-zero with
//! a one-line `error: ...` when something fails.

use crate::paths::{self, PathRole};
use clap::{Args, Subcommand};
use meshwire::{ClientEvent, Identity, MeshClient, Message, Payload, RegistryClient, RegistryOptions};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The capability every agent started by this CLI advertises, listed by
/// `meshwire discover` without `--capability`.
pub const CLI_CAPABILITY: &str = "meshwire-cli";

/// Longest relay token file read.
pub const MAX_TOKEN_FILE: u64 = 16 * 1024;

/// Largest message read with `send --stdin`.
pub const MAX_STDIN_MESSAGE: u64 = 1024 * 1024;

/// A failed command: its message is printed as `error: MESSAGE`.
pub type CliResult<T> = Result<T, String>;

/// Options shared by the agent commands.
#[derive(Args, Clone, Debug)]
pub struct AgentOpts {
    /// Display name this agent registers under; others reach it with
    /// `--to NAME`. Also picks the default identity and state folder, so
    /// that several named agents can share one machine.
    #[arg(long, env = "MESHWIRE_NAME")]
    pub name: Option<String>,
    /// Identity file (Ed25519 seed, mode 0600), created on first use.
    /// Default: <data dir>/meshwire/<name or "default">/identity.json.
    #[arg(long, env = "MESHWIRE_IDENTITY", value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Folder of saved sessions (ratchet state), so that later runs reuse
    /// them. Default: <data dir>/meshwire/<name or "default">/state.
    #[arg(long, env = "MESHWIRE_STATE", value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Relay URL. A URL with a path is used as given; a bare
    /// ws(s)://host:port or http(s)://host:port gets /ws. Several relays of
    /// one cluster (`meshwire serve --nats`): repeat the flag or separate
    /// the URLs with commas, the home relay first; when a relay is down or
    /// drops the connection, the agent moves to the next one.
    #[arg(
        long,
        env = "MESHWIRE_RELAY",
        default_value = "ws://127.0.0.1:8765/ws",
        value_name = "URL",
        value_delimiter = ',',
        num_args = 1
    )]
    pub relay: Vec<String>,
    /// Registry base URL. Several (repeat the flag or separate with
    /// commas): tried in order when one is unreachable or answers 5xx.
    #[arg(
        long,
        env = "MESHWIRE_REGISTRY",
        default_value = "http://127.0.0.1:8765",
        value_name = "URL",
        value_delimiter = ',',
        num_args = 1
    )]
    pub registry: Vec<String>,
    /// File holding the relay's shared-secret token (the relay of
    /// `meshwire serve --relay-token`, AGT's AGENTMESH_RELAY_TOKEN).
    #[arg(long, env = "MESHWIRE_RELAY_TOKEN_FILE", value_name = "FILE")]
    pub relay_token_file: Option<PathBuf>,
    /// Seconds to wait for the relay, the registry and answers.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub timeout: f64,
    /// Print what happens (sessions opened, frames sent) on stderr.
    #[arg(long, short)]
    pub verbose: bool,
}

/// `meshwire id ...`.
#[derive(Subcommand, Debug)]
pub enum IdCommand {
    /// Create a new identity file (mode 0600) and print its DID.
    New {
        /// Where to write it (parent folders are created). Default: the
        /// agent's identity path (see --identity, --name).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Replace an existing identity file (its DID is lost for good).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        opts: AgentOpts,
    },
    /// Print the DID of an identity file.
    Show {
        /// The identity file. Default: the agent's identity path.
        file: Option<PathBuf>,
        #[command(flatten)]
        opts: AgentOpts,
    },
}

/// What `send` sends.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// The recipient: a display name (looked up in the registry) or a DID.
    #[arg(long, value_name = "NAME|DID")]
    pub to: String,
    /// The message text, sent as {"text": TEXT}.
    #[arg(conflicts_with_all = ["json", "stdin"])]
    pub text: Option<String>,
    /// A JSON value to send as it is.
    #[arg(long, value_name = "JSON", conflicts_with = "stdin")]
    pub json: Option<String>,
    /// Read the message text from standard input (to its end; one trailing
    /// newline removed), sent as {"text": ...}.
    #[arg(long)]
    pub stdin: bool,
    /// Also wait for the recipient's end-to-end delivery receipt (meshwire
    /// peers send them; others do not, and the wait then times out).
    #[arg(long)]
    pub wait_receipt: bool,
}

/// How `listen` runs.
#[derive(Args, Debug)]
pub struct ListenArgs {
    /// One JSON object a line: {"from", "id", "payload"} (bytes payloads as
    /// {"bytes_base64": ...}).
    #[arg(long)]
    pub json: bool,
    /// Answer every message: {"pong": X} to {"ping": X} (for `meshwire
    /// ping`), {"echo": PAYLOAD} to anything else but echoes and pongs.
    #[arg(long)]
    pub echo: bool,
    /// Exit after this many messages.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

fn seconds(value: f64) -> CliResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("--timeout {value}: not a number of seconds"))
}

impl AgentOpts {
    fn agent_dir(&self) -> CliResult<PathBuf> {
        paths::agent_dir(self.name.as_deref())
    }

    /// The identity path and whether it was given (else the default).
    pub fn identity_path(&self) -> CliResult<(PathBuf, bool)> {
        match &self.identity {
            Some(path) => Ok((path.clone(), true)),
            None => Ok((self.agent_dir()?.join("identity.json"), false)),
        }
    }

    fn state_dir(&self) -> CliResult<(PathBuf, bool)> {
        match &self.state {
            Some(path) => Ok((path.clone(), true)),
            None => Ok((self.agent_dir()?.join("state"), false)),
        }
    }

    fn relay_token(&self) -> CliResult<Option<zeroize::Zeroizing<String>>> {
        let Some(path) = &self.relay_token_file else {
            return Ok(None);
        };
        paths::check(path, PathRole::ExistingFile, "relay token file")?;
        let file = std::fs::File::open(path).map_err(|e| format!("relay token file {}: {e}", path.display()))?;
        let mut text = zeroize::Zeroizing::new(String::new());
        file.take(MAX_TOKEN_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("relay token file {}: {e}", path.display()))?;
        if text.len() as u64 > MAX_TOKEN_FILE {
            return Err(format!(
                "relay token file {}: longer than {MAX_TOKEN_FILE} bytes",
                path.display()
            ));
        }
        let token = zeroize::Zeroizing::new(text.trim().to_owned());
        if token.is_empty() {
            return Err(format!("relay token file {} is empty", path.display()));
        }
        Ok(Some(token))
    }

    /// Loads the identity, creating it (and, for the default location, its
    /// folder) on first use.
    fn load_identity(&self) -> CliResult<Identity> {
        let (path, given) = self.identity_path()?;
        if path.exists() {
            paths::check(&path, PathRole::ExistingFile, "identity file")?;
            return meshwire::load_identity(&path).map_err(|e| e.to_string());
        }
        let role = if given {
            PathRole::NewFile
        } else {
            PathRole::NewFileCreateParents
        };
        paths::check(&path, role, "identity file")?;
        let identity = Identity::generate(&mut rand_core::OsRng);
        meshwire::save_identity(&identity, &path).map_err(|e| e.to_string())?;
        if self.verbose {
            eprintln!("created identity {} at {}", identity.did(), path.display());
        }
        Ok(identity)
    }

    /// The state folder (checked; created later by the store if missing).
    fn store_dir(&self) -> CliResult<PathBuf> {
        let (dir, given) = self.state_dir()?;
        let role = if given { PathRole::Dir } else { PathRole::DirCreate };
        paths::check(&dir, role, "state folder")?;
        Ok(dir)
    }

    /// Registers and joins the relay.
    async fn connect(&self) -> CliResult<MeshClient> {
        self.connect_with(false).await
    }

    /// Registers and joins the relay; with `manual_ack`, messages are acked
    /// only through [`MeshClient::ack`].
    async fn connect_with(&self, manual_ack: bool) -> CliResult<MeshClient> {
        let identity = self.load_identity()?;
        let store = self.store_dir()?;
        let token = self.relay_token()?;
        let timeout = seconds(self.timeout)?;
        // Both lists hold at least one URL: they replace these.
        let mut builder = MeshClient::builder(identity, String::new(), String::new())
            .relay_urls(self.relay_urls()?)
            .registry_urls(self.registry_urls()?)
            .capabilities([CLI_CAPABILITY])
            .state_dir(store)
            .config(|c| {
                c.connect_timeout = timeout;
                c.manual_ack = manual_ack;
            });
        if let Some(name) = &self.name {
            builder = builder.display_name(name.clone());
        }
        if let Some(token) = token {
            builder = builder.relay_token(token.as_str());
        }
        builder.connect().await.map_err(|e| e.to_string())
    }

    fn registry(&self) -> CliResult<RegistryClient> {
        let options = RegistryOptions {
            timeout: seconds(self.timeout)?,
            ..RegistryOptions::default()
        };
        RegistryClient::with_fallbacks(&self.registry_urls()?, options).map_err(|e| e.to_string())
    }

    /// The `--relay` URLs (blank entries of a comma list skipped); at
    /// least one.
    fn relay_urls(&self) -> CliResult<Vec<String>> {
        url_list(&self.relay, "--relay")
    }

    /// The `--registry` URLs; at least one.
    fn registry_urls(&self) -> CliResult<Vec<String>> {
        url_list(&self.registry, "--registry")
    }

    /// The registry URLs as printed in messages.
    fn registry_text(&self) -> String {
        self.registry.join(",")
    }
}

/// `given` without blank entries; an error naming `flag` when none is left.
fn url_list(given: &[String], flag: &str) -> CliResult<Vec<String>> {
    let urls: Vec<String> = given
        .iter()
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    if urls.is_empty() {
        return Err(format!("{flag}: no URL given"));
    }
    Ok(urls)
}

/// Runs `future` on a fresh runtime.
fn block_on<T>(future: impl std::future::Future<Output = CliResult<T>>) -> CliResult<T> {
    tokio::runtime::Runtime::new()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?
        .block_on(future)
}

/// `meshwire id new|show`.
pub fn id(command: IdCommand) -> CliResult<()> {
    match command {
        IdCommand::New { out, force, opts } => {
            let path = match out {
                Some(path) => path,
                None => opts.identity_path()?.0,
            };
            if path.exists() && !force {
                paths::check(&path, PathRole::ExistingFile, "identity file")?;
                return Err(format!(
                    "{} exists already; pass --force to replace it (its DID is then lost for good)",
                    path.display()
                ));
            }
            paths::check(&path, PathRole::NewFileCreateParents, "identity file")?;
            let identity = Identity::generate(&mut rand_core::OsRng);
            meshwire::save_identity(&identity, &path).map_err(|e| e.to_string())?;
            println!("{}", identity.did());
            eprintln!("wrote {} (mode 0600)", path.display());
            Ok(())
        }
        IdCommand::Show { file, opts } => {
            let path = match file {
                Some(path) => path,
                None => opts.identity_path()?.0,
            };
            paths::check(&path, PathRole::ExistingFile, "identity file")?;
            let identity = meshwire::load_identity(&path).map_err(|e| e.to_string())?;
            println!("{}", identity.did());
            Ok(())
        }
    }
}

/// `name` as a DID: itself when it is one, else the registry's answer.
async fn resolve(opts: &AgentOpts, client: Option<&MeshClient>, name: &str) -> CliResult<String> {
    if name.starts_with("did:") {
        meshwire::Did::parse(name).map_err(|e| format!("--to {name}: {e}"))?;
        return Ok(name.to_owned());
    }
    let found = match client {
        Some(client) => client.find(name).await.map_err(|e| e.to_string())?,
        None => find_in_registry(&opts.registry()?, name, None).await?,
    };
    found.ok_or_else(|| format!("no agent named {name:?} in the registry at {}", opts.registry_text()))
}

/// The most recently seen agent registered as `name` (other than `me`).
async fn find_in_registry(registry: &RegistryClient, name: &str, me: Option<&str>) -> CliResult<Option<String>> {
    let hits = registry.discover(name, Some(200)).await.map_err(|e| e.to_string())?;
    let mut best: Option<(Option<meshwire::proto::time::Timestamp>, String)> = None;
    for hit in hits {
        if Some(hit.did.as_str()) == me {
            continue;
        }
        let (seen, named) = match registry.get_agent(&hit.did).await {
            Ok(record) => (
                record.last_seen.or(hit.last_seen),
                record
                    .metadata
                    .get(meshwire::client::META_DISPLAY_NAME)
                    .is_none_or(|n| n == name),
            ),
            Err(_) => (hit.last_seen, true),
        };
        if named && best.as_ref().is_none_or(|(s, _)| seen > *s) {
            best = Some((seen, hit.did.to_string()));
        }
    }
    Ok(best.map(|(_, did)| did))
}

/// Waits until the relay confirmed every send (it read the frames).
async fn flushed(client: &MeshClient, timeout: Duration) -> CliResult<()> {
    client.flush(timeout).await.map_err(|_| {
        format!(
            "the relay did not take the message within {timeout:?} ({} frames unconfirmed; they are kept and \
             sent on the next run)",
            client.unconfirmed_by_relay()
        )
    })
}

fn report_counters(client: &MeshClient) {
    let counters = client.counters();
    let sent: Vec<String> = counters.sent.iter().map(|(k, v)| format!("{k}={v}")).collect();
    eprintln!("frames sent: {}", sent.join(" "));
}

/// `meshwire send`.
pub fn send(opts: AgentOpts, args: SendArgs) -> CliResult<()> {
    let payload = match (&args.text, &args.json, args.stdin) {
        (Some(text), None, false) => json!({ "text": text }),
        (None, Some(text), false) => {
            serde_json::from_str::<Value>(text).map_err(|e| format!("--json is not valid JSON: {e}"))?
        }
        (None, None, true) => {
            let mut text = String::new();
            std::io::stdin()
                .take(MAX_STDIN_MESSAGE + 1)
                .read_to_string(&mut text)
                .map_err(|e| format!("reading standard input: {e}"))?;
            if text.len() as u64 > MAX_STDIN_MESSAGE {
                return Err(format!("standard input is longer than {MAX_STDIN_MESSAGE} bytes"));
            }
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
            json!({ "text": text })
        }
        _ => return Err("give the message as TEXT, --json JSON or --stdin".into()),
    };
    block_on(async {
        let timeout = seconds(opts.timeout)?;
        let client = opts.connect().await?;
        let result = async {
            let to = resolve(&opts, Some(&client), &args.to).await?;
            let id = client.send(&to, &payload).await.map_err(|e| e.to_string())?;
            flushed(&client, timeout).await?;
            if args.wait_receipt {
                let deadline = Instant::now() + timeout;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match client.next_event_timeout(left).await {
                        Some(ClientEvent::Delivered { ids, .. }) if ids.contains(&id) => break,
                        Some(other) => {
                            if opts.verbose {
                                eprintln!("{other:?}");
                            }
                        }
                        None => {
                            return Err(format!(
                                "the relay has message {id}, but no delivery receipt came within {timeout:?} \
                                 (is the recipient running, and a meshwire agent?)"
                            ))
                        }
                    }
                }
            }
            Ok::<_, String>(id)
        }
        .await;
        if opts.verbose {
            for event in client.try_events() {
                eprintln!("{event:?}");
            }
            report_counters(&client);
        }
        client.close().await;
        println!("{}", result?);
        Ok(())
    })
}

fn payload_json(message: &Message) -> Value {
    match &message.payload {
        Payload::Json(value) => value.clone(),
        Payload::Bytes(bytes) => json!({ "bytes_base64": meshwire::proto::encoding::b64_std(bytes) }),
    }
}

/// One line for a person: `FROM: TEXT` (the `text` field, else the JSON).
fn human_line(from: &str, payload: &Value) -> String {
    let body = match payload.get("text").and_then(Value::as_str) {
        Some(text) if payload.as_object().is_some_and(|o| o.len() == 1) => text.to_owned(),
        _ => payload.to_string(),
    };
    // One message, one line: newlines and other controls escaped.
    let body: String = body
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect();
    format!("{from}: {body}")
}

/// The answer `listen --echo` gives to `payload`, if any: never to an echo
/// or a pong, so two echoing agents do not bounce messages forever.
pub fn echo_reply(payload: &Value) -> Option<Value> {
    if let Some(object) = payload.as_object() {
        if object.contains_key("echo") || object.contains_key("pong") {
            return None;
        }
        if let Some(ping) = object.get("ping") {
            return Some(json!({ "pong": ping }));
        }
    }
    Some(json!({ "echo": payload }))
}

/// Resolves when the process is asked to stop (Ctrl-C, SIGTERM).
async fn stop_requested() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// `meshwire listen`.
pub fn listen(opts: AgentOpts, args: ListenArgs) -> CliResult<()> {
    block_on(async {
        // Acks only what it printed: a message taken but not printed (a
        // closed pipe) stays with the relay.
        let client = opts.connect_with(true).await?;
        eprintln!(
            "listening as {}{} (Ctrl-C to stop)",
            client.did(),
            opts.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
        );
        let result = listen_loop(&client, &opts, &args).await;
        // The acks of what was printed go out before the disconnect.
        let _ = flushed(&client, Duration::from_secs(2)).await;
        client.close().await;
        result
    })
}

async fn listen_loop(client: &MeshClient, opts: &AgentOpts, args: &ListenArgs) -> CliResult<()> {
    let stop = stop_requested();
    tokio::pin!(stop);
    let mut printed = 0u64;
    let mut stdout = std::io::stdout();
    loop {
        if args.count.is_some_and(|n| printed >= n) {
            return Ok(());
        }
        let message = tokio::select! {
            m = client.recv() => m,
            event = client.next_event() => {
                if let Some(event) = event {
                    report_event(&event, opts.verbose)?;
                }
                continue;
            }
            () = &mut stop => return Ok(()),
        };
        let Some(message) = message else {
            return Err("the client closed".into());
        };
        let payload = payload_json(&message);
        let line = if args.json {
            json!({ "from": message.from, "id": message.id, "payload": payload }).to_string()
        } else {
            human_line(&message.from, &payload)
        };
        if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
            // The reader went away (a closed pipe): stop taking messages.
            return Ok(());
        }
        printed += 1;
        client.ack(&message).map_err(|e| {
            format!(
                "could not acknowledge message {} from {}: {e}",
                message.id, message.from
            )
        })?;
        if args.echo {
            if let Some(reply) = echo_reply(&payload) {
                if let Err(e) = client.send(&message.from, &reply).await {
                    eprintln!("could not answer {}: {e}", message.from);
                }
            }
        }
    }
}

/// Events worth a line on stderr; a terminal one ends `listen`.
fn report_event(event: &ClientEvent, verbose: bool) -> CliResult<()> {
    match event {
        ClientEvent::Knock { from, accepted } => {
            eprintln!("knock from {from}: {}", if *accepted { "accepted" } else { "rejected" })
        }
        ClientEvent::SessionReplaced { peer } => eprintln!("session with {peer} replaced (the peer restarted)"),
        ClientEvent::Disconnected { code, reason } => {
            eprintln!("relay connection lost ({code:?} {reason}); reconnecting")
        }
        ClientEvent::Connected { reconnect: true } => eprintln!("relay connection back"),
        ClientEvent::RelayChanged { url, .. } => eprintln!("now on relay {url}"),
        ClientEvent::TakenOver { reason } => {
            return Err(format!(
                "another instance of this agent took its relay connection ({reason}); stopping"
            ))
        }
        ClientEvent::Rejected { code, reason } => {
            return Err(format!("the relay rejected this agent: close code {code}, {reason:?}"))
        }
        other if verbose => eprintln!("{other:?}"),
        _ => {}
    }
    Ok(())
}

/// `meshwire find NAME`.
pub fn find(opts: AgentOpts, name: String) -> CliResult<()> {
    block_on(async {
        let registry = opts.registry()?;
        match find_in_registry(&registry, &name, None).await? {
            Some(did) => {
                println!("{did}");
                Ok(())
            }
            None => Err(format!(
                "no agent named {name:?} in the registry at {}",
                opts.registry_text()
            )),
        }
    })
}

/// `meshwire discover [--capability C]`.
pub fn discover(opts: AgentOpts, capability: Option<String>) -> CliResult<()> {
    let capability = capability.unwrap_or_else(|| CLI_CAPABILITY.to_owned());
    block_on(async {
        let registry = opts.registry()?;
        let hits = registry
            .discover(&capability, Some(200))
            .await
            .map_err(|e| e.to_string())?;
        for hit in hits {
            let name = match registry.get_agent(&hit.did).await {
                Ok(record) => record.metadata.get(meshwire::client::META_DISPLAY_NAME).cloned(),
                Err(_) => None,
            };
            println!(
                "{}\t{}\t{}",
                hit.did,
                name.unwrap_or_else(|| "-".into()),
                hit.capabilities.join(",")
            );
        }
        Ok(())
    })
}

/// `meshwire ping NAME`.
pub fn ping(opts: AgentOpts, to: String, count: u32) -> CliResult<()> {
    block_on(async {
        let timeout = seconds(opts.timeout)?;
        let client = opts.connect().await?;
        let result = async {
            let peer = resolve(&opts, Some(&client), &to).await?;
            let mut times = Vec::new();
            for seq in 0..count.max(1) {
                let nonce = format!("{}-{seq}", rand_core::RngCore::next_u64(&mut rand_core::OsRng));
                let started = Instant::now();
                client
                    .send(&peer, &json!({ "ping": nonce }))
                    .await
                    .map_err(|e| e.to_string())?;
                let deadline = started + timeout;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let reply = client.recv_from_any(&[peer.as_str()], left).await.map_err(|_| {
                        format!("no answer from {to} within {timeout:?} (is it running `meshwire listen --echo`?)")
                    })?;
                    if reply.payload.as_json().and_then(|v| v.get("pong")) == Some(&json!(nonce)) {
                        break;
                    }
                }
                let rtt = started.elapsed();
                println!("reply from {to}: seq={seq} time={:.1} ms", rtt.as_secs_f64() * 1000.0);
                times.push(rtt);
            }
            Ok::<_, String>(times)
        }
        .await;
        client.close().await;
        let times = result?;
        if let (Some(min), Some(max)) = (times.iter().min(), times.iter().max()) {
            let avg = times.iter().sum::<Duration>() / times.len().max(1) as u32;
            println!(
                "{} replies: min {:.1} ms, avg {:.1} ms, max {:.1} ms",
                times.len(),
                min.as_secs_f64() * 1000.0,
                avg.as_secs_f64() * 1000.0,
                max.as_secs_f64() * 1000.0
            );
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_are_not_echoed() {
        assert_eq!(
            echo_reply(&json!({"text": "hi"})),
            Some(json!({"echo": {"text": "hi"}}))
        );
        assert_eq!(echo_reply(&json!({"ping": "n1"})), Some(json!({"pong": "n1"})));
        assert_eq!(echo_reply(&json!({"echo": {"text": "hi"}})), None);
        assert_eq!(echo_reply(&json!({"pong": "n1"})), None);
        assert_eq!(echo_reply(&json!("bare")), Some(json!({"echo": "bare"})));
    }

    #[test]
    fn human_lines_are_one_line() {
        assert_eq!(human_line("bob", &json!({"text": "a\nb"})), "bob: a\\nb");
        assert_eq!(
            human_line("bob", &json!({"text": "hi", "x": 1})),
            r#"bob: {"text":"hi","x":1}"#
        );
    }
}
