//! Replay of `mesh-session` recordings: each recorded client is played by a
//! meshwire [`Mesh`] fed that client's recorded randomness, clock and ids,
//! and must emit byte-identical frames, registry request bodies and
//! WebSocket closes, and decrypt every frame delivered to it to the
//! recorded payload.
//!
//! The interpreter replays any sequence of client actions the schema
//! allows: frames a client sends on its own initiative (`connect`,
//! `fetch_pending`, `heartbeat`, `knock`, `message`, `disconnect`), frames
//! it sends while handling a delivery (`knock_accept`, `knock_reject`,
//! `ack`), deliveries of client frames and of frames the relay composed
//! itself (`relay_frames`: `pending_messages`, `error`, `ack`, any unknown
//! type), KNOCK verdicts (`knock_policy`, `knock_verdicts`) and the close
//! after a disconnect (`closes`). The extensions are described in
//! `vectors/README.md`. Anything it cannot replay fails the case with a
//! message naming it.

use crate::rng::ScriptedRng;
use meshwire_proto::frames::{self, ConnectFrame, FetchPendingFrame};
use meshwire_proto::mesh::{ErrorKind, Event, IdSource, Mesh, MeshConfig, MeshError};
use meshwire_proto::time::Timestamp;
use meshwire_proto::{auth, encoding, registry_wire, Identity, KdfDialect, PreKeyBundle, PreKeys, X25519Secret};
use rand_core::CryptoRngCore;
use serde::Deserialize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

type Check = Result<(), String>;

/// One `mesh-session` case.
#[derive(Debug, Deserialize)]
pub struct MeshSessionCase {
    /// The case name.
    pub name: String,
    /// The first client.
    pub alice: Client,
    /// The second client.
    pub bob: Client,
    /// The clock every client read (ISO 8601).
    pub fixed_time: String,
    /// Every random value a client drew, in draw order, with its role.
    pub random_inputs: Vec<RandomInput>,
    /// Every registry request, with the fake registry's answer.
    pub http_requests: Vec<HttpRequest>,
    /// Every text a client sent on its socket.
    pub frames: Vec<RecordedFrame>,
    /// Extension: frames the relay composed itself (`pending_messages`,
    /// `error`, `ack`, ...), numbered in the same `seq` space as `frames`.
    #[serde(default)]
    pub relay_frames: Vec<RelayFrame>,
    /// Which frame reached which client, in order.
    pub deliveries: Vec<Delivery>,
    /// What each client's message handler got.
    pub received: Vec<Received>,
    /// Extension: the WebSocket closes the clients made. Absent: the
    /// producer did not record closes, and they are not checked; present
    /// (even empty): every close the core asks for must be listed, in order.
    #[serde(default)]
    pub closes: Option<Vec<RecordedClose>>,
    /// Extension: verdicts on single KNOCKs, overriding the receiving
    /// client's `knock_policy`.
    #[serde(default)]
    pub knock_verdicts: Vec<KnockVerdict>,
}

/// A recorded client: its keys and options.
#[derive(Debug, Deserialize)]
pub struct Client {
    /// Its DID.
    pub did: String,
    /// Its Ed25519 seed (hex).
    pub ed25519_seed: String,
    /// Its signed pre-key id.
    pub spk_id: u32,
    /// Its signed pre-key (hex).
    pub spk_private: String,
    /// The signed pre-key signature, when recorded (hex).
    #[serde(default)]
    pub spk_signature: Option<String>,
    /// Its one-time pre-keys.
    pub otks: Vec<Otk>,
    /// Extension: `"accept"` (the default, a client without a KNOCK
    /// handler) or `"reject"` (a handler that refuses every KNOCK).
    #[serde(default)]
    pub knock_policy: Option<String>,
    /// Extension: DIDs this client exchanges plaintext with
    /// (`plaintextPeers`).
    #[serde(default)]
    pub plaintext_peers: Vec<String>,
}

/// A one-time pre-key.
#[derive(Debug, Deserialize)]
pub struct Otk {
    /// Its id.
    pub key_id: u32,
    /// The private key (hex).
    pub private: String,
}

/// One random value a client drew.
#[derive(Debug, Deserialize)]
pub struct RandomInput {
    /// `<client>/<role>`.
    pub role: String,
    /// The value (hex).
    pub value: String,
}

/// One registry request.
#[derive(Debug, Deserialize)]
pub struct HttpRequest {
    /// Ordering counter.
    pub t: u64,
    /// The client that made it.
    pub client: String,
    /// HTTP method.
    pub method: String,
    /// Full URL.
    pub url: String,
    /// Request headers (lower-case names).
    #[serde(default)]
    pub headers: HashMap<String, String>,
    /// Exact body text.
    pub body_json: Option<String>,
    /// The fake registry's answer.
    pub response_body_json: Option<String>,
}

/// A text a client sent.
#[derive(Debug, Deserialize)]
pub struct RecordedFrame {
    /// Frame number (shared with `relay_frames`).
    pub seq: u64,
    /// Ordering counter.
    pub t: u64,
    /// The client that sent it.
    pub sender: String,
    /// The frame type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The exact text.
    pub frame_json: String,
    /// Sent while the sender handled the delivery of this frame.
    pub emitted_while_handling_seq: Option<u64>,
    /// The JSON text a `message` frame carries.
    pub plaintext_json: Option<String>,
}

/// A text the relay composed itself.
#[derive(Debug, Deserialize)]
pub struct RelayFrame {
    /// Frame number (shared with `frames`).
    pub seq: u64,
    /// Ordering counter.
    pub t: u64,
    /// The frame type (null for a text that is not a JSON object).
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The exact text.
    pub frame_json: String,
}

/// One delivery by the relay.
#[derive(Debug, Deserialize)]
pub struct Delivery {
    /// Ordering counter.
    pub t: u64,
    /// The frame delivered (in `frames` or `relay_frames`).
    pub frame_seq: u64,
    /// The client it reached.
    pub to: String,
}

/// What a client's message handler got.
#[derive(Debug, Deserialize)]
pub struct Received {
    /// The client.
    pub receiver: String,
    /// The sender DID.
    pub from: String,
    /// The payload as JSON text.
    pub payload_json: String,
    /// Whether it came as plaintext (checked when recorded).
    #[serde(default)]
    pub is_plaintext: Option<bool>,
}

/// A WebSocket close a client made.
#[derive(Debug, Deserialize)]
pub struct RecordedClose {
    /// Ordering counter.
    pub t: u64,
    /// The client.
    pub client: String,
    /// The close code.
    pub code: u16,
    /// The close reason.
    pub reason: String,
}

/// A verdict on one KNOCK.
#[derive(Debug, Deserialize)]
pub struct KnockVerdict {
    /// The client that decided.
    pub client: String,
    /// The KNOCK frame's id.
    pub knock_id: String,
    /// `"accept"` or `"reject"`.
    pub verdict: String,
}

/// Ids handed out in a recorded order; a draw past the end is an error.
struct ScriptedIds(Arc<Mutex<VecDeque<String>>>);

impl IdSource for ScriptedIds {
    fn next_id(&mut self) -> String {
        self.0
            .lock()
            .map(|mut q| q.pop_front())
            .ok()
            .flatten()
            .unwrap_or_else(|| "<no recorded id left>".into())
    }
}

/// A verdict as the schema names it.
pub fn parse_verdict(what: &str, text: &str) -> Result<bool, String> {
    match text {
        "accept" => Ok(true),
        "reject" => Ok(false),
        other => Err(format!(
            "{what}: unknown verdict {other:?} (expected \"accept\" or \"reject\")"
        )),
    }
}

/// One thing a client did while playing core events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// It sent this frame text (acks included).
    Frame(String),
    /// Its message handler got this.
    Received {
        /// The sender DID.
        from: String,
        /// The payload text.
        payload: String,
        /// Sent in plaintext.
        plaintext: bool,
    },
    /// It closed its socket.
    Close {
        /// The close code.
        code: u16,
        /// The close reason.
        reason: String,
    },
}

/// What a client did with a batch of core events, in order.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Frames, messages handed to the application, closes.
    pub items: Vec<Item>,
    /// Problems the core reported.
    pub errors: Vec<MeshError>,
}

impl Outcome {
    fn one(text: String) -> Self {
        Self {
            items: vec![Item::Frame(text)],
            errors: Vec::new(),
        }
    }

    /// The frame texts sent, in order.
    pub fn frames(&self) -> Vec<&str> {
        self.items
            .iter()
            .filter_map(|i| match i {
                Item::Frame(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    /// The closes made: (code, reason).
    pub fn closes(&self) -> Vec<(u16, &str)> {
        self.items
            .iter()
            .filter_map(|i| match i {
                Item::Close { code, reason } => Some((*code, reason.as_str())),
                _ => None,
            })
            .collect()
    }

    /// The messages handed to the application: (from, payload, plaintext).
    pub fn received(&self) -> Vec<(String, String, bool)> {
        self.items
            .iter()
            .filter_map(|i| match i {
                Item::Received {
                    from,
                    payload,
                    plaintext,
                } => Some((from.clone(), payload.clone(), *plaintext)),
                _ => None,
            })
            .collect()
    }
}

/// Plays `events` as the TypeScript client does: transmits, acks a message
/// and then hands it to the application, asks `verdict(from, knock_id)` on
/// each KNOCK, closes when told.
pub fn drive(
    mesh: &mut Mesh,
    rng: &mut impl CryptoRngCore,
    now: Timestamp,
    events: Vec<Event>,
    mut verdict: impl FnMut(&str, &str) -> Result<bool, String>,
) -> Result<Outcome, String> {
    let mut out = Outcome::default();
    let mut queue: VecDeque<Event> = events.into();
    while let Some(event) = queue.pop_front() {
        match event {
            Event::Transmit(text) => out.items.push(Item::Frame(text)),
            Event::Message(m) => {
                out.items.push(Item::Frame(m.ack));
                out.items.push(Item::Received {
                    from: m.from,
                    payload: String::from_utf8_lossy(&m.payload).into_owned(),
                    plaintext: m.plaintext,
                });
            }
            Event::KnockRequest { from, knock_id, .. } => {
                let accept = verdict(&from, &knock_id)?;
                let decided = mesh.decide_knock(rng, now, &from, &knock_id, accept);
                for (i, e) in decided.into_iter().enumerate() {
                    queue.insert(i, e);
                }
            }
            Event::Close { code, reason } => out.items.push(Item::Close { code, reason }),
            Event::Error(e) => out.errors.push(e),
            Event::KnockAccepted { .. }
            | Event::KnockRejected { .. }
            | Event::SessionEstablished { .. }
            | Event::SessionReplaced { .. }
            | Event::OneTimeKeyConsumed { .. }
            | Event::ResyncNeeded { .. }
            | Event::Delivered { .. } => {}
        }
    }
    Ok(out)
}

struct Player<'a> {
    name: String,
    mesh: Mesh,
    rng: ScriptedRng,
    ids: Arc<Mutex<VecDeque<String>>>,
    bundles: HashMap<String, PreKeyBundle>,
    otk_ids: Vec<u32>,
    received: Vec<(String, String, bool)>,
    policy: bool,
    verdicts: HashMap<&'a str, bool>,
    /// KNOCK ids the client was asked to decide.
    decided: HashSet<String>,
    closes: Vec<(u64, u16, String)>,
    /// Between its `connect` and its `disconnect`: a client sends and is
    /// delivered frames only then.
    online: bool,
}

fn unhex32(field: &str, text: &str) -> Result<[u8; 32], String> {
    encoding::hex_decode_array::<32>(text).map_err(|_| format!("{field}: not 32 bytes of hex"))
}

fn same(what: &str, expected: &str, actual: &str) -> Check {
    if expected == actual {
        Ok(())
    } else {
        Err(format!("{what}:\n  expected {expected}\n  got      {actual}"))
    }
}

/// Kinds of frames a client sends with an id it drew.
const ID_FRAMES: [&str; 4] = ["knock", "knock_accept", "knock_reject", "message"];

impl<'a> Player<'a> {
    fn new(name: &str, client: &Client, case: &'a MeshSessionCase) -> Result<Self, String> {
        let identity = Identity::from_seed(&unhex32("ed25519_seed", &client.ed25519_seed)?);
        same(&format!("{name} did"), &client.did, identity.did().as_str())?;
        let spk = X25519Secret::from_bytes(unhex32("spk_private", &client.spk_private)?);
        let mut prekeys = PreKeys::with_signed_pre_key(&identity, client.spk_id, spk);
        if let Some(signature) = &client.spk_signature {
            same(
                &format!("{name} spk_signature"),
                signature,
                &hex::encode(prekeys.signed_pre_key().signature),
            )?;
        }
        let mut otks: Vec<&Otk> = client.otks.iter().collect();
        otks.sort_by_key(|o| o.key_id);
        for otk in &otks {
            let secret = X25519Secret::from_bytes(unhex32("otk private", &otk.private)?);
            prekeys
                .add_one_time_key(otk.key_id, secret)
                .map_err(|e| e.to_string())?;
        }
        // Key generation happened at registration; the draws left are the
        // session's: ephemerals, ratchet keys, nonces.
        let prefix = format!("{name}/");
        let draws = case
            .random_inputs
            .iter()
            .filter(|r| r.role.starts_with(&prefix))
            .filter(|r| !matches!(&r.role[prefix.len()..], "spk") && !r.role[prefix.len()..].starts_with("otk"))
            .map(|r| encoding::hex_decode(&r.value).map_err(|_| format!("random input {}: not hex", r.role)))
            .collect::<Result<Vec<_>, _>>()?;
        // Ids the client drew: those of the frames it originated, in order.
        let ids = case
            .frames
            .iter()
            .filter(|f| f.sender == name && ID_FRAMES.contains(&f.kind.as_str()))
            .map(|f| {
                serde_json::from_str::<serde_json::Value>(&f.frame_json)
                    .ok()
                    .and_then(|v| v.get("id")?.as_str().map(str::to_owned))
                    .ok_or_else(|| format!("{} frame {} has no string id", f.kind, f.seq))
            })
            .collect::<Result<VecDeque<String>, String>>()?;
        let ids = Arc::new(Mutex::new(ids));
        let config = MeshConfig {
            plaintext_peers: client.plaintext_peers.iter().cloned().collect(),
            ..MeshConfig::default()
        };
        let mesh = Mesh::new(identity, prekeys, config, Box::new(ScriptedIds(ids.clone())));
        let policy = match &client.knock_policy {
            None => true,
            Some(p) => parse_verdict(&format!("{name} knock_policy"), p)?,
        };
        let verdicts = case
            .knock_verdicts
            .iter()
            .filter(|v| v.client == name)
            .map(|v| Ok((v.knock_id.as_str(), parse_verdict("knock_verdicts", &v.verdict)?)))
            .collect::<Result<HashMap<_, _>, String>>()?;
        let closes = case
            .closes
            .iter()
            .flatten()
            .filter(|c| c.client == name)
            .map(|c| (c.t, c.code, c.reason.clone()))
            .collect();
        Ok(Self {
            name: name.to_owned(),
            mesh,
            rng: ScriptedRng::new(draws),
            ids,
            bundles: HashMap::new(),
            otk_ids: otks.iter().map(|o| o.key_id).collect(),
            received: Vec::new(),
            policy,
            verdicts,
            closes,
            decided: HashSet::new(),
            online: false,
        })
    }

    fn drive(&mut self, now: Timestamp, events: Vec<Event>) -> Result<Outcome, String> {
        let verdicts = &self.verdicts;
        let policy = self.policy;
        let decided = &mut self.decided;
        let out = drive(&mut self.mesh, &mut self.rng, now, events, |_, knock_id| {
            decided.insert(knock_id.to_owned());
            Ok(verdicts.get(knock_id).copied().unwrap_or(policy))
        })?;
        self.received.extend(out.received());
        Ok(out)
    }

    /// Checks the closes of `out` against the recording (when it has closes).
    fn check_closes(&mut self, out: &Outcome, recorded: bool, after_t: u64) -> Check {
        for (code, reason) in out.closes() {
            if !recorded {
                continue;
            }
            let next = self.closes.iter().position(|(t, _, _)| *t > after_t);
            let Some(i) = next else {
                return Err(format!(
                    "{} closed its socket ({code}, {reason:?}), but no close is recorded",
                    self.name
                ));
            };
            let (_, rcode, rreason) = self.closes.remove(i);
            same(
                &format!("{} close", self.name),
                &format!("{rcode} {rreason:?}"),
                &format!("{code} {reason:?}"),
            )?;
        }
        Ok(())
    }
}

/// Errors the TypeScript client meets silently, so a recording shows
/// nothing of them: relay `error` frames, frame types it does not handle
/// (unknown ones, and client frames such as `connect` coming back from the
/// relay), and texts that are not JSON objects (dropped with a warning).
pub fn silent(e: &MeshError, delivered: &str) -> bool {
    match e.kind {
        ErrorKind::Relay | ErrorKind::UnknownFrame => true,
        ErrorKind::Frame => match serde_json::from_str::<serde_json::Value>(delivered) {
            Ok(serde_json::Value::Object(frame)) => matches!(
                frame.get("type").and_then(|t| t.as_str()),
                Some("connect" | "fetch_pending" | "disconnect")
            ),
            _ => true,
        },
        _ => false,
    }
}

enum Step<'a> {
    Http(&'a HttpRequest),
    Own(&'a RecordedFrame),
    Deliver(&'a Delivery),
}

/// Replays one recording; `dialect` is the file's `kdf` (legacy recordings
/// come from npm SDK 4.0.0: connect without proof, legacy registration).
pub fn verify_mesh_session(case: &MeshSessionCase, dialect: KdfDialect) -> Check {
    let legacy = dialect == KdfDialect::LegacyFfSalt;
    let now = Timestamp::parse_iso(&case.fixed_time).map_err(|e| e.to_string())?;
    let mut players = [
        Player::new("alice", &case.alice, case)?,
        Player::new("bob", &case.bob, case)?,
    ];
    let index = |name: &str| -> Result<usize, String> {
        match name {
            "alice" => Ok(0),
            "bob" => Ok(1),
            other => Err(format!("unknown client {other:?}")),
        }
    };
    if legacy {
        let dids: Vec<String> = players.iter().map(|p| p.mesh.identity().did().to_string()).collect();
        for p in &mut players {
            for peer in &dids {
                p.mesh.set_peer_dialect(peer, KdfDialect::LegacyFfSalt);
            }
        }
    }
    if let Some(closes) = &case.closes {
        for c in closes {
            index(&c.client).map_err(|e| format!("closes: {e}"))?;
        }
    }
    for v in &case.knock_verdicts {
        index(&v.client).map_err(|e| format!("knock_verdicts: {e}"))?;
    }

    // Every delivered text, client-sent or relay-composed, by seq.
    let mut texts: HashMap<u64, (&str, &str)> = HashMap::new();
    for f in &case.frames {
        index(&f.sender).map_err(|e| format!("frame {}: {e}", f.seq))?;
        if texts.insert(f.seq, (&f.kind, &f.frame_json)).is_some() {
            return Err(format!("two frames with seq {}", f.seq));
        }
    }
    for f in &case.relay_frames {
        let kind = f.kind.as_deref().unwrap_or("untyped");
        if texts.insert(f.seq, (kind, &f.frame_json)).is_some() {
            return Err(format!("relay frame seq {} is also another frame's", f.seq));
        }
    }

    let mut steps: Vec<(u64, Step<'_>)> = Vec::new();
    steps.extend(case.http_requests.iter().map(|h| (h.t, Step::Http(h))));
    steps.extend(
        case.frames
            .iter()
            .filter(|f| f.emitted_while_handling_seq.is_none())
            .map(|f| (f.t, Step::Own(f))),
    );
    steps.extend(case.deliveries.iter().map(|d| (d.t, Step::Deliver(d))));
    steps.sort_by_key(|(t, _)| *t);
    let mut compared: HashSet<u64> = HashSet::new();
    let closes_recorded = case.closes.is_some();

    for (step_index, (_, step)) in steps.iter().enumerate() {
        match step {
            Step::Http(h) => {
                let p = &mut players[index(&h.client)?];
                replay_http(p, h, legacy, &case.fixed_time)
                    .map_err(|e| format!("{} {} {}: {e}", h.client, h.method, h.url))?;
            }
            Step::Own(f) => {
                let what = format!("{} {} frame {}", f.sender, f.kind, f.seq);
                let p = &mut players[index(&f.sender)?];
                match (f.kind.as_str(), p.online) {
                    ("connect", _) => p.online = true,
                    (_, false) => return Err(format!("{what}: sent while {} was not connected", f.sender)),
                    ("disconnect", true) => p.online = false,
                    _ => {}
                }
                let out = own_frame(p, f, legacy, now).map_err(|e| format!("{what}: {e}"))?;
                if let Some(e) = out
                    .errors
                    .iter()
                    .find(|e| !(f.kind == "disconnect" && e.kind == ErrorKind::NoSession))
                {
                    return Err(format!("{what}: the core reported {:?}: {}", e.kind, e.detail));
                }
                match out.frames().as_slice() {
                    [text] => same(&what, &f.frame_json, text)?,
                    other => return Err(format!("{what}: the core sent {} frames: {other:?}", other.len())),
                }
                compared.insert(f.seq);
                p.check_closes(&out, closes_recorded, f.t)
                    .map_err(|e| format!("{what}: {e}"))?;
            }
            Step::Deliver(d) => {
                let (kind, text) = *texts
                    .get(&d.frame_seq)
                    .ok_or(format!("delivery of unknown frame {}", d.frame_seq))?;
                let what = format!("{} handling {kind} frame {}", d.to, d.frame_seq);
                let p = &mut players[index(&d.to)?];
                if !p.online {
                    return Err(format!("{what}: delivered while {} was not connected", d.to));
                }
                let events = p.mesh.handle_text(&mut p.rng, now, text);
                let out = p.drive(now, events).map_err(|e| format!("{what}: {e}"))?;
                if let Some(e) = out.errors.iter().find(|e| !silent(e, text)) {
                    return Err(format!("{what}: the core reported {:?}: {}", e.kind, e.detail));
                }
                if !out.closes().is_empty() {
                    return Err(format!(
                        "{what}: the core asked to close the socket: {:?}",
                        out.closes()
                    ));
                }
                // The frames emitted while handling this delivery: those
                // that name it, after it, and before the same frame's next
                // delivery to the same client (a relay may redeliver).
                let until = steps
                    .iter()
                    .skip(step_index + 1)
                    .find_map(|(t, s)| match s {
                        Step::Deliver(n) if n.frame_seq == d.frame_seq && n.to == d.to => Some(*t),
                        _ => None,
                    })
                    .unwrap_or(u64::MAX);
                let expected: Vec<&RecordedFrame> = case
                    .frames
                    .iter()
                    .filter(|f| {
                        f.sender == d.to
                            && f.emitted_while_handling_seq == Some(d.frame_seq)
                            && f.t > d.t
                            && f.t < until
                            && !compared.contains(&f.seq)
                    })
                    .collect();
                let emitted = out.frames();
                if emitted.len() != expected.len() {
                    return Err(format!(
                        "{what}: emitted {} frames, recorded {}: {emitted:?}",
                        emitted.len(),
                        expected.len(),
                    ));
                }
                for (text, recorded) in emitted.into_iter().zip(expected) {
                    same(
                        &format!("{what}: {} frame {}", recorded.kind, recorded.seq),
                        &recorded.frame_json,
                        text,
                    )?;
                    compared.insert(recorded.seq);
                }
            }
        }
    }

    if let Some(f) = case.frames.iter().find(|f| !compared.contains(&f.seq)) {
        return Err(format!(
            "{} {} frame {} was never sent in the replay (compared {} of {} recorded frames)",
            f.sender,
            f.kind,
            f.seq,
            compared.len(),
            case.frames.len()
        ));
    }
    for p in &players {
        let recorded: Vec<&Received> = case.received.iter().filter(|r| r.receiver == p.name).collect();
        let differs = p.received.len() != recorded.len()
            || p.received.iter().zip(&recorded).any(|((from, payload, plain), r)| {
                *from != r.from || *payload != r.payload_json || r.is_plaintext.is_some_and(|x| x != *plain)
            });
        if differs {
            let recorded: Vec<(&str, &str)> = recorded
                .iter()
                .map(|r| (r.from.as_str(), r.payload_json.as_str()))
                .collect();
            return Err(format!("{} received {:?}, recorded {:?}", p.name, p.received, recorded));
        }
        p.rng.finish().map_err(|e| format!("{} randomness: {e}", p.name))?;
        let left = p.ids.lock().map(|q| q.len()).unwrap_or(0);
        if left != 0 {
            return Err(format!("{}: {left} recorded ids never drawn", p.name));
        }
        if let Some(id) = p.verdicts.keys().find(|id| !p.decided.contains(**id)) {
            return Err(format!(
                "knock_verdicts: {} was never asked to decide KNOCK {id:?}",
                p.name
            ));
        }
        if let Some((t, code, reason)) = p.closes.first() {
            return Err(format!(
                "{}: recorded close ({code}, {reason:?}) at t={t} was never made",
                p.name
            ));
        }
    }
    Ok(())
}

fn replay_http(p: &mut Player<'_>, h: &HttpRequest, legacy: bool, timestamp: &str) -> Check {
    let identity = p.mesh.identity();
    let path = h
        .url
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..]))
        .unwrap_or_default();
    if let Some(header) = h.headers.get("authorization") {
        same(
            "authorization",
            header,
            &auth::ed25519_timestamp_header(identity, timestamp),
        )?;
    } else if !legacy {
        return Err("no authorization header recorded".into());
    }
    let empty = serde_json::Map::new();
    match (h.method.as_str(), path) {
        ("POST", "/v1/agents") => {
            let body = if legacy {
                registry_wire::legacy_register_body(identity, &[], &empty)
            } else {
                registry_wire::register_body(identity, timestamp, &[], &empty)
            };
            same("register body", h.body_json.as_deref().unwrap_or_default(), &body)
        }
        ("PUT", path) if path.ends_with("/prekeys") => {
            same(
                "prekeys path",
                &format!("{}/prekeys", registry_wire::agent_path(identity.did())),
                path,
            )?;
            let body = registry_wire::prekeys_body(identity, p.mesh.prekeys(), &p.otk_ids);
            same("prekeys body", h.body_json.as_deref().unwrap_or_default(), &body)
        }
        ("GET", path) if path.ends_with("/prekeys") => {
            let encoded = path.trim_start_matches("/v1/agents/").trim_end_matches("/prekeys");
            let did = encoded.replace("%3A", ":").replace("%3a", ":");
            let bundle = PreKeyBundle::from_json(h.response_body_json.as_deref().unwrap_or_default())
                .map_err(|e| format!("recorded bundle: {e}"))?;
            p.bundles.insert(did, bundle);
            Ok(())
        }
        (method, path) => Err(format!("no replay for {method} {path}")),
    }
}

/// The payload of a recorded `message` frame: `plaintext_json`, or for a
/// plaintext frame without it, the decoded `ciphertext`.
fn message_payload(f: &RecordedFrame, recorded: &serde_json::Value) -> Result<Vec<u8>, String> {
    if let Some(p) = &f.plaintext_json {
        return Ok(p.clone().into_bytes());
    }
    if recorded.get("plaintext").and_then(|v| v.as_bool()) == Some(true) {
        let text = recorded.get("ciphertext").and_then(|v| v.as_str()).unwrap_or_default();
        return encoding::b64_decode(text).map_err(|e| format!("plaintext frame: {e}"));
    }
    Err("message without plaintext_json".into())
}

fn own_frame(p: &mut Player<'_>, f: &RecordedFrame, legacy: bool, now: Timestamp) -> Result<Outcome, String> {
    let recorded: serde_json::Value = serde_json::from_str(&f.frame_json).map_err(|e| e.to_string())?;
    let to = recorded
        .get("to")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let identity = p.mesh.identity();
    let one = Outcome::one;
    match f.kind.as_str() {
        "connect" if legacy => Ok(one(frames::to_text(&ConnectFrame::legacy(identity.did())))),
        "connect" => Ok(one(frames::to_text(&ConnectFrame::new(identity, &now.to_iso())))),
        "fetch_pending" => Ok(one(frames::to_text(&FetchPendingFrame::new(identity)))),
        "heartbeat" => Ok(one(p.mesh.heartbeat_frame(now))),
        "knock" => {
            let bundle = p.bundles.get(&to).ok_or(format!("no bundle fetched for {to}"))?.clone();
            p.mesh
                .open_session(&mut p.rng, now, &to, &bundle)
                .map(one)
                .map_err(|e| e.to_string())
        }
        "message" => {
            let payload = message_payload(f, &recorded)?;
            p.mesh
                .encrypt(&mut p.rng, now, &to, &payload)
                .map(|(_, text)| one(text))
                .map_err(|e| e.to_string())
        }
        "disconnect" => {
            let events = p.mesh.disconnect();
            p.drive(now, events)
        }
        other => Err(format!(
            "no replay for a {other} frame sent on the client's own initiative (not while handling a delivery)"
        )),
    }
}
