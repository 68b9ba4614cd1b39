#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! meshwire's own mesh-session cases: the generator reproduces the shared
//! recordings' flow byte for byte, every case replays, and the
//! interpreter rejects every mutation of what a case records (frames,
//! closes, verdicts, relay frames, options) with a message naming it.

use meshwire_proto::KdfDialect;
use meshwire_vectors::mesh_generate;
use meshwire_vectors::{verify_document, CaseOutcome};
use serde_json::{json, Value};
use std::sync::OnceLock;

mod common;
use common::shared_vectors;

fn cases(dialect: KdfDialect) -> Vec<Value> {
    static SPEC: OnceLock<Vec<Value>> = OnceLock::new();
    static LEGACY: OnceLock<Vec<Value>> = OnceLock::new();
    let cell = match dialect {
        KdfDialect::Spec => &SPEC,
        KdfDialect::LegacyFfSalt => &LEGACY,
    };
    cell.get_or_init(|| mesh_generate::cases(dialect).unwrap()).clone()
}

fn case(dialect: KdfDialect, name: &str) -> Value {
    cases(dialect).into_iter().find(|c| c["name"] == name).unwrap()
}

fn outcome_of(dialect: KdfDialect, case: Value) -> CaseOutcome {
    let doc = json!({
        "schema": "agentmesh-golden/1",
        "kind": "mesh-session",
        "kdf": dialect.as_str(),
        "cases": [case],
    });
    let results = verify_document(&doc.to_string(), "test").unwrap();
    results.into_iter().next().unwrap().outcome
}

fn fails_naming(dialect: KdfDialect, name: &str, what: &str, needle: &str, mutate: impl Fn(&mut Value)) {
    let mut c = case(dialect, name);
    mutate(&mut c);
    match outcome_of(dialect, c) {
        CaseOutcome::Failed(why) => assert!(
            why.contains(needle),
            "{dialect} {name}, {what}: failed, but the message does not name {needle:?}: {why}"
        ),
        other => panic!("{dialect} {name}, {what}: not detected: {other:?}"),
    }
}

const DIALECTS: [KdfDialect; 2] = [KdfDialect::Spec, KdfDialect::LegacyFfSalt];

#[test]
fn every_generated_case_replays() {
    for dialect in DIALECTS {
        let all = cases(dialect);
        assert!(all.len() >= 9, "{dialect}: only {} cases", all.len());
        for c in all {
            let name = c["name"].as_str().unwrap().to_owned();
            assert_eq!(outcome_of(dialect, c), CaseOutcome::Passed, "{dialect} {name}");
        }
    }
}

#[test]
fn generated_cases_cover_every_client_action_and_frame_kind() {
    for dialect in DIALECTS {
        let all = cases(dialect);
        let kinds = |list: &str| -> Vec<String> {
            all.iter()
                .flat_map(|c| c[list].as_array().unwrap().clone())
                .map(|f| f["type"].as_str().unwrap_or("untyped").to_owned())
                .collect()
        };
        let sent = kinds("frames");
        for kind in [
            "connect",
            "fetch_pending",
            "heartbeat",
            "knock",
            "message",
            "disconnect",
            "knock_accept",
            "knock_reject",
            "ack",
        ] {
            assert!(sent.iter().any(|k| k == kind), "{dialect}: no client sends {kind}");
        }
        let delivered = kinds("deliveries");
        for kind in [
            "message",
            "knock",
            "knock_accept",
            "knock_reject",
            "pending_messages",
            "error",
            "ack",
            "heartbeat",
            "presence",
            "disconnect",
            "untyped",
        ] {
            assert!(delivered.iter().any(|k| k == kind), "{dialect}: no {kind} delivered");
        }
        let closes: usize = all.iter().map(|c| c["closes"].as_array().unwrap().len()).sum();
        assert!(closes >= 4, "{dialect}: {closes} closes");
        assert!(all.iter().any(|c| c["bob"]["knock_policy"] == "reject"));
        assert!(all.iter().any(|c| c.get("knock_verdicts").is_some()));
        assert!(all.iter().any(|c| c["received"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["is_plaintext"] == true)));
    }
}

/// The generator, run on the shared recordings' flow, writes what the
/// TypeScript clients wrote: every frame, registry request, delivery,
/// message, random draw and id.
#[test]
fn generator_reproduces_the_shared_recordings() {
    let Some(dir) = shared_vectors() else { return };
    for (producer, dialect) in [
        ("ts-main", KdfDialect::Spec),
        ("ts-sdk-4.0.0", KdfDialect::LegacyFfSalt),
    ] {
        let text = std::fs::read_to_string(dir.join(producer).join("mesh-session.json")).unwrap();
        let reference: Value = serde_json::from_str(&text).unwrap();
        let reference = &reference["cases"][0];
        let ours = case(dialect, reference["name"].as_str().unwrap());
        for field in [
            "uuids",
            "random_inputs",
            "fixed_time",
            "relay_url",
            "registry_url",
            "deliveries",
            "received",
        ] {
            assert_eq!(ours[field], reference[field], "{producer}: {field}");
        }
        for party in ["alice", "bob"] {
            for (field, value) in reference[party].as_object().unwrap() {
                assert_eq!(&ours[party][field], value, "{producer}: {party}.{field}");
            }
        }
        let pick = |list: &Value, fields: &[&str]| -> Vec<Vec<Value>> {
            list.as_array()
                .unwrap()
                .iter()
                .map(|item| {
                    fields
                        .iter()
                        .map(|f| item.get(*f).cloned().unwrap_or(Value::Null))
                        .collect()
                })
                .collect()
        };
        let frame_fields = [
            "seq",
            "t",
            "sender",
            "type",
            "frame_json",
            "emitted_while_handling_seq",
            "plaintext_json",
        ];
        assert_eq!(
            pick(&ours["frames"], &frame_fields),
            pick(&reference["frames"], &frame_fields),
            "{producer}: frames"
        );
        let http_fields = [
            "t",
            "client",
            "method",
            "url",
            "headers",
            "body_json",
            "response_status",
            "response_body_json",
        ];
        assert_eq!(
            pick(&ours["http_requests"], &http_fields),
            pick(&reference["http_requests"], &http_fields),
            "{producer}: http_requests"
        );
    }
}

fn frame_index(c: &Value, kind: &str) -> usize {
    c["frames"]
        .as_array()
        .unwrap()
        .iter()
        .position(|f| f["type"] == kind)
        .unwrap()
}

#[test]
fn closes_are_checked() {
    for dialect in DIALECTS {
        let name = "mesh-pending-after-reconnect";
        fails_naming(dialect, name, "close reason", "close", |c| {
            c["closes"][0]["reason"] = "bye".into()
        });
        fails_naming(dialect, name, "close code", "close", |c| {
            c["closes"][0]["code"] = 1001.into()
        });
        fails_naming(dialect, name, "close missing", "no close is recorded", |c| {
            c["closes"].as_array_mut().unwrap().remove(0);
        });
        fails_naming(dialect, name, "close never made", "never made", |c| {
            let mut extra = c["closes"][0].clone();
            extra["t"] = 100_000.into();
            c["closes"].as_array_mut().unwrap().push(extra);
        });
        fails_naming(dialect, name, "close of an unknown client", "carol", |c| {
            c["closes"][0]["client"] = "carol".into()
        });
        fails_naming(dialect, name, "disconnect frame", "disconnect frame", |c| {
            let i = frame_index(c, "disconnect");
            let text = c["frames"][i]["frame_json"].as_str().unwrap().replace("\"v\":1,", "");
            c["frames"][i]["frame_json"] = text.into();
        });
        // Without a `closes` field the producer did not record closes: the
        // frames are still checked, the closes are not.
        let mut c = case(dialect, name);
        c.as_object_mut().unwrap().remove("closes");
        assert_eq!(outcome_of(dialect, c), CaseOutcome::Passed);
    }
}

#[test]
fn knock_verdicts_are_inputs_that_matter() {
    for dialect in DIALECTS {
        fails_naming(dialect, "mesh-knock-rejected", "policy removed", "knock_accept", |c| {
            c["bob"].as_object_mut().unwrap().remove("knock_policy");
        });
        fails_naming(dialect, "mesh-knock-rejected", "policy unknown", "\"maybe\"", |c| {
            c["bob"]["knock_policy"] = "maybe".into()
        });
        fails_naming(dialect, "mesh-knock-verdicts", "verdict flipped", "knock_accept", |c| {
            c["knock_verdicts"][0]["verdict"] = "accept".into()
        });
        fails_naming(dialect, "mesh-knock-verdicts", "verdict unknown", "\"later\"", |c| {
            c["knock_verdicts"][0]["verdict"] = "later".into()
        });
        fails_naming(
            dialect,
            "mesh-knock-verdicts",
            "verdict never used",
            "never asked",
            |c| {
                let mut extra = c["knock_verdicts"][0].clone();
                extra["knock_id"] = "no-such-knock".into();
                c["knock_verdicts"].as_array_mut().unwrap().push(extra);
            },
        );
        fails_naming(dialect, "mesh-knock-rejected", "reject reason", "knock_reject", |c| {
            let i = frame_index(c, "knock_reject");
            let text = c["frames"][i]["frame_json"]
                .as_str()
                .unwrap()
                .replace("policy_denied", "nope");
            c["frames"][i]["frame_json"] = text.into();
        });
    }
}

#[test]
fn deliveries_and_relay_frames_are_checked() {
    for dialect in DIALECTS {
        fails_naming(
            dialect,
            "mesh-pending-after-reconnect",
            "pending message altered",
            "pending_messages frame",
            |c| {
                let text = c["relay_frames"][0]["frame_json"].as_str().unwrap().to_owned();
                // Drop the second stored message from the pending_messages frame.
                let mut frame: Value = serde_json::from_str(&text).unwrap();
                frame["messages"].as_array_mut().unwrap().pop();
                c["relay_frames"][0]["frame_json"] = frame.to_string().into();
            },
        );
        fails_naming(dialect, "mesh-relay-frames", "relay frame seq clash", "seq", |c| {
            c["relay_frames"][0]["seq"] = c["frames"][0]["seq"].clone();
        });
        fails_naming(
            dialect,
            "mesh-relay-frames",
            "unknown delivered seq",
            "unknown frame 9999",
            |c| {
                c["deliveries"][0]["frame_seq"] = 9999.into();
            },
        );
        fails_naming(
            dialect,
            "mesh-buffered-before-knock",
            "drained ack order",
            "ack frame",
            |c| {
                // Swap the two acks sent while draining the pre-KNOCK buffer.
                let acks: Vec<usize> = c["frames"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f["type"] == "ack")
                    .map(|(i, _)| i)
                    .take(2)
                    .collect();
                let a = c["frames"][acks[0]]["frame_json"].clone();
                c["frames"][acks[0]]["frame_json"] = c["frames"][acks[1]]["frame_json"].clone();
                c["frames"][acks[1]]["frame_json"] = a;
            },
        );
        fails_naming(
            dialect,
            "mesh-disconnect",
            "redelivered message not acked",
            "emitted",
            |c| {
                // Attribute the ack to the first delivery (before the disconnect).
                let i = frame_index(c, "ack");
                let seq = c["frames"][i]["emitted_while_handling_seq"].clone();
                let first = c["deliveries"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|d| d["frame_seq"] == seq)
                    .unwrap()["t"]
                    .as_u64()
                    .unwrap();
                c["frames"][i]["t"] = (first + 1).into();
            },
        );
        fails_naming(dialect, "mesh-plaintext-peers", "is_plaintext", "received", |c| {
            c["received"][0]["is_plaintext"] = false.into()
        });
        fails_naming(
            dialect,
            "mesh-plaintext-peers",
            "plaintext peers removed",
            "alice message",
            |c| {
                c["alice"].as_object_mut().unwrap().remove("plaintext_peers");
            },
        );
    }
}

#[test]
fn what_cannot_be_replayed_fails_by_name() {
    for dialect in DIALECTS {
        fails_naming(
            dialect,
            "mesh-alice-bob",
            "knock_accept on its own initiative",
            "knock_accept",
            |c| {
                let i = frame_index(c, "knock_accept");
                c["frames"][i]
                    .as_object_mut()
                    .unwrap()
                    .remove("emitted_while_handling_seq");
            },
        );
        fails_naming(
            dialect,
            "mesh-alice-bob",
            "unknown own frame",
            "no replay for a subscribe frame",
            |c| {
                let i = frame_index(c, "knock");
                c["frames"][i]["type"] = "subscribe".into();
            },
        );
        fails_naming(
            dialect,
            "mesh-disconnect",
            "delivery while disconnected",
            "not connected",
            |c| {
                // Bob's reconnect removed: the KNOCK then reaches a closed socket.
                let frames = c["frames"].as_array_mut().unwrap();
                let second_connect = frames
                    .iter()
                    .enumerate()
                    .filter(|(_, f)| f["sender"] == "bob" && f["type"] == "connect")
                    .map(|(i, _)| i)
                    .nth(1)
                    .unwrap();
                frames[second_connect]["type"] = "connect-removed".into();
                frames[second_connect]["emitted_while_handling_seq"] = 12345.into();
            },
        );
        fails_naming(
            dialect,
            "mesh-pending-after-reconnect",
            "message while disconnected",
            "not connected",
            |c| {
                // Bob's disconnect moved before his first connect.
                let i = frame_index(c, "disconnect");
                c["frames"][i]["t"] = 0.into();
                c["frames"][i]["sender"] = "bob".into();
            },
        );
        fails_naming(dialect, "mesh-alice-bob", "unknown client", "carol", |c| {
            c["deliveries"][0]["to"] = "carol".into()
        });
        fails_naming(dialect, "mesh-alice-bob", "unknown registry call", "DELETE", |c| {
            c["http_requests"][0]["method"] = "DELETE".into()
        });
        fails_naming(dialect, "mesh-alice-bob", "frame never replayed", "never sent", |c| {
            let mut extra = c["frames"][1].clone();
            extra["seq"] = 500.into();
            extra["emitted_while_handling_seq"] = 499.into();
            c["frames"].as_array_mut().unwrap().push(extra);
        });
    }
}

#[test]
fn unknown_fields_do_not_break_replay() {
    for dialect in DIALECTS {
        let mut c = case(dialect, "mesh-conversation");
        c["future_field"] = json!({"anything": [1, 2]});
        c["alice"]["future"] = true.into();
        c["frames"][0]["direction"] = "alice->relay".into();
        c["deliveries"][0]["latency_ms"] = 3.into();
        assert_eq!(outcome_of(dialect, c), CaseOutcome::Passed);
    }
}
