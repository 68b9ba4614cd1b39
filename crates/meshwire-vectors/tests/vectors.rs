#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The golden vectors: every shared reference file passes, meshwire's own
//! cases equal the references' where they overlap, `vectors/` is current,
//! and a mutated vector fails.

use meshwire_vectors::schema::Document;
use meshwire_vectors::{verify_document, verify_path, CaseOutcome};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod common;
use common::shared_vectors;

fn documents() -> Vec<(String, Document)> {
    static DOCS: OnceLock<Vec<(String, Document)>> = OnceLock::new();
    DOCS.get_or_init(|| meshwire_vectors::generate::documents().unwrap())
        .clone()
}

fn repo_vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../vectors")
}

#[test]
fn every_shared_reference_file_passes() {
    let Some(dir) = shared_vectors() else { return };
    let results = verify_path(&dir).unwrap();
    let failed: Vec<String> = results
        .iter()
        .filter(|r| matches!(r.outcome, CaseOutcome::Failed(_)))
        .map(|r| r.to_string())
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    let passed = results.iter().filter(|r| r.outcome == CaseOutcome::Passed).count();
    for producer in ["ts-main", "ts-sdk-4.0.0", "python-5.0.0"] {
        for kind in ["x3dh", "ratchet"] {
            assert!(
                results
                    .iter()
                    .any(|r| r.file.starts_with(producer) && r.kind == kind && r.outcome == CaseOutcome::Passed),
                "no passing {kind} case from {producer}"
            );
        }
    }
    assert!(passed >= 15, "only {passed} cases passed");
}

#[test]
fn own_cases_equal_reference_cases_byte_for_byte() {
    let Some(dir) = shared_vectors() else { return };
    let ours = documents();
    let mut compared = 0;
    for producer in ["ts-main", "ts-sdk-4.0.0", "python-5.0.0"] {
        for entry in std::fs::read_dir(dir.join(producer)).unwrap() {
            let doc: Document = serde_json::from_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap()).unwrap();
            if doc.kind == "mesh-session" {
                continue;
            }
            for reference in &doc.cases {
                let name = reference["name"].as_str().unwrap();
                let mine = ours
                    .iter()
                    .filter(|(_, d)| d.kind == doc.kind && (doc.kind == "identity" || d.kdf == doc.kdf))
                    .flat_map(|(_, d)| &d.cases)
                    .find(|c| c["name"] == name)
                    .unwrap_or_else(|| panic!("meshwire generates no {} case {name}", doc.kind));
                for (field, value) in reference.as_object().unwrap() {
                    if field == "notes" {
                        continue;
                    }
                    assert_eq!(&mine[field], value, "{producer} {} {name}: field {field}", doc.kind);
                }
                compared += 1;
            }
        }
    }
    assert!(compared >= 13, "compared only {compared} cases");
}

#[test]
fn committed_vectors_are_current_and_pass() {
    for (name, doc) in documents() {
        let path = repo_vectors().join(&name);
        let committed: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let mut fresh = serde_json::to_value(&doc).unwrap();
        assert_eq!(
            committed, fresh,
            "{name} is stale: run `meshwire vectors generate vectors`"
        );
        fresh.take();
    }
    let results = verify_path(&repo_vectors()).unwrap();
    assert!(results.iter().all(|r| r.outcome == CaseOutcome::Passed), "{results:#?}");
    assert!(results.len() >= 15);
    for kdf in ["spec", "legacy-ff-salt"] {
        let sessions = results
            .iter()
            .filter(|r| r.kind == "mesh-session" && r.file.ends_with(&format!("mesh-session-{kdf}.json")))
            .count();
        assert!(
            sessions >= 9,
            "only {sessions} mesh-session cases in mesh-session-{kdf}.json"
        );
    }
}

/// Applies `mutate` to a fresh copy of our document `file` and returns the
/// outcome of case `case`.
fn outcome_after(file: &str, case: &str, mutate: impl Fn(&mut Value)) -> CaseOutcome {
    let (_, doc) = documents().into_iter().find(|(n, _)| n == file).unwrap();
    let mut value = serde_json::to_value(&doc).unwrap();
    let target = value["cases"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["name"] == case)
        .unwrap();
    mutate(target);
    let results = verify_document(&value.to_string(), file).unwrap();
    results.into_iter().find(|r| r.name == case).unwrap().outcome
}

fn flip_hex(v: &mut Value) {
    let s = v.as_str().unwrap().to_owned();
    let last = s.chars().last().unwrap();
    let flipped = if last == '0' { '1' } else { '0' };
    *v = Value::String(format!("{}{flipped}", &s[..s.len() - 1]));
}

type Mutation = Box<dyn Fn(&mut Value)>;

#[test]
fn mutated_vectors_fail() {
    let x3dh_fields = [
        "alice_x25519_public",
        "bob_x25519_private",
        "bob_spk_signature",
        "bob_spk_public",
        "bob_otk_public",
        "alice_ephemeral_public",
        "dh1",
        "dh2",
        "dh3",
        "dh4",
        "shared_secret",
        "associated_data",
    ];
    for field in x3dh_fields {
        let outcome = outcome_after("x3dh-spec.json", "x3dh-otk", |c| flip_hex(&mut c[field]));
        assert!(
            matches!(&outcome, CaseOutcome::Failed(why) if why.contains(field)),
            "{field}: {outcome:?}"
        );
    }
    // The legacy dialect's secret differs: a spec-KDF file with legacy values fails.
    let outcome = outcome_after("x3dh-spec.json", "x3dh-otk", |c| {
        c["shared_secret"] = documents()
            .into_iter()
            .find(|(n, _)| n == "x3dh-legacy-ff-salt.json")
            .unwrap()
            .1
            .cases[0]["shared_secret"]
            .clone();
    });
    assert!(matches!(outcome, CaseOutcome::Failed(_)));

    let ratchet_mutations: Vec<(&str, Mutation)> = vec![
        ("ciphertext", Box::new(|c| flip_hex(&mut c["events"][0]["ciphertext"]))),
        // The nonce is an input: a different one changes the ciphertext.
        ("ciphertext", Box::new(|c| flip_hex(&mut c["events"][1]["nonce"]))),
        (
            "message_key",
            Box::new(|c| flip_hex(&mut c["events"][2]["message_key"])),
        ),
        (
            "header_bytes",
            Box::new(|c| flip_hex(&mut c["events"][2]["header_bytes"])),
        ),
        ("plaintext", Box::new(|c| flip_hex(&mut c["events"][3]["plaintext"]))),
        (
            "root_key",
            Box::new(|c| flip_hex(&mut c["events"][3]["state_after"]["root_key"])),
        ),
        (
            "chain_key_recv",
            Box::new(|c| flip_hex(&mut c["events"][7]["state_after"]["chain_key_recv"])),
        ),
        (
            "skipped",
            Box::new(|c| c["events"][4]["state_after"]["skipped"] = serde_json::json!([])),
        ),
        (
            "n_recv",
            Box::new(|c| c["events"][4]["state_after"]["n_recv"] = 9.into()),
        ),
        // A different generated key is an input: the state after the DH step differs.
        (
            "dh_self_public",
            Box::new(|c| flip_hex(&mut c["events"][3]["generated_ratchet_private"][0])),
        ),
        (
            "never drawn",
            Box::new(|c| c["events"][4]["generated_ratchet_private"] = serde_json::json!(["00".repeat(32)])),
        ),
        (
            "initial_state",
            Box::new(|c| flip_hex(&mut c["initial_state"]["alice"]["chain_key_send"])),
        ),
    ];
    for (what, mutate) in &ratchet_mutations {
        let outcome = outcome_after("ratchet-spec.json", "conversation", mutate);
        assert!(
            matches!(&outcome, CaseOutcome::Failed(why) if why.contains(what)),
            "{what}: {outcome:?}"
        );
    }
    let outcome = outcome_after("ratchet-spec.json", "skip-101-rejected", |c| {
        let event = c["events"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .find(|e| e.get("expect_error").is_some())
            .unwrap();
        event["expect_error"] = "bad-tag".into();
    });
    assert!(
        matches!(&outcome, CaseOutcome::Failed(why) if why.contains("too-many-skipped")),
        "{outcome:?}"
    );

    for field in ["did", "authorization", "timestamp_signature", "connect_frame_json"] {
        let outcome = outcome_after("identity.json", "identity-1", |c| {
            let s = c[field].as_str().unwrap().replace('a', "b");
            c[field] = s.into();
        });
        assert!(
            matches!(&outcome, CaseOutcome::Failed(why) if why.contains(field)),
            "{field}: {outcome:?}"
        );
    }
}

#[test]
fn unreadable_files_are_errors_not_panics() {
    for text in [
        "",
        "{",
        "[]",
        r#"{"schema":"other","kind":"x3dh","cases":[]}"#,
        r#"{"schema":"agentmesh-golden/1","kind":"nope","cases":[{}]}"#,
        r#"{"schema":"agentmesh-golden/1","kind":"x3dh","kdf":"rot13","cases":[]}"#,
    ] {
        assert!(verify_document(text, "t").is_err(), "{text}");
    }
    let results = verify_document(
        r#"{"schema":"agentmesh-golden/1","kind":"ratchet","cases":[{"name":"x"}]}"#,
        "t",
    )
    .unwrap();
    assert!(matches!(results[0].outcome, CaseOutcome::Failed(_)));
}

#[test]
fn mutated_mesh_session_recordings_fail() {
    let Some(dir) = shared_vectors() else { return };
    for producer in ["ts-main", "ts-sdk-4.0.0"] {
        let text = std::fs::read_to_string(dir.join(producer).join("mesh-session.json")).unwrap();
        let original: Value = serde_json::from_str(&text).unwrap();
        let outcome = |mutate: &dyn Fn(&mut Value)| {
            let mut doc = original.clone();
            mutate(&mut doc["cases"][0]);
            let results = verify_document(&doc.to_string(), producer).unwrap();
            results[0].outcome.clone()
        };
        assert_eq!(outcome(&|_| {}), CaseOutcome::Passed, "{producer} unmutated");
        let frame_with = |c: &Value, kind: &str| {
            c["frames"]
                .as_array()
                .unwrap()
                .iter()
                .position(|f| f["type"] == kind)
                .unwrap()
        };
        let mutations: Vec<(&str, Mutation)> = vec![
            (
                "message frame",
                Box::new(move |c| {
                    let i = frame_with(c, "message");
                    let s = c["frames"][i]["frame_json"]
                        .as_str()
                        .unwrap()
                        .replacen("\"n\":0", "\"n\":1", 1);
                    c["frames"][i]["frame_json"] = s.into();
                }),
            ),
            (
                "knock frame",
                Box::new(move |c| {
                    let i = frame_with(c, "knock");
                    let s = c["frames"][i]["frame_json"]
                        .as_str()
                        .unwrap()
                        .replace("establish_session", "establish");
                    c["frames"][i]["frame_json"] = s.into();
                }),
            ),
            (
                "knock_accept",
                Box::new(move |c| {
                    let i = frame_with(c, "knock_accept");
                    let s = c["frames"][i]["frame_json"]
                        .as_str()
                        .unwrap()
                        .replace("\"knock_id\"", "\"knockId\"");
                    c["frames"][i]["frame_json"] = s.into();
                }),
            ),
            (
                "connect",
                Box::new(move |c| {
                    let i = frame_with(c, "connect");
                    let s = c["frames"][i]["frame_json"].as_str().unwrap().replace("\"v\":1,", "");
                    c["frames"][i]["frame_json"] = s.into();
                }),
            ),
            (
                "received",
                Box::new(|c| c["received"][0]["payload_json"] = "{\"text\":\"hello bobby\"}".into()),
            ),
            (
                "randomness",
                Box::new(|c| {
                    let r = c["random_inputs"]
                        .as_array_mut()
                        .unwrap()
                        .iter_mut()
                        .find(|r| r["role"] == "alice/nonce-1")
                        .unwrap();
                    r["value"] = "000000000000000000000000".into();
                }),
            ),
            (
                "register body",
                Box::new(|c| {
                    let s = c["http_requests"][0]["body_json"]
                        .as_str()
                        .unwrap()
                        .replace("\"capabilities\":[]", "\"capabilities\":[\"x\"]");
                    c["http_requests"][0]["body_json"] = s.into();
                }),
            ),
        ];
        for (what, mutate) in mutations {
            assert!(
                matches!(outcome(&*mutate), CaseOutcome::Failed(_)),
                "{producer}: mutating {what} was not detected"
            );
        }
    }
}

/// Every identity the reference runtimes produced binds its keys to its DID
/// the way `meshwire_proto::binding` enforces: the DID derives from the
/// Ed25519 key, the X25519 identity key is that key's Montgomery image, and
/// the X25519 key alone finds the DID through one of its Edwards preimages.
#[test]
fn every_reference_identity_is_bound_to_its_did() {
    use meshwire_proto::binding::{check_identity_keys, check_x25519_identity};
    use meshwire_proto::{Did, Ed25519PublicKey, X25519PublicKey};

    fn key(v: &Value) -> Option<[u8; 32]> {
        hex::decode(v.as_str()?).ok()?.try_into().ok()
    }
    /// Where it was found, the Ed25519 and X25519 keys, and the DID if given.
    type Found = (String, [u8; 32], [u8; 32], Option<String>);
    fn walk(v: &Value, found: &mut Vec<Found>, at: &str) {
        match v {
            Value::Object(map) => {
                for prefix in ["", "alice_", "bob_"] {
                    let ed = map.get(&format!("{prefix}ed25519_public")).and_then(key);
                    let x = map.get(&format!("{prefix}x25519_public")).and_then(key);
                    if let (Some(ed), Some(x)) = (ed, x) {
                        let did = map
                            .get(&format!("{prefix}did"))
                            .and_then(Value::as_str)
                            .map(str::to_owned);
                        found.push((format!("{at}/{prefix}"), ed, x, did));
                    }
                }
                for (k, child) in map {
                    walk(child, found, &format!("{at}/{k}"));
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    walk(child, found, &format!("{at}[{i}]"));
                }
            }
            _ => {}
        }
    }

    let Some(dir) = shared_vectors() else { return };
    let mut found = Vec::new();
    let mut producers = std::collections::BTreeSet::new();
    for producer in std::fs::read_dir(&dir).unwrap() {
        let producer = producer.unwrap().path();
        if !producer.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(&producer).unwrap() {
            let file = file.unwrap().path();
            if file.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let before = found.len();
            let value: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            walk(&value, &mut found, &file.display().to_string());
            if found.len() > before {
                producers.insert(producer.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
    }
    assert_eq!(
        producers.into_iter().collect::<Vec<_>>(),
        ["python-5.0.0", "ts-main", "ts-sdk-4.0.0"],
        "identities from every producer"
    );
    assert!(found.len() >= 20, "only {} identities found", found.len());
    for (at, ed, x, did) in &found {
        let ed = Ed25519PublicKey::from_bytes(*ed);
        let x = X25519PublicKey::from_bytes(*x);
        let derived = Did::from_public_key(&ed);
        if let Some(did) = did {
            assert_eq!(did, derived.as_str(), "{at}: DID is not sha256-derived");
        }
        check_identity_keys(&derived, &ed, &x).unwrap_or_else(|e| panic!("{at}: {e}"));
        assert_eq!(check_x25519_identity(&derived, &x).unwrap(), ed, "{at}");
    }
}
