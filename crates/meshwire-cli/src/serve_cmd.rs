//! `meshwire serve`: the embedded relay and registry, on a storage backend
//! chosen on the command line (SQLite in a data directory by default,
//! `--memory`, or `--nats URL`), with the relay token taken from a file or
//! the environment rather than argv where possible.

use crate::serve_addr;
use clap::Args;
use meshwire_server::storage::nats::NatsOptions;
use meshwire_server::storage::Storage;
use meshwire_server::{ChallengeSecret, ServerConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use zeroize::Zeroizing;

/// Arguments of `meshwire serve`. Every setting can also come from the
/// environment (`MESHWIRE_` + the flag name in upper snake case, e.g.
/// `MESHWIRE_MAX_CONNECTIONS`) and from a TOML file (`--config FILE`, keys
/// are the flag names: `max-connections = 5000`). Precedence: flags, then
/// environment, then file, then defaults.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML file of settings; keys are the long flag names (`data-dir = "/var/lib/meshwire"`). Flags and
    /// MESHWIRE_* environment variables override it; an unknown key is an error.
    #[arg(long, value_name = "FILE", env = "MESHWIRE_CONFIG")]
    config: Option<PathBuf>,
    /// Print the effective settings as JSON (secrets redacted) and exit.
    #[arg(long)]
    print_config: bool,
    /// Address to listen on: HOST:PORT, or a bare PORT for 127.0.0.1:PORT. Default 127.0.0.1:8765.
    #[arg(long, env = "MESHWIRE_LISTEN")]
    listen: Option<String>,
    /// Folder of the SQLite database (meshwire.sqlite3) holding queued mail, agents, pre-keys and used proofs;
    /// created (mode 0700) if missing. Default: a `meshwire` folder in the platform data directory
    /// (e.g. ~/.local/share/meshwire).
    #[arg(long, value_name = "DIR", env = "MESHWIRE_DATA_DIR", conflicts_with = "memory")]
    data_dir: Option<PathBuf>,
    /// Keep everything in memory: queued mail, agents and keys are lost when the server stops.
    #[arg(long, env = "MESHWIRE_MEMORY", num_args = 0..=1, require_equals = true, default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new())]
    memory: Option<bool>,
    /// Store everything in NATS JetStream at this URL (nats://HOST:PORT), so several `meshwire serve`
    /// instances share mail, agents, one-time keys and used proofs. --memory and --data-dir take precedence.
    #[arg(long, value_name = "URL", env = "MESHWIRE_NATS_URL")]
    nats: Option<String>,
    /// Accept connect frames without proof of possession (legacy npm 4.0.0 clients; insecure).
    #[arg(long, env = "MESHWIRE_ALLOW_UNAUTHENTICATED_DID", num_args = 0..=1, require_equals = true, default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new())]
    allow_unauthenticated_did: Option<bool>,
    /// Accept npm 4.0.0 registrations without proof of possession (insecure).
    #[arg(long, env = "MESHWIRE_LEGACY_REGISTRATION", num_args = 0..=1, require_equals = true, default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new())]
    legacy_registration: Option<bool>,
    /// Shared secret connect frames must carry in `token`. On the command line it is visible to every
    /// local user (ps, /proc); prefer --relay-token-file or the MESHWIRE_RELAY_TOKEN environment variable.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "MESHWIRE_RELAY_TOKEN",
        hide_env_values = true,
        conflicts_with = "relay_token_file"
    )]
    relay_token: Option<String>,
    /// File holding the relay token (its first line; surrounding whitespace ignored).
    #[arg(long, value_name = "FILE", env = "MESHWIRE_RELAY_TOKEN_FILE")]
    relay_token_file: Option<PathBuf>,
    /// How far (seconds) a signed timestamp may be from the server clock; each proof is accepted once within it.
    /// Default 300.
    #[arg(long, env = "MESHWIRE_REPLAY_WINDOW_SECS")]
    replay_window_secs: Option<u64>,
    /// Refuse timestamp proofs: only challenge-bound proofs (docs/specs/MESHWIRE-CHALLENGE-AUTH.md); AGT clients cannot connect.
    #[arg(long, env = "MESHWIRE_REQUIRE_CHALLENGE", num_args = 0..=1, require_equals = true, default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new())]
    require_challenge: Option<bool>,
    /// Public origin (e.g. https://mesh.example.com) challenge proofs may name, behind a proxy; repeatable
    /// (environment: comma-separated).
    #[arg(long = "public-origin", env = "MESHWIRE_PUBLIC_ORIGIN", value_delimiter = ',')]
    public_origins: Vec<String>,
    /// File holding the HMAC key of challenge nonces (32 raw bytes, 64 hex characters or base64 of 32
    /// bytes; e.g. `openssl rand -hex 32`). Replicas behind one load balancer need the same key (and shared
    /// storage, --nats) for --require-challenge. The key itself can come from the MESHWIRE_CHALLENGE_SECRET
    /// environment variable instead; it is never taken from the command line. Default: a random key per process.
    #[arg(long, value_name = "FILE", env = "MESHWIRE_CHALLENGE_SECRET_FILE")]
    challenge_secret_file: Option<PathBuf>,
    /// Pre-key bundle fetches per minute per requester (DID, or IP; loopback not limited); 0 disables. Default 30.
    #[arg(long, env = "MESHWIRE_BUNDLE_FETCHES_PER_MINUTE")]
    bundle_fetches_per_minute: Option<u32>,
    /// Registrations per minute per peer IP (loopback not limited); more get 429 + Retry-After; 0 disables.
    /// Default 20.
    #[arg(long, env = "MESHWIRE_REGISTRATIONS_PER_MINUTE")]
    registrations_per_minute: Option<u32>,
    /// Discovery requests per minute per requester (DID, or IP; loopback not limited); more get 429 +
    /// Retry-After; 0 disables. Default 60.
    #[arg(long, env = "MESHWIRE_DISCOVERIES_PER_MINUTE")]
    discoveries_per_minute: Option<u32>,
    /// Apply the per-IP rate limits to loopback peers too (behind a reverse proxy on the same host).
    #[arg(long, env = "MESHWIRE_RATE_LIMIT_LOOPBACK", num_args = 0..=1, require_equals = true, default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new())]
    rate_limit_loopback: Option<bool>,
    /// Requesters each rate limit tracks; past it, new ones share one budget. Default 10000.
    #[arg(long, env = "MESHWIRE_MAX_RATE_LIMITED_REQUESTERS")]
    max_rate_limited_requesters: Option<usize>,
    /// Store offline mail only for registered DIDs (mail for unknown DIDs that are not connected is refused).
    #[arg(long, env = "MESHWIRE_ROUTE_ONLY_REGISTERED", num_args = 0..=1, require_equals = true, default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new())]
    route_only_registered: Option<bool>,
    /// Offline messages queued for one recipient at most. Default 10000.
    #[arg(long, env = "MESHWIRE_MAX_STORED_PER_RECIPIENT")]
    max_stored_per_recipient: Option<usize>,
    /// Offline messages one sender may have queued, all recipients together. Default 2000.
    #[arg(long, env = "MESHWIRE_MAX_STORED_PER_SENDER")]
    max_stored_per_sender: Option<usize>,
    /// Offline messages queued in total. Default 100000.
    #[arg(long, env = "MESHWIRE_MAX_STORED_TOTAL")]
    max_stored_total: Option<usize>,
    /// Bytes of offline messages queued in total. Default 256 MiB.
    #[arg(long, env = "MESHWIRE_MAX_STORED_BYTES")]
    max_stored_bytes: Option<usize>,
    /// Log format on stderr: text (default) or json (one object a line).
    #[arg(long, value_enum, env = "MESHWIRE_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// PEM certificate chain (leaf first): serve wss:// and https:// on --listen. Needs --tls-key.
    #[arg(long, value_name = "FILE", env = "MESHWIRE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", env = "MESHWIRE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Open relay WebSockets at most; more get HTTP 503. Default 10000.
    #[arg(long, env = "MESHWIRE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Frames queued for one connection before it counts as a slow consumer and is closed (4008). Default 8192.
    #[arg(long, env = "MESHWIRE_OUTBOUND_QUEUE")]
    outbound_queue: Option<usize>,
    /// Bytes queued for one connection before it counts as a slow consumer and is closed (4008). Default 16 MiB.
    #[arg(long, env = "MESHWIRE_OUTBOUND_QUEUE_BYTES")]
    outbound_queue_bytes: Option<usize>,
    /// With --nats: how long a frame for an agent connected to another instance waits for that instance's answer before it is stored instead (milliseconds). Default 500.
    #[arg(long, env = "MESHWIRE_CLUSTER_ROUTE_TIMEOUT_MS")]
    cluster_route_timeout_ms: Option<u64>,
    /// Days an agent that stops heartbeating stays registered; 0 keeps agents forever. Default 30.
    #[arg(long, env = "MESHWIRE_AGENT_EXPIRY_DAYS")]
    agent_expiry_days: Option<u64>,
    /// Largest relay frame parsed (bytes). Default 1 MiB.
    #[arg(long, env = "MESHWIRE_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    /// Largest HTTP request body (bytes; larger get 413). Default 256 KiB.
    #[arg(long, env = "MESHWIRE_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Hours an unacknowledged stored message is kept. Default 72.
    #[arg(long, env = "MESHWIRE_MESSAGE_TTL_HOURS")]
    message_ttl_hours: Option<u64>,
    /// Registered agents at most. Default 100000.
    #[arg(long, env = "MESHWIRE_MAX_AGENTS")]
    max_agents: Option<usize>,
}

/// The log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

/// The `--config` file: the same settings, keyed by flag name.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileSettings {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    memory: Option<bool>,
    nats: Option<String>,
    allow_unauthenticated_did: Option<bool>,
    legacy_registration: Option<bool>,
    relay_token: Option<String>,
    relay_token_file: Option<PathBuf>,
    replay_window_secs: Option<u64>,
    require_challenge: Option<bool>,
    public_origin: Option<Vec<String>>,
    challenge_secret_file: Option<PathBuf>,
    bundle_fetches_per_minute: Option<u32>,
    registrations_per_minute: Option<u32>,
    discoveries_per_minute: Option<u32>,
    rate_limit_loopback: Option<bool>,
    max_rate_limited_requesters: Option<usize>,
    route_only_registered: Option<bool>,
    max_stored_per_recipient: Option<usize>,
    max_stored_per_sender: Option<usize>,
    max_stored_total: Option<usize>,
    max_stored_bytes: Option<usize>,
    log_format: Option<LogFormat>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    max_connections: Option<usize>,
    outbound_queue: Option<usize>,
    outbound_queue_bytes: Option<usize>,
    cluster_route_timeout_ms: Option<u64>,
    agent_expiry_days: Option<u64>,
    max_frame_bytes: Option<usize>,
    max_body_bytes: Option<usize>,
    message_ttl_hours: Option<u64>,
    max_agents: Option<usize>,
}

impl FileSettings {
    fn parse(text: &str, origin: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| format!("invalid configuration file {origin}: {}", e.message()))
    }

    fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the configuration file {}: {e}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }
}

/// Where the server keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Backend {
    Memory,
    Sqlite(PathBuf),
    Nats(String),
}

/// The backend named by one layer (flags and environment, or the file):
/// `--memory` wins, then `--data-dir`, then `--nats`; `None` when the layer
/// names none.
fn layer_backend(
    memory: Option<bool>,
    data_dir: Option<&PathBuf>,
    nats: Option<&str>,
) -> Result<Option<Backend>, String> {
    if memory == Some(true) {
        return Ok(Some(Backend::Memory));
    }
    if let Some(dir) = data_dir {
        return Ok(Some(Backend::Sqlite(dir.clone())));
    }
    match nats.map(str::trim).filter(|u| !u.is_empty()) {
        Some(url) if url.starts_with("nats://") || url.starts_with("tls://") => Ok(Some(Backend::Nats(url.to_owned()))),
        Some(url) => Err(format!("--nats wants a nats://HOST:PORT URL, not {url:?}")),
        None => Ok(None),
    }
}

/// Settings after layering flags, environment, file and defaults.
struct Settings {
    listen: String,
    backend: Backend,
    log_format: LogFormat,
    tls: Option<(PathBuf, PathBuf)>,
    config: ServerConfig,
}

impl ServeArgs {
    fn file(&self) -> Result<FileSettings, String> {
        match &self.config {
            Some(path) => FileSettings::load(path),
            None => Ok(FileSettings::default()),
        }
    }

    fn backend(&self, file: &FileSettings) -> Result<Backend, String> {
        if let Some(backend) = layer_backend(self.memory, self.data_dir.as_ref(), self.nats.as_deref())? {
            return Ok(backend);
        }
        if let Some(backend) = layer_backend(file.memory, file.data_dir.as_ref(), file.nats.as_deref())? {
            return Ok(backend);
        }
        dirs::data_dir()
            .map(|base| Backend::Sqlite(base.join("meshwire")))
            .ok_or_else(|| {
                "no data directory is known for this user (HOME unset?): pass --data-dir DIR or --memory".to_owned()
            })
    }

    fn relay_token(&self, file: &FileSettings) -> Result<Option<Zeroizing<String>>, String> {
        if let Some(path) = &self.relay_token_file {
            return read_token_file(path).map(Some);
        }
        if let Some(token) = &self.relay_token {
            return Ok(Some(Zeroizing::new(token.clone())));
        }
        if file.relay_token.is_some() && file.relay_token_file.is_some() {
            return Err("the configuration file sets both relay-token and relay-token-file".to_owned());
        }
        if let Some(path) = &file.relay_token_file {
            return read_token_file(path).map(Some);
        }
        Ok(file.relay_token.clone().map(Zeroizing::new))
    }

    /// The challenge secret: `--challenge-secret-file` (or
    /// `MESHWIRE_CHALLENGE_SECRET_FILE`), else `MESHWIRE_CHALLENGE_SECRET`
    /// (`env_secret`), else the file's `challenge-secret-file`.
    fn challenge_secret(
        &self,
        file: &FileSettings,
        env_secret: Option<&[u8]>,
    ) -> Result<Option<ChallengeSecret>, String> {
        if let Some(path) = &self.challenge_secret_file {
            return read_challenge_secret(path).map(Some);
        }
        if let Some(secret) = env_secret {
            return ChallengeSecret::parse(secret)
                .map(Some)
                .map_err(|e| format!("MESHWIRE_CHALLENGE_SECRET: {e}"));
        }
        match &file.challenge_secret_file {
            Some(path) => read_challenge_secret(path).map(Some),
            None => Ok(None),
        }
    }

    fn settings(&self) -> Result<Settings, String> {
        let env_secret = std::env::var_os(CHALLENGE_SECRET_ENV).map(|v| Zeroizing::new(v.into_encoded_bytes()));
        self.settings_with(env_secret.as_deref().map(Vec::as_slice))
    }

    fn settings_with(&self, env_secret: Option<&[u8]>) -> Result<Settings, String> {
        let file = self.file()?;
        let challenge_secret = self.challenge_secret(&file, env_secret)?;
        let defaults = ServerConfig::default();
        let backend = self.backend(&file)?;
        let relay_token = self.relay_token(&file)?.map(|t| t.as_str().to_owned());
        let flag = |a: Option<bool>, b: Option<bool>| a.or(b).unwrap_or(false);
        let tls = match (
            self.tls_cert.clone().or(file.tls_cert),
            self.tls_key.clone().or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => return Err("--tls-cert needs --tls-key".to_owned()),
            (None, Some(_)) => return Err("--tls-key needs --tls-cert".to_owned()),
        };
        let public_origins = if self.public_origins.is_empty() {
            file.public_origin.unwrap_or_default()
        } else {
            self.public_origins.clone()
        };
        let config = ServerConfig {
            allow_unauthenticated_did: flag(self.allow_unauthenticated_did, file.allow_unauthenticated_did),
            legacy_registration: flag(self.legacy_registration, file.legacy_registration),
            relay_token,
            replay_window: Duration::from_secs(self.replay_window_secs.or(file.replay_window_secs).unwrap_or(300)),
            require_challenge: flag(self.require_challenge, file.require_challenge),
            public_origins,
            bundle_fetches_per_minute: self
                .bundle_fetches_per_minute
                .or(file.bundle_fetches_per_minute)
                .unwrap_or(defaults.bundle_fetches_per_minute),
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(defaults.max_connections),
            outbound_queue: self
                .outbound_queue
                .or(file.outbound_queue)
                .unwrap_or(defaults.outbound_queue),
            outbound_queue_bytes: self
                .outbound_queue_bytes
                .or(file.outbound_queue_bytes)
                .unwrap_or(defaults.outbound_queue_bytes),
            cluster_route_timeout: self
                .cluster_route_timeout_ms
                .or(file.cluster_route_timeout_ms)
                .map_or(defaults.cluster_route_timeout, Duration::from_millis),
            agent_expiry: match self.agent_expiry_days.or(file.agent_expiry_days) {
                Some(days) => Duration::from_secs(days.saturating_mul(24 * 3600)),
                None => defaults.agent_expiry,
            },
            max_frame_bytes: self
                .max_frame_bytes
                .or(file.max_frame_bytes)
                .unwrap_or(defaults.max_frame_bytes),
            max_body_bytes: self
                .max_body_bytes
                .or(file.max_body_bytes)
                .unwrap_or(defaults.max_body_bytes),
            message_ttl: match self.message_ttl_hours.or(file.message_ttl_hours) {
                Some(hours) => Duration::from_secs(hours.saturating_mul(3600)),
                None => defaults.message_ttl,
            },
            max_agents: self.max_agents.or(file.max_agents).unwrap_or(defaults.max_agents),
            challenge_secret,
            registrations_per_minute: self
                .registrations_per_minute
                .or(file.registrations_per_minute)
                .unwrap_or(defaults.registrations_per_minute),
            discoveries_per_minute: self
                .discoveries_per_minute
                .or(file.discoveries_per_minute)
                .unwrap_or(defaults.discoveries_per_minute),
            rate_limit_loopback: flag(self.rate_limit_loopback, file.rate_limit_loopback),
            max_rate_limited_requesters: self
                .max_rate_limited_requesters
                .or(file.max_rate_limited_requesters)
                .unwrap_or(defaults.max_rate_limited_requesters),
            route_only_registered: flag(self.route_only_registered, file.route_only_registered),
            max_stored_per_recipient: self
                .max_stored_per_recipient
                .or(file.max_stored_per_recipient)
                .unwrap_or(defaults.max_stored_per_recipient),
            max_stored_per_sender: self
                .max_stored_per_sender
                .or(file.max_stored_per_sender)
                .unwrap_or(defaults.max_stored_per_sender),
            max_stored_total: self
                .max_stored_total
                .or(file.max_stored_total)
                .unwrap_or(defaults.max_stored_total),
            max_stored_bytes: self
                .max_stored_bytes
                .or(file.max_stored_bytes)
                .unwrap_or(defaults.max_stored_bytes),
            ..defaults
        };
        Ok(Settings {
            listen: self
                .listen
                .clone()
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:8765".to_owned()),
            backend,
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            tls,
            config,
        })
    }
}

impl Settings {
    /// The effective settings as JSON, the relay token redacted.
    fn to_json(&self) -> serde_json::Value {
        let c = &self.config;
        serde_json::json!({
            "listen": self.listen,
            "storage": describe(&self.backend),
            "log-format": match self.log_format { LogFormat::Text => "text", LogFormat::Json => "json" },
            "tls-cert": self.tls.as_ref().map(|(cert, _)| cert.display().to_string()),
            "tls-key": self.tls.as_ref().map(|(_, key)| key.display().to_string()),
            "relay-token": c.relay_token.as_ref().map(|_| "<set>"),
            "allow-unauthenticated-did": c.allow_unauthenticated_did,
            "legacy-registration": c.legacy_registration,
            "replay-window-secs": c.replay_window.as_secs(),
            "require-challenge": c.require_challenge,
            "public-origin": c.public_origins,
            "challenge-secret": c.challenge_secret.as_ref().map(|_| "<set>"),
            "bundle-fetches-per-minute": c.bundle_fetches_per_minute,
            "registrations-per-minute": c.registrations_per_minute,
            "discoveries-per-minute": c.discoveries_per_minute,
            "rate-limit-loopback": c.rate_limit_loopback,
            "max-rate-limited-requesters": c.max_rate_limited_requesters,
            "route-only-registered": c.route_only_registered,
            "max-stored-per-recipient": c.max_stored_per_recipient,
            "max-stored-per-sender": c.max_stored_per_sender,
            "max-stored-total": c.max_stored_total,
            "max-stored-bytes": c.max_stored_bytes,
            "max-connections": c.max_connections,
            "outbound-queue": c.outbound_queue,
            "outbound-queue-bytes": c.outbound_queue_bytes,
            "cluster-route-timeout-ms": c.cluster_route_timeout.as_millis(),
            "agent-expiry-days": c.agent_expiry.as_secs() / (24 * 3600),
            "max-frame-bytes": c.max_frame_bytes,
            "max-body-bytes": c.max_body_bytes,
            "message-ttl-hours": c.message_ttl.as_secs() / 3600,
            "max-agents": c.max_agents,
        })
    }
}

/// The token in `path`: its first line, trimmed; an empty one is an error.
fn read_token_file(path: &Path) -> Result<Zeroizing<String>, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the relay token file {}: {e}", path.display()))?,
    );
    let token = text.lines().next().unwrap_or("").trim();
    if token.is_empty() {
        return Err(format!("the relay token file {} is empty", path.display()));
    }
    Ok(Zeroizing::new(token.to_owned()))
}

/// The environment variable holding the challenge secret itself.
const CHALLENGE_SECRET_ENV: &str = "MESHWIRE_CHALLENGE_SECRET";

/// The challenge secret in `path` (see [`ChallengeSecret::parse`]); the
/// error names the file and the problem, never the content.
fn read_challenge_secret(path: &Path) -> Result<ChallengeSecret, String> {
    let bytes = Zeroizing::new(
        std::fs::read(path).map_err(|e| format!("cannot read the challenge secret file {}: {e}", path.display()))?,
    );
    ChallengeSecret::parse(&bytes).map_err(|e| format!("the challenge secret file {}: {e}", path.display()))
}

/// Creates `dir` (and its parents) with mode 0700 when missing.
fn create_private_dir(dir: &Path) -> Result<(), String> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| format!("cannot create the data directory {}: {e}", dir.display()))
}

/// Opens the storage of `backend` with the limits of `config`.
async fn open_storage(backend: &Backend, config: &ServerConfig) -> Result<Storage, String> {
    let limits = config.storage_limits();
    match backend {
        Backend::Memory => Ok(Storage::memory(limits)),
        Backend::Sqlite(dir) => {
            create_private_dir(dir)?;
            Storage::sqlite(dir, limits)
                .await
                .map_err(|e| format!("cannot open the data directory {}: {e}", dir.display()))
        }
        Backend::Nats(url) => Storage::nats(NatsOptions::new(url.clone()), limits)
            .await
            .map_err(|e| format!("cannot use NATS at {url}: {e}")),
    }
}

fn describe(backend: &Backend) -> String {
    match backend {
        Backend::Memory => "memory (lost when the server stops)".to_owned(),
        Backend::Sqlite(dir) => format!(
            "sqlite {}",
            dir.join(meshwire_server::storage::sqlite::DB_FILE).display()
        ),
        Backend::Nats(url) => format!("nats {url}"),
    }
}

/// Completes on Ctrl-C or (Unix) SIGTERM.
async fn stop_signal() {
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

/// Installs the stderr logger in `format` (`RUST_LOG` filters; default info).
fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Logs on stderr: stdout carries only the URLs to give clients.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Runs `meshwire serve`: until SIGTERM or Ctrl-C, then stops accepting,
/// closes relay connections with 1001, flushes the store and exits 0.
pub fn run(args: ServeArgs) -> ExitCode {
    let settings = match args.settings() {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.print_config {
        println!("{:#}", settings.to_json());
        return ExitCode::SUCCESS;
    }
    init_logs(settings.log_format);
    let Settings {
        listen,
        backend,
        tls,
        mut config,
        ..
    } = settings;
    let tls = match tls {
        Some((cert, key)) => match meshwire_server::TlsConfig::from_pem_files(&cert, &key) {
            Ok(tls) => Some(tls),
            Err(e) => {
                eprintln!("error: TLS: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    // Multi-threaded: the NATS proof ledger blocks its worker in place.
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match open_storage(&backend, &config).await {
            Ok(storage) => config.storage = Some(storage),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
        let listen = serve_addr::bind_address(&listen);
        let listener = match tokio::net::TcpListener::bind(listen.as_str()).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("error: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let secure = tls.is_some();
        let started = match tls {
            Some(tls) => meshwire_server::RunningServer::spawn_tls(config, listener, tls),
            None => meshwire_server::RunningServer::spawn(config, listener, None),
        };
        let server = match started {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(storage = %describe(&backend), tls = secure, "storage opened");
        let (relay_url, registry_url, note) = serve_addr::client_urls(server.relay_addr());
        let (relay_url, registry_url) = if secure {
            (
                relay_url.replacen("ws://", "wss://", 1),
                registry_url.replacen("http://", "https://", 1),
            )
        } else {
            (relay_url, registry_url)
        };
        println!("meshwire relay    {relay_url}");
        println!("meshwire registry {registry_url}");
        if let Some(note) = note {
            println!("note: {note}");
        }
        stop_signal().await;
        tracing::info!("stopping: closing relay connections (1001) and flushing the store");
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    /// Parses `argv` with the MESHWIRE_* variables this test process may
    /// have ignored: clap reads the environment, so the tests only use
    /// variables no one sets.
    fn parse(argv: &[&str]) -> Result<ServeArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("serve").chain(argv.iter().copied())).map(|c| c.args)
    }

    fn args(argv: &[&str]) -> ServeArgs {
        parse(argv).unwrap_or_else(|e| panic!("{e}"))
    }

    fn backend(argv: &[&str]) -> Result<Backend, String> {
        args(argv).backend(&FileSettings::default())
    }

    #[test]
    fn backends() {
        assert_eq!(
            backend(&["--data-dir", "/tmp/x"]),
            Ok(Backend::Sqlite(PathBuf::from("/tmp/x")))
        );
        assert_eq!(backend(&["--memory"]), Ok(Backend::Memory));
        assert_eq!(
            backend(&["--nats", "nats://127.0.0.1:4222"]),
            Ok(Backend::Nats("nats://127.0.0.1:4222".into()))
        );
        assert!(parse(&["--memory", "--data-dir", "/tmp/x"]).is_err());
        assert_eq!(
            backend(&["--memory", "--nats", "nats://h:1"]),
            Ok(Backend::Memory),
            "--memory wins"
        );
        assert_eq!(
            backend(&["--data-dir", "/d", "--nats", "nats://h:1"]),
            Ok(Backend::Sqlite(PathBuf::from("/d"))),
            "--data-dir wins"
        );
        assert!(backend(&["--nats", "localhost:4222"]).is_err());
        assert!(parse(&["--relay-token", "a", "--relay-token-file", "/f"]).is_err());
        assert!(parse(&["--memory=maybe"]).is_err());
        assert!(matches!(backend(&["--memory=false"]), Ok(Backend::Sqlite(_))));
        assert_eq!(backend(&["--memory=1"]), Ok(Backend::Memory));
    }

    #[test]
    fn flags_override_the_file_and_the_file_overrides_defaults() {
        let file = FileSettings::parse(
            "listen = \"0.0.0.0:9000\"\nmax-connections = 7\nmemory = true\nlog-format = \"json\"\n\
             public-origin = [\"https://mesh.example.com\"]\nagent-expiry-days = 2\n",
            "test.toml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let from_file = args(&[]);
        assert_eq!(from_file.backend(&file), Ok(Backend::Memory));
        let flags = args(&["--max-connections", "9", "--data-dir", "/d"]);
        assert_eq!(
            flags.backend(&file),
            Ok(Backend::Sqlite(PathBuf::from("/d"))),
            "a flag's backend wins"
        );
        // Layering itself, without touching the file system.
        assert_eq!(flags.max_connections.or(file.max_connections), Some(9));
        assert_eq!(from_file.max_connections.or(file.max_connections), Some(7));
        let defaults = args(&[]).settings().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(defaults.config.max_connections, ServerConfig::default().max_connections);
        assert_eq!(defaults.listen, "127.0.0.1:8765");
        assert_eq!(defaults.config.agent_expiry, Duration::from_secs(30 * 24 * 3600));
    }

    #[test]
    fn unknown_file_keys_are_named() {
        let error = match FileSettings::parse("max-connections = 1\nmax-conections = 2\n", "x.toml") {
            Ok(_) => panic!("an unknown key was accepted"),
            Err(error) => error,
        };
        assert!(error.contains("max-conections"), "{error}");
        assert!(error.contains("x.toml"), "{error}");
        assert!(FileSettings::parse("max-connections = \"many\"\n", "x.toml").is_err());
    }

    #[test]
    fn tls_needs_both_files() {
        assert!(args(&["--memory", "--tls-cert", "/c"])
            .settings()
            .is_err_and(|e| e.contains("--tls-key")));
    }

    #[test]
    fn challenge_secret_sources() {
        let dir = tempdir_for("challenge");
        let file = dir.join("secret");
        let key = [5u8; 32];
        std::fs::write(&file, format!("{}\n", hex::encode(key))).unwrap_or_else(|e| panic!("{e}"));
        let path = file.display().to_string();
        let from_file = args(&["--memory", "--challenge-secret-file", &path])
            .settings_with(None)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(from_file.config.challenge_secret.is_some());
        assert_eq!(from_file.to_json()["challenge-secret"], "<set>");
        // The environment's key when no file is named.
        let from_env = args(&["--memory"])
            .settings_with(Some(hex::encode([6u8; 32]).as_bytes()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(from_env.config.challenge_secret.is_some());
        assert!(args(&["--memory"])
            .settings_with(None)
            .is_ok_and(|s| s.config.challenge_secret.is_none() && s.to_json()["challenge-secret"].is_null()));
        // Problems are named, the content never shown.
        std::fs::write(&file, "not-a-key-but-secret-text\n").unwrap_or_else(|e| panic!("{e}"));
        let error = args(&["--memory", "--challenge-secret-file", &path])
            .settings_with(None)
            .err()
            .unwrap_or_default();
        assert!(error.contains(&path) && error.contains("32 raw bytes"), "{error}");
        assert!(!error.contains("secret-text"), "{error}");
        let error = args(&["--memory"])
            .settings_with(Some(b"abc"))
            .err()
            .unwrap_or_default();
        assert!(error.starts_with("MESHWIRE_CHALLENGE_SECRET:"), "{error}");
        assert!(
            args(&["--memory", "--challenge-secret-file", "/nonexistent/meshwire-secret"])
                .settings_with(None)
                .is_err_and(|e| e.contains("cannot read the challenge secret file"))
        );
        // Never a value on argv.
        assert!(parse(&["--challenge-secret", "00"]).is_err());
        // The configuration file's key.
        let settings = FileSettings::parse(&format!("challenge-secret-file = {path:?}\n"), "x.toml");
        assert!(settings.is_ok_and(|f| f.challenge_secret_file == Some(file.clone())));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn limit_flags_reach_the_config() {
        let s = args(&[
            "--memory",
            "--registrations-per-minute",
            "3",
            "--discoveries-per-minute",
            "4",
            "--rate-limit-loopback",
            "--route-only-registered",
            "--max-stored-per-recipient",
            "50",
            "--max-stored-per-sender",
            "10",
            "--max-stored-total",
            "500",
            "--max-stored-bytes",
            "65536",
            "--max-rate-limited-requesters",
            "7",
            "--cluster-route-timeout-ms",
            "120",
        ])
        .settings_with(None)
        .unwrap_or_else(|e| panic!("{e}"));
        let c = &s.config;
        assert_eq!(c.cluster_route_timeout, Duration::from_millis(120));
        assert_eq!((c.registrations_per_minute, c.discoveries_per_minute), (3, 4));
        assert!(c.rate_limit_loopback && c.route_only_registered);
        assert_eq!(
            (
                c.max_stored_per_recipient,
                c.max_stored_per_sender,
                c.max_stored_total,
                c.max_stored_bytes
            ),
            (50, 10, 500, 65536)
        );
        assert_eq!(c.max_rate_limited_requesters, 7);
        let limits = c.storage_limits().mailbox;
        assert_eq!((limits.per_recipient, limits.per_sender, limits.total), (50, 10, 500));
        let defaults = args(&["--memory"])
            .settings_with(None)
            .unwrap_or_else(|e| panic!("{e}"));
        let d = ServerConfig::default();
        assert_eq!(defaults.config.registrations_per_minute, d.registrations_per_minute);
        assert_eq!(defaults.config.discoveries_per_minute, d.discoveries_per_minute);
        assert!(!defaults.config.route_only_registered && !defaults.config.rate_limit_loopback);
        let file = FileSettings::parse(
            "registrations-per-minute = 9\nroute-only-registered = true\nmax-stored-total = 11\n",
            "x.toml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(file.registrations_per_minute, Some(9));
        assert_eq!(file.route_only_registered, Some(true));
        assert_eq!(file.max_stored_total, Some(11));
    }

    fn tempdir_for(what: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("meshwire-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        dir
    }

    #[test]
    fn token_file() {
        let dir = std::env::temp_dir().join(format!("meshwire-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join("token");
        std::fs::write(&file, "  s3cret \nignored\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(read_token_file(&file).map(|t| t.to_string()), Ok("s3cret".to_owned()));
        std::fs::write(&file, "\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(read_token_file(&file).is_err_and(|e| e.contains("is empty")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
