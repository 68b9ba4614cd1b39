//! Replays vector files against meshwire and compares every recorded output.

use crate::rng::ScriptedRng;
use crate::schema::{Document, Event, IdentityCase, RatchetCase, StateSnapshot, X3dhCase, SCHEMA};
use meshwire_proto::frames::{self, ConnectFrame, FetchPendingFrame};
use meshwire_proto::ratchet::message_key_of;
use meshwire_proto::{
    auth, encoding, x3dh, DecryptError, DoubleRatchet, EncryptedMessage, Header, Identity, KdfDialect, KeyPair,
    PreKeys, SharedSecret, X25519PublicKey, X25519Secret,
};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// A file could not be read as the schema. Problems inside one case are
/// not errors: they are reported as [`CaseOutcome::Failed`].
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file or directory could not be listed, inspected or read.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file is not an `agentmesh-golden/1` document: not JSON of the
    /// document's shape, another `schema`, an unknown `kdf` or `kind`.
    #[error("{path}: not an {SCHEMA} file: {reason}")]
    Schema {
        /// The file's label (see [`verify_document`]).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The verdict on one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseOutcome {
    /// Every recorded output was reproduced.
    Passed,
    /// The case does not match its kind's shape, or an output differs;
    /// the message names the field, with expected and actual values.
    Failed(String),
    /// The case was not checked; the message says why. (The interpreter
    /// itself never skips today; the variant is for callers' reports.)
    Skipped(String),
}

/// The outcome of one case of one file. `Display` prints one line:
/// `PASS|FAIL|SKIP <file> <kind> <name>[: <why>]`.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The file's label: `<parent folder>/<file name>` from [`verify_path`],
    /// or the label given to [`verify_document`].
    pub file: String,
    /// The document's `kind` (`x3dh`, `ratchet`, `identity`, `mesh-session`).
    pub kind: String,
    /// The case's `name`, or `#<index>` when it has none.
    pub name: String,
    /// The verdict.
    pub outcome: CaseOutcome,
}

impl fmt::Display for CaseResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.outcome {
            CaseOutcome::Passed => write!(f, "PASS {} {} {}", self.file, self.kind, self.name),
            CaseOutcome::Failed(why) => {
                write!(f, "FAIL {} {} {}: {why}", self.file, self.kind, self.name)
            }
            CaseOutcome::Skipped(why) => {
                write!(f, "SKIP {} {} {}: {why}", self.file, self.kind, self.name)
            }
        }
    }
}

type Check = Result<(), String>;

fn unhex(field: &str, text: &str) -> Result<Vec<u8>, String> {
    encoding::hex_decode(text).map_err(|_| format!("{field}: recorded value is not hex"))
}

fn unhex32(field: &str, text: &str) -> Result<[u8; 32], String> {
    unhex(field, text)?
        .try_into()
        .map_err(|_| format!("{field}: recorded value is not 32 bytes"))
}

fn same(field: &str, expected_hex: &str, actual: &[u8]) -> Check {
    let expected = unhex(field, expected_hex)?;
    if expected == actual {
        Ok(())
    } else {
        Err(format!(
            "{field}: expected {}, got {}",
            hex::encode(&expected),
            hex::encode(actual)
        ))
    }
}

fn same_text(field: &str, expected: &str, actual: &str) -> Check {
    if expected == actual {
        Ok(())
    } else {
        Err(format!("{field}: expected {expected:?}, got {actual:?}"))
    }
}

fn dialect_of(doc: &Document) -> Result<KdfDialect, String> {
    doc.kdf
        .as_deref()
        .unwrap_or("spec")
        .parse::<KdfDialect>()
        .map_err(|e| e.to_string())
}

/// Verifies every vector file at `path` (a file, or a directory searched
/// recursively for `*.json`, in sorted path order) and returns one result
/// per case.
///
/// # Errors
///
/// [`VerifyError::Io`] when `path` or a file under it cannot be read, and
/// [`VerifyError::Schema`] when a file is not a schema document (see
/// [`verify_document`]); the first such file stops the run.
pub fn verify_path(path: &Path) -> Result<Vec<CaseResult>, VerifyError> {
    let mut files = Vec::new();
    collect_json(path, &mut files)?;
    let mut results = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|source| VerifyError::Io {
            path: file.clone(),
            source,
        })?;
        results.extend(verify_document(&text, &display_name(&file))?);
    }
    Ok(results)
}

fn display_name(file: &Path) -> String {
    let parent = file
        .parent()
        .and_then(|p| p.file_name())
        .map(|p| p.to_string_lossy().into_owned());
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match parent {
        Some(parent) => format!("{parent}/{name}"),
        None => name,
    }
}

fn collect_json(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), VerifyError> {
    let io = |source| VerifyError::Io {
        path: path.to_owned(),
        source,
    };
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for entry in entries {
            if entry.is_dir() || entry.extension().is_some_and(|e| e == "json") {
                collect_json(&entry, out)?;
            }
        }
        Ok(())
    } else {
        std::fs::metadata(path).map_err(io)?;
        out.push(path.to_owned());
        Ok(())
    }
}

/// Verifies one vector document given as JSON text and returns one result
/// per case, in file order; `label` names the document in the results and
/// errors.
///
/// # Errors
///
/// [`VerifyError::Schema`] when `text` is not a document of the schema's
/// shape, its `schema` is not [`SCHEMA`], or its `kdf` or `kind` is unknown.
pub fn verify_document(text: &str, label: &str) -> Result<Vec<CaseResult>, VerifyError> {
    let schema_error = |reason: String| VerifyError::Schema {
        path: label.to_owned(),
        reason,
    };
    let doc: Document = serde_json::from_str(text).map_err(|e| schema_error(e.to_string()))?;
    if doc.schema != SCHEMA {
        return Err(schema_error(format!("schema is {:?}", doc.schema)));
    }
    let dialect = dialect_of(&doc).map_err(schema_error)?;
    let mut results = Vec::new();
    for (index, raw) in doc.cases.iter().enumerate() {
        let name = raw
            .get("name")
            .and_then(|n| n.as_str())
            .map_or_else(|| format!("#{index}"), str::to_owned);
        let outcome = match doc.kind.as_str() {
            "x3dh" => run(raw, |c: X3dhCase| verify_x3dh(&c, dialect)),
            "ratchet" => run(raw, |c: RatchetCase| verify_ratchet(&c)),
            "identity" => run(raw, |c: IdentityCase| verify_identity(&c)),
            "mesh-session" => run(raw, |c: crate::mesh_session::MeshSessionCase| {
                crate::mesh_session::verify_mesh_session(&c, dialect)
            }),
            other => return Err(schema_error(format!("unknown kind {other:?}"))),
        };
        results.push(CaseResult {
            file: label.to_owned(),
            kind: doc.kind.clone(),
            name,
            outcome,
        });
    }
    Ok(results)
}

fn run<T: serde::de::DeserializeOwned>(raw: &serde_json::Value, verify: impl FnOnce(T) -> Check) -> CaseOutcome {
    match serde_json::from_value::<T>(raw.clone()) {
        Err(e) => CaseOutcome::Failed(format!("case does not match the schema: {e}")),
        Ok(case) => match verify(case) {
            Ok(()) => CaseOutcome::Passed,
            Err(why) => CaseOutcome::Failed(why),
        },
    }
}

fn identity_checked(
    prefix: &str,
    seed: &str,
    ed_public: &str,
    x_private: &str,
    x_public: &str,
) -> Result<Identity, String> {
    let identity = Identity::from_seed(&unhex32(&format!("{prefix}_ed25519_seed"), seed)?);
    same(
        &format!("{prefix}_ed25519_public"),
        ed_public,
        identity.ed25519_public().as_bytes(),
    )?;
    same(
        &format!("{prefix}_x25519_private"),
        x_private,
        identity.x25519_secret().as_bytes(),
    )?;
    same(
        &format!("{prefix}_x25519_public"),
        x_public,
        identity.x25519_public().as_bytes(),
    )?;
    Ok(identity)
}

fn verify_x3dh(case: &X3dhCase, dialect: KdfDialect) -> Check {
    let alice = identity_checked(
        "alice",
        &case.alice_ed25519_seed,
        &case.alice_ed25519_public,
        &case.alice_x25519_private,
        &case.alice_x25519_public,
    )?;
    let bob = identity_checked(
        "bob",
        &case.bob_ed25519_seed,
        &case.bob_ed25519_public,
        &case.bob_x25519_private,
        &case.bob_x25519_public,
    )?;
    let spk = X25519Secret::from_bytes(unhex32("bob_spk_private", &case.bob_spk_private)?);
    let mut prekeys = PreKeys::with_signed_pre_key(&bob, case.bob_spk_id, spk);
    same(
        "bob_spk_public",
        &case.bob_spk_public,
        prekeys.signed_pre_key().pair.public().as_bytes(),
    )?;
    same(
        "bob_spk_signature",
        &case.bob_spk_signature,
        &prekeys.signed_pre_key().signature,
    )?;
    match (case.bob_otk_id, &case.bob_otk_private, &case.bob_otk_public) {
        (Some(id), Some(private), Some(public)) => {
            let secret = X25519Secret::from_bytes(unhex32("bob_otk_private", private)?);
            prekeys
                .add_one_time_key(id, secret)
                .map_err(|e| format!("bob_otk_id: {e}"))?;
            let pair = prekeys.one_time_key(id).ok_or("one-time key not stored")?;
            same("bob_otk_public", public, pair.public().as_bytes())?;
        }
        (None, None | Some(_), None) => {}
        _ => return Err("bob_otk_id, bob_otk_private and bob_otk_public must be all set or all null".into()),
    }
    let bundle = prekeys.bundle(&bob, case.bob_otk_id);

    let mut rng = ScriptedRng::new([unhex("alice_ephemeral_private", &case.alice_ephemeral_private)?]);
    let (initiator, initiation) =
        x3dh::initiate(&mut rng, &alice, &bundle, dialect).map_err(|e| format!("initiate: {e}"))?;
    rng.finish().map_err(|e| format!("initiate randomness: {e}"))?;
    same(
        "alice_ephemeral_public",
        &case.alice_ephemeral_public,
        initiation.ephemeral_key.as_bytes(),
    )?;
    let expected_dhs: Vec<(&str, &str)> = [
        ("dh1", Some(&case.dh1)),
        ("dh2", Some(&case.dh2)),
        ("dh3", Some(&case.dh3)),
        ("dh4", case.dh4.as_ref()),
    ]
    .into_iter()
    .filter_map(|(n, v)| v.map(|v| (n, v.as_str())))
    .collect();
    if expected_dhs.len() != initiator.dh_outputs.len() {
        return Err(format!(
            "{} DH outputs recorded, {} computed",
            expected_dhs.len(),
            initiator.dh_outputs.len()
        ));
    }
    for ((field, expected), actual) in expected_dhs.iter().zip(&initiator.dh_outputs) {
        same(field, expected, actual.as_bytes())?;
    }
    same("shared_secret", &case.shared_secret, initiator.shared_secret.as_bytes())?;
    same("associated_data", &case.associated_data, &initiator.associated_data)?;

    let responder = x3dh::respond(&bob, &prekeys, &initiation, dialect).map_err(|e| format!("respond: {e}"))?;
    same(
        "shared_secret (responder)",
        &case.shared_secret,
        responder.shared_secret.as_bytes(),
    )?;
    same(
        "associated_data (responder)",
        &case.associated_data,
        &responder.associated_data,
    )?;
    for ((field, expected), actual) in expected_dhs.iter().zip(&responder.dh_outputs) {
        same(&format!("{field} (responder)"), expected, actual.as_bytes())?;
    }
    Ok(())
}

/// The schema's view of a ratchet: its keys as lowercase hex, counters and
/// skipped-key cache, in the shape of `state_after`.
pub fn snapshot(r: &DoubleRatchet) -> StateSnapshot {
    StateSnapshot {
        root_key: hex::encode(r.root_key().as_bytes()),
        chain_key_send: r.sending_chain_key().map(|k| hex::encode(k.as_bytes())),
        chain_key_recv: r.receiving_chain_key().map(|k| hex::encode(k.as_bytes())),
        dh_self_public: r.dh_self_public().to_hex(),
        dh_remote_public: r.dh_remote_public().map(|k| k.to_hex()),
        n_send: r.send_count(),
        n_recv: r.recv_count(),
        pn: r.previous_send_count(),
        skipped: r
            .skipped_key_ids()
            .map(|(dh, n)| format!("{}:{n}", dh.to_hex()))
            .collect(),
    }
}

fn same_state(what: &str, expected: &StateSnapshot, actual: &StateSnapshot) -> Check {
    let lower = |s: &StateSnapshot| {
        let mut s = s.clone();
        s.root_key.make_ascii_lowercase();
        s.chain_key_send.iter_mut().for_each(|k| k.make_ascii_lowercase());
        s.chain_key_recv.iter_mut().for_each(|k| k.make_ascii_lowercase());
        s.dh_self_public.make_ascii_lowercase();
        s.dh_remote_public.iter_mut().for_each(|k| k.make_ascii_lowercase());
        s.skipped.iter_mut().for_each(|k| k.make_ascii_lowercase());
        s
    };
    let (expected, actual) = (lower(expected), lower(actual));
    if expected == actual {
        return Ok(());
    }
    let e = serde_json::to_value(&expected).unwrap_or_default();
    let a = serde_json::to_value(&actual).unwrap_or_default();
    let mut diffs = Vec::new();
    if let (Some(e), Some(a)) = (e.as_object(), a.as_object()) {
        for (key, ev) in e {
            if a.get(key) != Some(ev) {
                diffs.push(format!(
                    "{key} expected {ev}, got {}",
                    a.get(key).cloned().unwrap_or_default()
                ));
            }
        }
    }
    Err(format!("{what}: {}", diffs.join("; ")))
}

/// The `expect_error` name meshwire's own files use for a decrypt error
/// (e.g. `"too-many-skipped"`, `"bad-tag"`, `"duplicate"`).
pub fn error_kind(e: &DecryptError) -> &'static str {
    match e {
        DecryptError::CiphertextTooShort(_) => "ciphertext-too-short",
        DecryptError::AuthenticationFailed => "bad-tag",
        DecryptError::DuplicateOrExpired { .. } => "duplicate",
        DecryptError::TooManySkipped { .. } => "too-many-skipped",
        DecryptError::NoReceivingChain => "no-receiving-chain",
        DecryptError::NonContributory => "non-contributory",
        DecryptError::CounterOverflow => "counter-overflow",
    }
}

fn verify_ratchet(case: &RatchetCase) -> Check {
    let shared = SharedSecret::from_bytes(unhex32("shared_secret", &case.shared_secret)?);
    let spk = KeyPair::from_secret(X25519Secret::from_bytes(unhex32(
        "bob_spk_private",
        &case.bob_spk_private,
    )?));
    same("bob_spk_public", &case.bob_spk_public, spk.public().as_bytes())?;
    let ad = unhex("associated_data", &case.associated_data)?;
    if let (Some(alice), Some(bob)) = (&case.alice_did, &case.bob_did) {
        let prefix = format!("{alice}|{bob}");
        if !ad.starts_with(prefix.as_bytes()) || ad.len() != prefix.len() + 64 {
            return Err("associated_data is not utf8(alice_did|bob_did) || IK_a || IK_b".into());
        }
    }

    let mut rng = ScriptedRng::new([unhex("alice_ratchet_0_private", &case.alice_ratchet_0_private)?]);
    let mut alice =
        DoubleRatchet::init_sender(&mut rng, &shared, spk.public()).map_err(|e| format!("init_sender: {e}"))?;
    rng.finish().map_err(|e| format!("init_sender randomness: {e}"))?;
    if let Some(public) = &case.alice_ratchet_0_public {
        same("alice_ratchet_0_public", public, alice.dh_self_public().as_bytes())?;
    }
    let mut bob = DoubleRatchet::init_receiver(&shared, spk);
    if let Some(initial) = &case.initial_state {
        same_state("initial_state.alice", &initial.alice, &snapshot(&alice))?;
        same_state("initial_state.bob", &initial.bob, &snapshot(&bob))?;
    }

    let mut sent: HashMap<usize, EncryptedMessage> = HashMap::new();
    for event in &case.events {
        let party = match event.party.as_str() {
            "alice" => &mut alice,
            "bob" => &mut bob,
            other => return Err(format!("event {}: unknown party {other:?}", event.i)),
        };
        apply_event(event, party, &ad, &mut sent)
            .map_err(|e| format!("event {} ({} by {}): {e}", event.i, event.op, event.party))?;
    }
    Ok(())
}

fn apply_event(
    event: &Event,
    party: &mut DoubleRatchet,
    ad: &[u8],
    sent: &mut HashMap<usize, EncryptedMessage>,
) -> Check {
    let generated: Vec<Vec<u8>> = event
        .generated_ratchet_private
        .iter()
        .map(|k| unhex32("generated_ratchet_private", k).map(|k| k.to_vec()))
        .collect::<Result<_, _>>()?;
    match event.op.as_str() {
        "encrypt" => {
            let plaintext = unhex("plaintext", event.plaintext.as_deref().ok_or("plaintext missing")?)?;
            let nonce = unhex("nonce", event.nonce.as_deref().ok_or("nonce missing")?)?;
            let key_before = party.sending_chain_key().map(message_key_of);
            let mut rng = ScriptedRng::new(std::iter::once(nonce).chain(generated));
            let message = party
                .encrypt(&mut rng, &plaintext, ad)
                .map_err(|e| format!("encrypt: {e}"))?;
            rng.finish()?;
            if let Some(expected) = &event.message_key {
                same(
                    "message_key",
                    expected,
                    key_before.as_ref().map(|k| k.as_bytes().as_slice()).unwrap_or_default(),
                )?;
            }
            if let Some(header) = &event.header {
                same("header.dh", &header.dh, message.header.dh.as_bytes())?;
                same_text("header.pn", &header.pn.to_string(), &message.header.pn.to_string())?;
                same_text("header.n", &header.n.to_string(), &message.header.n.to_string())?;
            }
            if let Some(expected) = &event.header_bytes {
                same("header_bytes", expected, &message.header.to_bytes())?;
            }
            same(
                "ciphertext",
                event.ciphertext.as_deref().ok_or("ciphertext missing")?,
                &message.ciphertext,
            )?;
            sent.insert(event.i, message);
        }
        "decrypt" => {
            let message = incoming(event, sent)?;
            let mut rng = ScriptedRng::new(generated);
            let before = party.clone();
            match (party.decrypt(&mut rng, &message, ad), &event.expect_error) {
                (Ok(plaintext), None) => {
                    same(
                        "plaintext",
                        event.plaintext.as_deref().ok_or("plaintext missing")?,
                        &plaintext,
                    )?;
                }
                (Ok(_), Some(kind)) => return Err(format!("decrypted, but {kind} was expected")),
                (Err(e), Some(kind)) => {
                    same_text("error", kind, error_kind(&e))?;
                    if *party != before {
                        return Err(format!("state changed after a failed decrypt ({e})"));
                    }
                }
                (Err(e), None) => return Err(format!("decrypt: {e}")),
            }
            rng.finish()?;
        }
        other => return Err(format!("unknown op {other:?}")),
    }
    if let Some(expected) = &event.state_after {
        same_state("state_after", expected, &snapshot(party))?;
    }
    Ok(())
}

/// The message a decrypt event consumes: the referenced encrypt event's
/// output, with any header or ciphertext the event itself records instead.
fn incoming(event: &Event, sent: &HashMap<usize, EncryptedMessage>) -> Result<EncryptedMessage, String> {
    let base = event.message.and_then(|i| sent.get(&i)).cloned();
    let header = match (&event.header, &base) {
        (Some(h), _) => Header {
            dh: X25519PublicKey::from_bytes(unhex32("header.dh", &h.dh)?),
            pn: h.pn,
            n: h.n,
        },
        (None, Some(m)) => m.header,
        (None, None) => return Err(format!("message {:?} was never encrypted", event.message)),
    };
    let ciphertext = match (&event.ciphertext, base) {
        (Some(c), _) => unhex("ciphertext", c)?,
        (None, Some(m)) => m.ciphertext,
        (None, None) => return Err("no ciphertext".into()),
    };
    Ok(EncryptedMessage { header, ciphertext })
}

fn verify_identity(case: &IdentityCase) -> Check {
    let identity = identity_checked(
        "",
        &case.ed25519_seed,
        &case.ed25519_public,
        &case.x25519_private,
        &case.x25519_public,
    )
    .map_err(|e| e.trim_start_matches('_').to_owned())?;
    same_text("did", &case.did, identity.did().as_str())?;
    same(
        "timestamp_signature",
        &case.timestamp_signature,
        &identity.sign(case.timestamp.as_bytes()),
    )?;
    same_text(
        "authorization",
        &case.authorization,
        &auth::ed25519_timestamp_header(&identity, &case.timestamp),
    )?;
    let connect = ConnectFrame::new(&identity, &case.relay_connect.timestamp);
    let rc = &case.relay_connect;
    same_text("relay_connect.type", &rc.kind, connect.kind)?;
    same_text("relay_connect.from", &rc.from, &connect.from)?;
    same_text(
        "relay_connect.public_key",
        &rc.public_key,
        connect.public_key.as_deref().unwrap_or_default(),
    )?;
    same_text(
        "relay_connect.timestamp",
        &rc.timestamp,
        connect.timestamp.as_deref().unwrap_or_default(),
    )?;
    same_text(
        "relay_connect.signature",
        &rc.signature,
        connect.signature.as_deref().unwrap_or_default(),
    )?;
    if let Some(expected) = &case.connect_frame_json {
        same_text("connect_frame_json", expected, &frames::to_text(&connect))?;
    }
    if let Some(expected) = &case.fetch_pending_frame_json {
        same_text(
            "fetch_pending_frame_json",
            expected,
            &frames::to_text(&FetchPendingFrame::new(&identity)),
        )?;
    }
    Ok(())
}
