//! Replay of `mesh-session` recordings: each recorded client is played by a
//! meshwire [`Mesh`] fed that client's recorded randomness, clock and ids,
//! and must emit byte-identical frames and registry request bodies, and
//! decrypt every frame delivered to it to the recorded payload.

use crate::rng::ScriptedRng;
use meshwire_proto::frames::{self, ConnectFrame, FetchPendingFrame};
use meshwire_proto::mesh::{Event, IdSource, Mesh, MeshConfig};
use meshwire_proto::time::Timestamp;
use meshwire_proto::{auth, encoding, registry_wire, Identity, KdfDialect, PreKeyBundle, PreKeys, X25519Secret};
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

type Check = Result<(), String>;

#[derive(Debug, Deserialize)]
pub struct MeshSessionCase {
    pub name: String,
    pub alice: Client,
    pub bob: Client,
    pub fixed_time: String,
    pub random_inputs: Vec<RandomInput>,
    pub http_requests: Vec<HttpRequest>,
    pub frames: Vec<RecordedFrame>,
    pub deliveries: Vec<Delivery>,
    pub received: Vec<Received>,
}

#[derive(Debug, Deserialize)]
pub struct Client {
    pub did: String,
    pub ed25519_seed: String,
    pub spk_id: u32,
    pub spk_private: String,
    #[serde(default)]
    pub spk_signature: Option<String>,
    pub otks: Vec<Otk>,
}

#[derive(Debug, Deserialize)]
pub struct Otk {
    pub key_id: u32,
    pub private: String,
}

#[derive(Debug, Deserialize)]
pub struct RandomInput {
    pub role: String,
    pub value: String,
}

#[derive(Debug, Deserialize)]
pub struct HttpRequest {
    pub t: u64,
    pub client: String,
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub headers: HashMap<String, String>,
    pub body_json: Option<String>,
    pub response_body_json: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RecordedFrame {
    pub seq: u64,
    pub t: u64,
    pub sender: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub frame_json: String,
    pub emitted_while_handling_seq: Option<u64>,
    pub plaintext_json: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Delivery {
    pub t: u64,
    pub frame_seq: u64,
    pub to: String,
}

#[derive(Debug, Deserialize)]
pub struct Received {
    pub receiver: String,
    pub from: String,
    pub payload_json: String,
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

struct Player {
    name: String,
    mesh: Mesh,
    rng: ScriptedRng,
    ids: Arc<Mutex<VecDeque<String>>>,
    bundles: HashMap<String, PreKeyBundle>,
    otk_ids: Vec<u32>,
    received: Vec<(String, String)>,
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

impl Player {
    fn new(name: &str, client: &Client, case: &MeshSessionCase) -> Result<Self, String> {
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
        // Key generation happened before the recording's first frame; the
        // draws left are the session's: ephemeral, ratchet keys, nonces.
        let prefix = format!("{name}/");
        let draws = case
            .random_inputs
            .iter()
            .filter(|r| r.role.starts_with(&prefix))
            .filter(|r| !matches!(&r.role[prefix.len()..], "spk") && !r.role[prefix.len()..].starts_with("otk"))
            .map(|r| encoding::hex_decode(&r.value).map_err(|_| format!("random input {}: not hex", r.role)))
            .collect::<Result<Vec<_>, _>>()?;
        // Ids the client drew: those of the frames it originated, in order.
        let ids: VecDeque<String> = case
            .frames
            .iter()
            .filter(|f| {
                f.sender == name && matches!(f.kind.as_str(), "knock" | "knock_accept" | "knock_reject" | "message")
            })
            .filter_map(|f| {
                serde_json::from_str::<serde_json::Value>(&f.frame_json)
                    .ok()?
                    .get("id")?
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        let ids = Arc::new(Mutex::new(ids));
        let mesh = Mesh::new(
            identity,
            prekeys,
            MeshConfig::default(),
            Box::new(ScriptedIds(ids.clone())),
        );
        Ok(Self {
            name: name.to_owned(),
            mesh,
            rng: ScriptedRng::new(draws),
            ids,
            bundles: HashMap::new(),
            otk_ids: otks.iter().map(|o| o.key_id).collect(),
            received: Vec::new(),
        })
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
    let did_of: HashMap<String, usize> = players
        .iter()
        .enumerate()
        .map(|(i, p)| (p.mesh.identity().did().to_string(), i))
        .collect();
    if legacy {
        for p in &mut players {
            let peers: Vec<String> = did_of.keys().cloned().collect();
            for peer in peers {
                p.mesh.set_peer_dialect(&peer, KdfDialect::LegacyFfSalt);
            }
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
    let by_seq: HashMap<u64, &RecordedFrame> = case.frames.iter().map(|f| (f.seq, f)).collect();
    let mut compared_frames = 0;

    for (_, step) in steps {
        match step {
            Step::Http(h) => {
                let p = &mut players[index(&h.client)?];
                replay_http(p, h, legacy, &case.fixed_time)
                    .map_err(|e| format!("{} {} {}: {e}", h.client, h.method, h.url))?;
            }
            Step::Own(f) => {
                let p = &mut players[index(&f.sender)?];
                let text = own_frame(p, f, legacy, now)
                    .map_err(|e| format!("{} {} frame {}: {e}", f.sender, f.kind, f.seq))?;
                same(
                    &format!("{} {} frame {}", f.sender, f.kind, f.seq),
                    &f.frame_json,
                    &text,
                )?;
                compared_frames += 1;
            }
            Step::Deliver(d) => {
                let delivered = by_seq
                    .get(&d.frame_seq)
                    .ok_or(format!("delivery of unknown frame {}", d.frame_seq))?;
                let p = &mut players[index(&d.to)?];
                let emitted = deliver(p, &delivered.frame_json, now);
                let expected: Vec<&RecordedFrame> = case
                    .frames
                    .iter()
                    .filter(|f| f.sender == d.to && f.emitted_while_handling_seq == Some(d.frame_seq))
                    .collect();
                let what = format!("{} handling frame {}", d.to, d.frame_seq);
                if emitted.len() != expected.len() {
                    return Err(format!(
                        "{what}: emitted {} frames, recorded {}: {emitted:?}",
                        emitted.len(),
                        expected.len()
                    ));
                }
                for (text, recorded) in emitted.iter().zip(expected) {
                    same(
                        &format!("{what}: {} frame {}", recorded.kind, recorded.seq),
                        &recorded.frame_json,
                        text,
                    )?;
                    compared_frames += 1;
                }
            }
        }
    }

    let client_frames = case.frames.len();
    if compared_frames != client_frames {
        return Err(format!("compared {compared_frames} of {client_frames} recorded frames"));
    }
    for p in &players {
        let expected: Vec<(String, String)> = case
            .received
            .iter()
            .filter(|r| r.receiver == p.name)
            .map(|r| (r.from.clone(), r.payload_json.clone()))
            .collect();
        if p.received != expected {
            return Err(format!("{} received {:?}, recorded {:?}", p.name, p.received, expected));
        }
        p.rng.finish().map_err(|e| format!("{} randomness: {e}", p.name))?;
        let left = p.ids.lock().map(|q| q.len()).unwrap_or(0);
        if left != 0 {
            return Err(format!("{}: {left} recorded ids never drawn", p.name));
        }
    }
    Ok(())
}

fn replay_http(p: &mut Player, h: &HttpRequest, legacy: bool, timestamp: &str) -> Check {
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

fn own_frame(p: &mut Player, f: &RecordedFrame, legacy: bool, now: Timestamp) -> Result<String, String> {
    let recorded: serde_json::Value = serde_json::from_str(&f.frame_json).map_err(|e| e.to_string())?;
    let to = recorded
        .get("to")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned();
    let identity = p.mesh.identity();
    match f.kind.as_str() {
        "connect" if legacy => Ok(frames::to_text(&ConnectFrame::legacy(identity.did()))),
        "connect" => Ok(frames::to_text(&ConnectFrame::new(identity, &now.to_iso()))),
        "fetch_pending" => Ok(frames::to_text(&FetchPendingFrame::new(identity))),
        "heartbeat" => Ok(p.mesh.heartbeat_frame(now)),
        "knock" => {
            let bundle = p.bundles.get(&to).ok_or(format!("no bundle fetched for {to}"))?.clone();
            p.mesh
                .open_session(&mut p.rng, now, &to, &bundle)
                .map_err(|e| e.to_string())
        }
        "message" => {
            let payload = f.plaintext_json.as_deref().ok_or("message without plaintext_json")?;
            p.mesh
                .encrypt(&mut p.rng, now, &to, payload.as_bytes())
                .map(|(_, text)| text)
                .map_err(|e| e.to_string())
        }
        other => Err(format!(
            "no replay for a {other} frame sent on the client's own initiative"
        )),
    }
}

/// Delivers a frame; returns what the client sent in response, in order.
fn deliver(p: &mut Player, text: &str, now: Timestamp) -> Vec<String> {
    let mut out = Vec::new();
    let mut queue: VecDeque<Event> = p.mesh.handle_text(&mut p.rng, now, text).into();
    while let Some(event) = queue.pop_front() {
        match event {
            Event::Transmit(text) => out.push(text),
            Event::Message(m) => {
                p.received
                    .push((m.from, String::from_utf8_lossy(&m.payload).into_owned()));
                out.push(m.ack);
            }
            Event::KnockRequest { from, .. } => {
                // The recorded clients accept every KNOCK (no policy registered).
                let verdict = p.mesh.decide_knock(&mut p.rng, now, &from, true);
                for (i, e) in verdict.into_iter().enumerate() {
                    queue.insert(i, e);
                }
            }
            Event::Error(e) => out.push(format!("<error {:?}: {}>", e.kind, e.detail)),
            _ => {}
        }
    }
    out
}
