//! meshwire's own `mesh-session` cases: two meshwire [`Mesh`] clients and
//! a scripted relay and registry, recorded the way the TypeScript
//! producers record theirs (see SCHEMA.md and `vectors/README.md`).
//!
//! Inputs are labelled like the shared files': every private value is
//! `sha256(utf8("agentmesh-golden/<case>/<role>"))` with roles
//! `<party>/ed25519-seed`, `<party>/spk`, `<party>/otk-<id>` (Bob's
//! highest-id one-time key, the first the registry serves, is `bob/otk`),
//! `<party>/ek` (`ek-1`, ... for later KNOCKs), `<party>/ratchet-K` and
//! `<party>/nonce-K` (first 12 bytes). Ids are
//! `00000000-0000-4000-8000-<12-digit counter>` in draw order over both
//! clients; the clock is fixed.

use crate::mesh_session::{drive, parse_verdict, silent, Item, Outcome};
use crate::rng::label_bytes;
use meshwire_proto::frames::{self, ConnectFrame, FetchPendingFrame};
use meshwire_proto::mesh::{ErrorKind, IdSource, Mesh, MeshConfig};
use meshwire_proto::time::Timestamp;
use meshwire_proto::{auth, encoding, registry_wire, Identity, KdfDialect, PreKeyBundle, PreKeys, X25519Secret};
use rand_core::{CryptoRng, RngCore};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The fixed clock of every mesh-session case (as in the shared files).
pub const MESH_TIME: &str = "2026-11-21T12:00:00.000Z";
const RELAY_URL: &str = "http://relay.test:8080";
const REGISTRY_URL: &str = "http://registry.test:8082";

/// Draws of both clients, in order: (role, label, hex value).
type DrawLog = Arc<Mutex<Vec<(String, String, String)>>>;

/// Labelled randomness that logs every draw with its role.
struct RoleRng {
    case: String,
    party: &'static str,
    log: DrawLog,
    next_ratchet: u32,
    next_nonce: u32,
    next_ek: u32,
    ek_next: bool,
    error: Option<String>,
}

impl RoleRng {
    fn draw(&mut self, role: String, len: usize) -> Vec<u8> {
        let label = format!("agentmesh-golden/{}/{role}", self.case);
        let value = label_bytes(&label).get(..len).unwrap_or_default().to_vec();
        if let Ok(mut log) = self.log.lock() {
            log.push((role, label, hex::encode(&value)));
        }
        value
    }
}

impl RngCore for RoleRng {
    fn next_u32(&mut self) -> u32 {
        self.error.get_or_insert_with(|| "unexpected next_u32 draw".into());
        0
    }

    fn next_u64(&mut self) -> u64 {
        self.error.get_or_insert_with(|| "unexpected next_u64 draw".into());
        0
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        let role = match dest.len() {
            32 if self.ek_next => {
                self.ek_next = false;
                let k = self.next_ek;
                self.next_ek += 1;
                if k == 0 {
                    format!("{}/ek", self.party)
                } else {
                    format!("{}/ek-{k}", self.party)
                }
            }
            32 => {
                self.next_ratchet += 1;
                format!("{}/ratchet-{}", self.party, self.next_ratchet - 1)
            }
            12 => {
                self.next_nonce += 1;
                format!("{}/nonce-{}", self.party, self.next_nonce - 1)
            }
            n => {
                self.error
                    .get_or_insert_with(|| format!("unexpected draw of {n} bytes"));
                dest.fill(0);
                return;
            }
        };
        let value = self.draw(role, dest.len());
        dest.copy_from_slice(&value);
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for RoleRng {}

/// UUID-shaped ids from one counter shared by both clients.
struct CountingIds(Arc<Mutex<Vec<String>>>);

impl IdSource for CountingIds {
    fn next_id(&mut self) -> String {
        match self.0.lock() {
            Ok(mut drawn) => {
                let id = format!("00000000-0000-4000-8000-{:012}", drawn.len() + 1);
                drawn.push(id.clone());
                id
            }
            Err(_) => "<poisoned>".into(),
        }
    }
}

/// The two recorded clients.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Who {
    /// The first client.
    Alice,
    /// The second client.
    Bob,
}

impl Who {
    fn index(self) -> usize {
        match self {
            Who::Alice => 0,
            Who::Bob => 1,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Who::Alice => "alice",
            Who::Bob => "bob",
        }
    }
}

struct Party {
    name: &'static str,
    mesh: Mesh,
    rng: RoleRng,
    otks: Vec<(u32, String, [u8; 32])>,
    /// One-time key ids the registry still serves (served from the end).
    served: Vec<u32>,
    registered: bool,
    bundles: HashMap<String, PreKeyBundle>,
    policy: bool,
    verdicts: HashMap<String, bool>,
    client: Value,
}

/// Records one scripted mesh session.
pub struct Recorder {
    name: String,
    dialect: KdfDialect,
    now: Timestamp,
    parties: [Party; 2],
    log: DrawLog,
    ids: Arc<Mutex<Vec<String>>>,
    t: u64,
    seq: u64,
    texts: HashMap<u64, String>,
    http: Vec<Value>,
    frames: Vec<Value>,
    relay_frames: Vec<Value>,
    deliveries: Vec<Value>,
    received: Vec<Value>,
    closes: Vec<Value>,
    knock_verdicts: Vec<Value>,
    flow: Vec<String>,
}

fn otk_role(party: &str, id: u32, count: u32) -> String {
    if party == "bob" && id + 1 == count {
        "bob/otk".into()
    } else {
        format!("{party}/otk-{id}")
    }
}

impl Recorder {
    /// A case `name` in `dialect` where Alice holds `alice_otks` one-time
    /// keys and Bob `bob_otks`.
    pub fn new(name: &str, dialect: KdfDialect, alice_otks: u32, bob_otks: u32) -> Result<Self, String> {
        let now = Timestamp::parse_iso(MESH_TIME).map_err(|e| e.to_string())?;
        let log: DrawLog = Arc::new(Mutex::new(Vec::new()));
        let ids = Arc::new(Mutex::new(Vec::new()));
        let make = |party: &'static str, otk_count: u32| -> Result<Party, String> {
            let label = |role: &str| label_bytes(&format!("agentmesh-golden/{name}/{role}"));
            let seed = label(&format!("{party}/ed25519-seed"));
            let identity = Identity::from_seed(&seed);
            let spk = label(&format!("{party}/spk"));
            let mut prekeys = PreKeys::with_signed_pre_key(&identity, 0, X25519Secret::from_bytes(spk));
            let mut otks = Vec::new();
            for id in 0..otk_count {
                let role = otk_role(party, id, otk_count);
                let private = label(&role);
                prekeys
                    .add_one_time_key(id, X25519Secret::from_bytes(private))
                    .map_err(|e| e.to_string())?;
                otks.push((id, role, private));
            }
            let client = json!({
                "did": identity.did().as_str(),
                "ed25519_seed": hex::encode(seed),
                "ed25519_public": identity.ed25519_public().to_hex(),
                "x25519_private": hex::encode(identity.x25519_secret().as_bytes()),
                "x25519_public": identity.x25519_public().to_hex(),
                "one_time_prekey_count": otk_count,
                "spk_id": 0,
                "spk_private": hex::encode(spk),
                "spk_public": prekeys.signed_pre_key().pair.public().to_hex(),
                "spk_signature": hex::encode(prekeys.signed_pre_key().signature),
                "otks": otks.iter().map(|(id, role, private)| json!({
                    "key_id": id,
                    "label_role": role,
                    "private": hex::encode(private),
                    "public": prekeys.one_time_key(*id).map(|k| k.public().to_hex()),
                })).collect::<Vec<_>>(),
                "ws_url": format!("{}/ws", RELAY_URL.replacen("http", "ws", 1)),
            });
            let mesh = Mesh::new(
                identity,
                prekeys,
                MeshConfig::default(),
                Box::new(CountingIds(ids.clone())),
            );
            Ok(Party {
                name: party,
                mesh,
                rng: RoleRng {
                    case: name.to_owned(),
                    party,
                    log: log.clone(),
                    next_ratchet: 0,
                    next_nonce: 0,
                    next_ek: 0,
                    ek_next: false,
                    error: None,
                },
                otks,
                served: (0..otk_count).collect(),
                registered: false,
                bundles: HashMap::new(),
                policy: true,
                verdicts: HashMap::new(),
                client,
            })
        };
        let mut parties = [make("alice", alice_otks)?, make("bob", bob_otks)?];
        if dialect == KdfDialect::LegacyFfSalt {
            let dids: Vec<String> = parties.iter().map(|p| p.mesh.identity().did().to_string()).collect();
            for p in &mut parties {
                for did in &dids {
                    p.mesh.set_peer_dialect(did, KdfDialect::LegacyFfSalt);
                }
            }
        }
        Ok(Self {
            name: name.to_owned(),
            dialect,
            now,
            parties,
            log,
            ids,
            t: 0,
            seq: 0,
            texts: HashMap::new(),
            http: Vec::new(),
            frames: Vec::new(),
            relay_frames: Vec::new(),
            deliveries: Vec::new(),
            received: Vec::new(),
            closes: Vec::new(),
            knock_verdicts: Vec::new(),
            flow: Vec::new(),
        })
    }

    fn legacy(&self) -> bool {
        self.dialect == KdfDialect::LegacyFfSalt
    }

    fn tick(&mut self) -> u64 {
        self.t += 1;
        self.t - 1
    }

    fn did(&self, who: Who) -> String {
        self.parties[who.index()].mesh.identity().did().to_string()
    }

    fn note(&mut self, text: String) {
        self.flow.push(text);
    }

    /// Bob's (or Alice's) KNOCK handler refuses every KNOCK.
    pub fn reject_all_knocks(&mut self, who: Who) {
        let p = &mut self.parties[who.index()];
        p.policy = false;
        p.client["knock_policy"] = "reject".into();
        let name = p.name;
        self.note(format!("{name} has a KNOCK handler that rejects every KNOCK"));
    }

    /// `who`'s verdict on the KNOCK with id `knock_id`.
    pub fn verdict_on(&mut self, who: Who, knock_id: &str, verdict: &str) -> Result<(), String> {
        let accept = parse_verdict("verdict_on", verdict)?;
        self.parties[who.index()].verdicts.insert(knock_id.to_owned(), accept);
        self.knock_verdicts.push(json!({
            "client": who.name(),
            "knock_id": knock_id,
            "verdict": verdict,
        }));
        Ok(())
    }

    /// Both clients exchange plaintext with each other.
    pub fn plaintext_peers(&mut self) {
        let dids = [self.did(Who::Alice), self.did(Who::Bob)];
        for (i, p) in self.parties.iter_mut().enumerate() {
            let peer = dids[1 - i].clone();
            p.mesh.config_mut().plaintext_peers.insert(peer.clone());
            p.client["plaintext_peers"] = json!([peer]);
        }
        self.note("both clients list each other in plaintextPeers".into());
    }

    fn record_frame(
        &mut self,
        who: Who,
        text: String,
        while_handling: Option<u64>,
        plaintext_json: Option<&str>,
    ) -> u64 {
        let seq = self.seq;
        self.seq += 1;
        let t = self.tick();
        let kind = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("type")?.as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut frame = json!({
            "seq": seq,
            "t": t,
            "sender": who.name(),
            "type": kind,
            "frame_json": text,
        });
        if let Some(s) = while_handling {
            frame["emitted_while_handling_seq"] = s.into();
        }
        if let Some(p) = plaintext_json {
            frame["plaintext_json"] = p.into();
        }
        self.texts.insert(seq, text);
        self.frames.push(frame);
        seq
    }

    fn record_items(&mut self, who: Who, out: Outcome, while_handling: Option<u64>) -> Result<Vec<u64>, String> {
        let mut seqs = Vec::new();
        for item in out.items {
            match item {
                Item::Frame(text) => seqs.push(self.record_frame(who, text, while_handling, None)),
                Item::Received {
                    from,
                    payload,
                    plaintext,
                } => {
                    let t = self.tick();
                    let mut r = json!({
                        "t": t,
                        "receiver": who.name(),
                        "from": from,
                        "payload_json": payload,
                        "is_plaintext": plaintext,
                    });
                    if let Some(s) = while_handling {
                        r["frame_seq"] = s.into();
                    }
                    self.received.push(r);
                }
                Item::Close { code, reason } => {
                    let t = self.tick();
                    self.closes
                        .push(json!({"t": t, "client": who.name(), "code": code, "reason": reason}));
                }
            }
        }
        Ok(seqs)
    }

    fn http(&mut self, who: Who, method: &str, path: &str, body: Option<String>, status: u16, response: String) {
        let t = self.tick();
        let identity = self.parties[who.index()].mesh.identity();
        let mut headers = serde_json::Map::new();
        if body.is_some() {
            headers.insert("content-type".into(), "application/json".into());
        }
        if !self.legacy() {
            headers.insert(
                "authorization".into(),
                auth::ed25519_timestamp_header(identity, MESH_TIME).into(),
            );
        }
        self.http.push(json!({
            "t": t,
            "client": who.name(),
            "method": method,
            "url": format!("{REGISTRY_URL}{path}"),
            "headers": headers,
            "body_json": body,
            "response_status": status,
            "response_body_json": response,
        }));
    }

    /// `who` connects: `connect` and `fetch_pending`, then on the first
    /// connect registration and the pre-key upload.
    pub fn connect(&mut self, who: Who) {
        let identity = self.parties[who.index()].mesh.identity();
        let connect = if self.legacy() {
            frames::to_text(&ConnectFrame::legacy(identity.did()))
        } else {
            frames::to_text(&ConnectFrame::new(identity, &self.now.to_iso()))
        };
        let fetch = frames::to_text(&FetchPendingFrame::new(identity));
        let legacy = self.legacy();
        self.record_frame(who, connect, None, None);
        self.record_frame(who, fetch, None, None);
        let p = &mut self.parties[who.index()];
        if p.registered {
            self.note(format!("{}.connect (again: no registration)", who.name()));
            return;
        }
        p.registered = true;
        // 4.0.0 and main draw the signed pre-key, then the one-time keys.
        let mut draws = vec![format!("{}/spk", p.name)];
        draws.extend(p.otks.iter().map(|(_, role, _)| role.clone()));
        for role in draws {
            p.rng.draw(role, 32);
        }
        let identity = p.mesh.identity();
        let empty = serde_json::Map::new();
        let register = if legacy {
            registry_wire::legacy_register_body(identity, &[], &empty)
        } else {
            registry_wire::register_body(identity, MESH_TIME, &[], &empty)
        };
        let ids: Vec<u32> = p.otks.iter().map(|(id, _, _)| *id).collect();
        let prekeys = registry_wire::prekeys_body(identity, p.mesh.prekeys(), &ids);
        let path = format!("{}/prekeys", registry_wire::agent_path(identity.did()));
        let did = identity.did().to_string();
        self.http(
            who,
            "POST",
            "/v1/agents",
            Some(register),
            201,
            json!({"did": did}).to_string(),
        );
        self.http(who, "PUT", &path, Some(prekeys), 200, r#"{"status":"ok"}"#.into());
        self.note(format!(
            "{}.connect (connect + fetch_pending, POST /v1/agents, PUT prekeys)",
            who.name()
        ));
    }

    /// `who` opens a session with the other client: fetches its bundle (the
    /// registry serves its highest unserved one-time key), sends the KNOCK.
    /// Returns the KNOCK's seq and id.
    pub fn open(&mut self, who: Who) -> Result<(u64, String), String> {
        let peer = match who {
            Who::Alice => Who::Bob,
            Who::Bob => Who::Alice,
        };
        let q = &mut self.parties[peer.index()];
        let otk = q.served.pop();
        let bundle = q.mesh.prekeys().bundle(q.mesh.identity(), otk);
        let b64 = encoding::b64_url;
        let mut body = json!({
            "identity_key": b64(bundle.identity_key.as_bytes()),
            "identity_key_ed": b64(bundle.identity_key_ed.as_bytes()),
            "signed_pre_key": {
                "key_id": bundle.signed_pre_key_id,
                "public_key": b64(bundle.signed_pre_key.as_bytes()),
                "signature": b64(&bundle.signed_pre_key_signature),
            },
        });
        if let Some((id, key)) = &bundle.one_time_pre_key {
            body["one_time_pre_key"] = json!({"key_id": id, "public_key": b64(key.as_bytes())});
        }
        let peer_did = self.did(peer);
        let path = format!("/v1/agents/{}/prekeys", registry_wire::encode_component(&peer_did));
        self.http(who, "GET", &path, None, 200, body.to_string());
        let p = &mut self.parties[who.index()];
        let parsed = PreKeyBundle::from_json(&body.to_string()).map_err(|e| e.to_string())?;
        p.bundles.insert(peer_did.clone(), parsed.clone());
        p.rng.ek_next = true;
        let text = p
            .mesh
            .open_session(&mut p.rng, self.now, &peer_did, &parsed)
            .map_err(|e| e.to_string())?;
        let id = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("id")?.as_str().map(str::to_owned))
            .unwrap_or_default();
        let seq = self.record_frame(who, text, None, None);
        self.note(format!(
            "{}.establishSessionWithPeer (GET prekeys{}, knock frame {seq})",
            who.name(),
            otk.map(|id| format!(" serving one-time key {id}")).unwrap_or_default()
        ));
        Ok((seq, id))
    }

    /// `who` sends `payload` (a compact JSON text) to the other client.
    pub fn send(&mut self, who: Who, payload: &str) -> Result<u64, String> {
        let peer = self.did(match who {
            Who::Alice => Who::Bob,
            Who::Bob => Who::Alice,
        });
        let p = &mut self.parties[who.index()];
        let (_, text) = p
            .mesh
            .encrypt(&mut p.rng, self.now, &peer, payload.as_bytes())
            .map_err(|e| e.to_string())?;
        let seq = self.record_frame(who, text, None, Some(payload));
        self.note(format!("{}.send {payload} (frame {seq})", who.name()));
        Ok(seq)
    }

    /// `who` sends a heartbeat.
    pub fn heartbeat(&mut self, who: Who) {
        let text = self.parties[who.index()].mesh.heartbeat_frame(self.now);
        let seq = self.record_frame(who, text, None, None);
        self.note(format!("{}.sendHeartbeat (frame {seq})", who.name()));
    }

    /// `who` disconnects: the `disconnect` frame, then the close.
    pub fn disconnect(&mut self, who: Who) -> Result<(), String> {
        let p = &mut self.parties[who.index()];
        let events = p.mesh.disconnect();
        let out = drive(&mut p.mesh, &mut p.rng, self.now, events, |_, _| {
            Err("a KNOCK during disconnect".into())
        })?;
        if let Some(e) = out.errors.iter().find(|e| e.kind != ErrorKind::NoSession) {
            return Err(format!("{} disconnect: {:?}: {}", who.name(), e.kind, e.detail));
        }
        let dropped = out.errors.len();
        self.record_items(who, out, None)?;
        self.note(format!(
            "{}.disconnect (disconnect frame, close 1000 \"client disconnect\"{})",
            who.name(),
            if dropped > 0 {
                format!("; {dropped} message(s) buffered before their KNOCK dropped")
            } else {
                String::new()
            }
        ));
        Ok(())
    }

    /// The relay delivers frame `seq` (a client's or its own) to `to`.
    pub fn deliver(&mut self, seq: u64, to: Who) -> Result<Vec<u64>, String> {
        let text = self.texts.get(&seq).cloned().ok_or(format!("no frame {seq}"))?;
        let kind = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("type")?.as_str().map(str::to_owned));
        let t = self.tick();
        self.deliveries
            .push(json!({"t": t, "frame_seq": seq, "to": to.name(), "type": kind}));
        let kind = kind.unwrap_or_else(|| "untyped text".into());
        let now = self.now;
        let p = &mut self.parties[to.index()];
        let events = p.mesh.handle_text(&mut p.rng, now, &text);
        let (verdicts, policy) = (&p.verdicts, p.policy);
        let out = drive(&mut p.mesh, &mut p.rng, now, events, |_, id| {
            Ok(verdicts.get(id).copied().unwrap_or(policy))
        })?;
        if let Some(e) = out.errors.iter().find(|e| !silent(e, &text)) {
            return Err(format!(
                "{} handling frame {seq}: {:?}: {}",
                to.name(),
                e.kind,
                e.detail
            ));
        }
        let emitted = self.record_items(to, out, Some(seq))?;
        let emitted_kinds: Vec<String> = emitted
            .iter()
            .filter_map(|s| self.frames.iter().find(|f| f["seq"] == *s))
            .map(|f| f["type"].as_str().unwrap_or_default().to_owned())
            .collect();
        self.note(format!(
            "relay delivers {kind} {seq} to {}{}",
            to.name(),
            if emitted_kinds.is_empty() {
                String::new()
            } else {
                format!(" ({} emits {})", to.name(), emitted_kinds.join(", "))
            }
        ));
        Ok(emitted)
    }

    /// The relay composes `frame` itself and delivers it to `to`.
    pub fn relay(&mut self, to: Who, frame: &Value) -> Result<Vec<u64>, String> {
        self.relay_text(to, frame.to_string())
    }

    /// The relay delivers `text`, of its own making (not necessarily JSON),
    /// to `to`.
    pub fn relay_text(&mut self, to: Who, text: String) -> Result<Vec<u64>, String> {
        let seq = self.seq;
        self.seq += 1;
        let t = self.tick();
        let kind = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("type").cloned())
            .unwrap_or(Value::Null);
        self.relay_frames.push(json!({
            "seq": seq,
            "t": t,
            "type": kind,
            "frame_json": text,
        }));
        self.texts.insert(seq, text);
        self.deliver(seq, to)
    }

    /// The relay hands `to` the stored frames `seqs` in one
    /// `pending_messages` frame.
    pub fn pending(&mut self, to: Who, seqs: &[u64]) -> Result<Vec<u64>, String> {
        let messages = seqs
            .iter()
            .map(|s| {
                let text = self.texts.get(s).ok_or(format!("no frame {s}"))?;
                serde_json::from_str::<Value>(text).map_err(|e| e.to_string())
            })
            .collect::<Result<Vec<_>, String>>()?;
        self.relay(to, &json!({"v": 1, "type": "pending_messages", "messages": messages}))
    }

    /// The case as a JSON object.
    pub fn finish(self, summary: &str) -> Result<Value, String> {
        for p in &self.parties {
            if let Some(e) = &p.rng.error {
                return Err(format!("{}: {e}", p.name));
            }
        }
        let log = self.log.lock().map_err(|_| "draw log poisoned")?.clone();
        let uuids = self.ids.lock().map_err(|_| "id log poisoned")?.clone();
        let [alice, bob] = self.parties;
        let producer = if self.dialect == KdfDialect::LegacyFfSalt {
            "npm SDK 4.0.0 (no connect proof, legacy registration body, no Authorization header)"
        } else {
            "the TypeScript main branch (connect proof, registration proof, Authorization header)"
        };
        let mut case = json!({
            "name": self.name,
            "notes": format!(
                "meshwire {}: two meshwire Mesh clients, recorded as {producer} records: {summary}. Flow: {}.",
                env!("CARGO_PKG_VERSION"),
                self.flow.join("; ")
            ),
            "relay_url": RELAY_URL,
            "registry_url": REGISTRY_URL,
            "fixed_time": MESH_TIME,
            "uuids": uuids,
            "alice": alice.client,
            "bob": bob.client,
            "random_inputs": log
                .into_iter()
                .map(|(role, label, value)| json!({"role": role, "label": label, "value": value}))
                .collect::<Vec<_>>(),
            "http_requests": self.http,
            "frames": self.frames,
            "relay_frames": self.relay_frames,
            "deliveries": self.deliveries,
            "received": self.received,
            "closes": self.closes,
        });
        if !self.knock_verdicts.is_empty() {
            case["knock_verdicts"] = self.knock_verdicts.into();
        }
        Ok(case)
    }
}

fn other(who: Who) -> Who {
    match who {
        Who::Alice => Who::Bob,
        Who::Bob => Who::Alice,
    }
}

/// The shared recordings' flow (`mesh-alice-bob`), reproduced.
fn alice_bob(dialect: KdfDialect) -> Result<Value, String> {
    use Who::*;
    let mut r = Recorder::new("mesh-alice-bob", dialect, 2, 8)?;
    r.connect(Alice);
    r.connect(Bob);
    let (knock, _) = r.open(Alice)?;
    let m1 = r.send(Alice, r#"{"text":"hello bob"}"#)?;
    let m2 = r.send(Alice, r#"{"n":1,"items":[1,2,3],"unicode":"✓ 🚀"}"#)?;
    let accept = r.deliver(knock, Bob)?;
    r.deliver(m1, Bob)?;
    r.deliver(m2, Bob)?;
    let reply = r.send(Bob, r#"{"reply":"hi alice"}"#)?;
    for s in accept {
        r.deliver(s, Alice)?;
    }
    r.deliver(reply, Alice)?;
    r.finish("the shared recordings' flow, byte for byte")
}

/// Delivers every frame in `seqs` to the other client of its sender.
fn deliver_all(r: &mut Recorder, from: Who, seqs: &[u64]) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for s in seqs {
        out.extend(r.deliver(*s, other(from))?);
    }
    Ok(out)
}

/// A receipts-free conversation in both directions with heartbeats.
fn conversation(dialect: KdfDialect) -> Result<Value, String> {
    use Who::*;
    let mut r = Recorder::new("mesh-conversation", dialect, 2, 3)?;
    r.connect(Alice);
    r.connect(Bob);
    r.heartbeat(Alice);
    let (knock, _) = r.open(Alice)?;
    let a1 = r.send(Alice, r#"{"q":"status?"}"#)?;
    let answers = deliver_all(&mut r, Alice, &[knock, a1])?;
    let b1 = r.send(Bob, r#"{"a":"ok","load":0.25}"#)?;
    let b2 = r.send(Bob, r#"{"a":"more","list":[]}"#)?;
    r.heartbeat(Bob);
    let accept = answers.first().copied().ok_or("no knock_accept")?;
    r.deliver(accept, Alice)?;
    deliver_all(&mut r, Bob, &[b2, b1])?;
    let a2 = r.send(Alice, r#"{"q":"thanks","emoji":"é😀"}"#)?;
    let a3 = r.send(Alice, "{}")?;
    deliver_all(&mut r, Alice, &[a2, a3])?;
    let b3 = r.send(Bob, r#"{"bye":true}"#)?;
    deliver_all(&mut r, Bob, &[b3])?;
    let a4 = r.send(Alice, r#"{"bye":"too"}"#)?;
    deliver_all(&mut r, Alice, &[a4])?;
    r.finish("a conversation without end-to-end receipts: messages both ways, one delivered out of order, heartbeats, four ratchet turns")
}

/// Bob's policy rejects Alice's KNOCK; her message, delivered before it,
/// is dropped with it.
fn knock_rejected(dialect: KdfDialect) -> Result<Value, String> {
    use Who::*;
    let mut r = Recorder::new("mesh-knock-rejected", dialect, 1, 2)?;
    r.reject_all_knocks(Bob);
    r.connect(Alice);
    r.connect(Bob);
    let (knock, _) = r.open(Alice)?;
    let m1 = r.send(Alice, r#"{"text":"let me in"}"#)?;
    r.deliver(m1, Bob)?;
    let reject = r.deliver(knock, Bob)?;
    deliver_all(&mut r, Bob, &reject)?;
    r.finish("Bob's KNOCK handler rejects every KNOCK (knock_policy reject): Alice's message, delivered before her KNOCK, waits in Bob's pre-KNOCK buffer and is dropped with the rejection; knock_reject (reason policy_denied) ends Alice's session")
}

/// A KNOCK rejected by a per-KNOCK verdict, then a second KNOCK accepted.
fn knock_again(dialect: KdfDialect) -> Result<Value, String> {
    use Who::*;
    let mut r = Recorder::new("mesh-knock-verdicts", dialect, 1, 2)?;
    r.connect(Alice);
    r.connect(Bob);
    let (first, id) = r.open(Alice)?;
    r.verdict_on(Bob, &id, "reject")?;
    let reject = r.deliver(first, Bob)?;
    deliver_all(&mut r, Bob, &reject)?;
    let (second, _) = r.open(Alice)?;
    let m1 = r.send(Alice, r#"{"try":2}"#)?;
    let answers = deliver_all(&mut r, Alice, &[second, m1])?;
    let accept = answers.first().copied().ok_or("no knock_accept")?;
    r.deliver(accept, Alice)?;
    let b1 = r.send(Bob, r#"{"welcome":true}"#)?;
    deliver_all(&mut r, Bob, &[b1])?;
    r.finish("Bob rejects Alice's first KNOCK by a verdict on that KNOCK (knock_verdicts) and accepts her second (a new bundle fetch, the next one-time key, a new ephemeral alice/ek-1)")
}

/// Messages delivered before their KNOCK wait, then decrypt once it is
/// accepted.
fn buffered_before_knock(dialect: KdfDialect) -> Result<Value, String> {
    use Who::*;
    let mut r = Recorder::new("mesh-buffered-before-knock", dialect, 1, 2)?;
    r.connect(Alice);
    r.connect(Bob);
    let (knock, _) = r.open(Alice)?;
    let m1 = r.send(Alice, r#"{"seq":1}"#)?;
    let m2 = r.send(Alice, r#"{"seq":2}"#)?;
    let m3 = r.send(Alice, r#"{"seq":3}"#)?;
    r.deliver(m2, Bob)?;
    r.deliver(m1, Bob)?;
    let answers = r.deliver(knock, Bob)?;
    r.deliver(m3, Bob)?;
    let accept = answers.first().copied().ok_or("no knock_accept")?;
    r.deliver(accept, Alice)?;
    let b1 = r.send(Bob, r#"{"got":3}"#)?;
    deliver_all(&mut r, Bob, &[b1])?;
    r.finish("the relay delivers Alice's second and first messages before her KNOCK: Bob buffers them, and on accepting the KNOCK sends knock_accept, then acks and decrypts them in buffer order")
}

/// Bob leaves (disconnect + close); what Alice sends meanwhile reaches him
/// in one `pending_messages` frame after he reconnects.
fn pending_after_reconnect(dialect: KdfDialect) -> Result<Value, String> {
    use Who::*;
    let mut r = Recorder::new("mesh-pending-after-reconnect", dialect, 1, 2)?;
    r.connect(Alice);
    r.connect(Bob);
    let (knock, _) = r.open(Alice)?;
    let m1 = r.send(Alice, r#"{"n":1}"#)?;
    let answers = deliver_all(&mut r, Alice, &[knock, m1])?;
    let accept = answers.first().copied().ok_or("no knock_accept")?;
    r.deliver(accept, Alice)?;
    r.disconnect(Bob)?;
    let m2 = r.send(Alice, r#"{"n":2,"offline":true}"#)?;
    let m3 = r.send(Alice, r#"{"n":3,"offline":true}"#)?;
    r.connect(Bob);
    r.pending(Bob, &[m2, m3])?;
    let b1 = r.send(Bob, r#"{"back":true}"#)?;
    deliver_all(&mut r, Bob, &[b1])?;
    r.disconnect(Alice)?;
    r.finish("Bob disconnects (disconnect frame, WebSocket close 1000 \"client disconnect\"); Alice's next two messages are stored by the relay and handed to Bob in one pending_messages frame after he reconnects (connect + fetch_pending, no new registration); Alice disconnects at the end")
}

/// A disconnect drops messages buffered before their KNOCK; after the
/// reconnect the relay delivers the KNOCK and redelivers the message.
fn disconnect_drops_buffer(dialect: KdfDialect) -> Result<Value, String> {
    use Who::*;
    let mut r = Recorder::new("mesh-disconnect", dialect, 1, 2)?;
    r.connect(Alice);
    r.connect(Bob);
    let (knock, _) = r.open(Alice)?;
    let m1 = r.send(Alice, r#"{"early":true}"#)?;
    r.deliver(m1, Bob)?;
    r.disconnect(Bob)?;
    r.connect(Bob);
    let answers = deliver_all(&mut r, Alice, &[knock, m1])?;
    for s in answers.iter().take(1) {
        r.deliver(*s, Alice)?;
    }
    r.disconnect(Bob)?;
    r.disconnect(Alice)?;
    r.finish("Alice's message reaches Bob before her KNOCK and waits in his pre-KNOCK buffer; Bob disconnects (the buffer is dropped, disconnect frame, close 1000 \"client disconnect\"), reconnects, and the relay delivers the KNOCK and redelivers the message; both disconnect at the end")
}

/// Frames the relay composes itself: `error`, `ack`, `heartbeat` and a
/// type no client knows, all ignored.
fn relay_frames(dialect: KdfDialect) -> Result<Value, String> {
    use Who::*;
    let mut r = Recorder::new("mesh-relay-frames", dialect, 1, 2)?;
    r.connect(Alice);
    r.relay(
        Alice,
        &json!({"type": "error", "detail": "Unknown frame type: fetch_pending"}),
    )?;
    r.connect(Bob);
    let (knock, _) = r.open(Alice)?;
    let m1 = r.send(Alice, r#"{"n":1}"#)?;
    r.relay(
        Alice,
        &json!({"v": 1, "type": "ack", "id": "00000000-0000-4000-8000-000000000002"}),
    )?;
    r.relay(
        Bob,
        &json!({"v": 1, "type": "presence", "from": r.did(Alice), "status": "online"}),
    )?;
    r.relay(Bob, &json!({"v": 1, "type": "heartbeat", "ts": MESH_TIME}))?;
    let answers = deliver_all(&mut r, Alice, &[knock, m1])?;
    r.relay(Bob, &json!({"type": "error", "message": "rate limited"}))?;
    r.relay_text(Bob, "{\"v\":1,\"type\":\"message\",".into())?;
    r.relay(Bob, &json!({"v": 1, "type": "disconnect", "from": r.did(Alice)}))?;
    let accept = answers.first().copied().ok_or("no knock_accept")?;
    r.deliver(accept, Alice)?;
    r.finish("the relay composes frames of its own (relay_frames): an error answering fetch_pending (as the AGT relay does), an ack of Alice's message, a heartbeat, an error with a message field, a type no client knows (presence), a truncated text that is not JSON, and a client frame (disconnect) echoed back; clients send nothing in reply")
}

/// Plaintext peers: messages cross without a session.
fn plaintext(dialect: KdfDialect) -> Result<Value, String> {
    use Who::*;
    let mut r = Recorder::new("mesh-plaintext-peers", dialect, 1, 1)?;
    r.plaintext_peers();
    r.connect(Alice);
    r.connect(Bob);
    let a1 = r.send(Alice, r#"{"legacy":"hello","n":[1,2]}"#)?;
    deliver_all(&mut r, Alice, &[a1])?;
    let b1 = r.send(Bob, r#"{"legacy":"hi"}"#)?;
    deliver_all(&mut r, Bob, &[b1])?;
    r.finish("both clients list each other as plaintext peers: messages go as base64 of the JSON text with plaintext: true, no KNOCK, no session (ASCII payloads: 4.0.0 encodes them with btoa)")
}

/// Every mesh-session case, for `dialect`.
pub fn cases(dialect: KdfDialect) -> Result<Vec<Value>, String> {
    Ok(vec![
        alice_bob(dialect)?,
        conversation(dialect)?,
        knock_rejected(dialect)?,
        knock_again(dialect)?,
        buffered_before_knock(dialect)?,
        pending_after_reconnect(dialect)?,
        disconnect_drops_buffer(dialect)?,
        relay_frames(dialect)?,
        plaintext(dialect)?,
    ])
}
