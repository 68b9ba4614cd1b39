//! What a text frame on an open relay connection asks for (pure: no I/O).
//!
//! Routed frames (`message`, `knock`, `knock_accept`, `knock_reject`) are
//! forwarded byte for byte when their `from` is the connection's
//! authenticated DID. A frame that claims another `from`, or none, is
//! stamped: the relay writes the authenticated DID into `from` (key order
//! kept) and forwards that, as AGT's relay does on main after 5.0.0, so a
//! recipient can trust `from` without trusting the sender.

use crate::http::clip;
use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::borrow::Cow;

/// Longest unknown frame type echoed in an error frame (characters).
const MAX_ECHOED_TYPE: usize = 64;

/// What a text frame on an open connection asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// Answer with an error frame carrying this detail.
    Error(String),
    /// Forward to `to` (`to` and `id` are non-empty strings); `stamped` is
    /// the frame rewritten with the connection's DID as `from` when the
    /// frame claimed another (forward the original text when `None`).
    Route {
        kind: &'static str,
        to: String,
        id: String,
        stamped: Option<String>,
    },
    /// Acknowledge a stored frame (an `ack` without a string `id` does
    /// nothing).
    Ack(Option<String>),
    /// Liveness only.
    Heartbeat,
    /// Close normally.
    Disconnect,
    /// Send the stored frames not yet sent on this connection.
    FetchPending,
}

/// The error detail of a frame over the size limit.
pub(crate) fn too_large(size: usize, limit: usize) -> String {
    format!("Frame too large ({size} bytes; limit {limit})")
}

/// Reads a text frame of the connection authenticated as `sender`.
///
/// The common case (a string `type`, and for routed frames string `to`,
/// `id` and the sender's own `from`) is read by [`Head`] without building
/// a JSON tree; it checks the whole text exactly as a parse into
/// [`Value`] does (same errors: syntax, nesting depth, number range,
/// string escapes; a repeated key counts with its last value). Anything
/// else (a frame to stamp, a missing or non-string `type`) takes the
/// [`Value`] path.
pub(crate) fn classify(sender: &str, text: &str, max_frame_bytes: usize) -> Incoming {
    if text.len() > max_frame_bytes {
        return Incoming::Error(too_large(text.len(), max_frame_bytes));
    }
    let head = match serde_json::from_str::<Top<'_>>(text) {
        Ok(Top::Object(head)) => head,
        Ok(Top::Other) => return Incoming::Error("Frame must be a JSON object".to_owned()),
        Err(_) => return Incoming::Error("Invalid JSON".to_owned()),
    };
    let Some(kind) = head.kind.as_str() else {
        return classify_value(sender, text);
    };
    let kind = match kind {
        "message" => "message",
        "knock" => "knock",
        "knock_accept" => "knock_accept",
        "knock_reject" => "knock_reject",
        "ack" => return Incoming::Ack(head.id.as_str().map(str::to_owned)),
        "heartbeat" => return Incoming::Heartbeat,
        "disconnect" => return Incoming::Disconnect,
        "fetch_pending" => return Incoming::FetchPending,
        other => return Incoming::Error(format!("Unknown frame type: {}", clip(other, MAX_ECHOED_TYPE))),
    };
    let field = |value: &Field<'_>| value.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let (Some(to), Some(id)) = (field(&head.to), field(&head.id)) else {
        return Incoming::Error("Frame must carry 'to' and 'id'".to_owned());
    };
    if head.from.as_str() != Some(sender) {
        return classify_value(sender, text);
    }
    Incoming::Route {
        kind,
        to,
        id,
        stamped: None,
    }
}

/// [`classify`] through a full [`Value`] tree (frames to stamp, odd types).
fn classify_value(sender: &str, text: &str) -> Incoming {
    let frame = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(frame)) => frame,
        Ok(_) => return Incoming::Error("Frame must be a JSON object".to_owned()),
        Err(_) => return Incoming::Error("Invalid JSON".to_owned()),
    };
    match frame.get("type") {
        Some(Value::String(kind)) => match kind.as_str() {
            "message" => route("message", sender, frame),
            "knock" => route("knock", sender, frame),
            "knock_accept" => route("knock_accept", sender, frame),
            "knock_reject" => route("knock_reject", sender, frame),
            "ack" => Incoming::Ack(frame.get("id").and_then(Value::as_str).map(str::to_owned)),
            "heartbeat" => Incoming::Heartbeat,
            "disconnect" => Incoming::Disconnect,
            "fetch_pending" => Incoming::FetchPending,
            other => Incoming::Error(format!("Unknown frame type: {}", clip(other, MAX_ECHOED_TYPE))),
        },
        // Python formats a missing type as None.
        None | Some(Value::Null) => Incoming::Error("Unknown frame type: None".to_owned()),
        Some(other) => Incoming::Error(format!(
            "Unknown frame type: {}",
            clip(&other.to_string(), MAX_ECHOED_TYPE)
        )),
    }
}

/// A top-level field of interest: absent, a string (borrowed from the
/// frame unless it had escapes), or another JSON value.
#[derive(Debug, Default)]
enum Field<'a> {
    #[default]
    Absent,
    Str(Cow<'a, str>),
    Other,
}

impl Field<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Field::Str(s) => Some(s),
            Field::Absent | Field::Other => None,
        }
    }
}

/// The fields of a frame the relay looks at.
#[derive(Debug, Default)]
struct Head<'a> {
    kind: Field<'a>,
    to: Field<'a>,
    id: Field<'a>,
    from: Field<'a>,
}

/// A whole frame, read for its [`Head`].
enum Top<'a> {
    Object(Head<'a>),
    Other,
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TopVisitor)
    }
}

struct TopVisitor;

impl<'de> Visitor<'de> for TopVisitor {
    type Value = Top<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut head = Head::default();
        while let Some(key) = map.next_key::<Key>()? {
            let slot = match key {
                Key::Type => &mut head.kind,
                Key::To => &mut head.to,
                Key::Id => &mut head.id,
                Key::From => &mut head.from,
                Key::Other => {
                    map.next_value::<Skip>()?;
                    continue;
                }
            };
            // A repeated key counts with its last value, as in a `Value`.
            *slot = map.next_value::<Field<'de>>()?;
        }
        Ok(Top::Object(head))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        SkipVisitor.visit_seq(seq).map(|Skip| Top::Other)
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Top::Other)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Top::Other)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Top::Other)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Top::Other)
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Top::Other)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Top::Other)
    }
}

/// A top-level key.
enum Key {
    Type,
    To,
    Id,
    From,
    Other,
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl Visitor<'_> for KeyVisitor {
    type Value = Key;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(match key {
            "type" => Key::Type,
            "to" => Key::To,
            "id" => Key::Id,
            "from" => Key::From,
            _ => Key::Other,
        })
    }
}

impl<'de> Deserialize<'de> for Field<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FieldVisitor)
    }
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = Field<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Borrowed(s)))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Field::Str(Cow::Owned(s.to_owned())))
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        SkipVisitor.visit_map(map).map(|Skip| Field::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        SkipVisitor.visit_seq(seq).map(|Skip| Field::Other)
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Field::Other)
    }
}

/// Any JSON value, checked as a [`Value`] parse checks it (unlike
/// `serde::de::IgnoredAny`, which lets numbers out of range and lone
/// surrogates through) but not kept.
struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Skip)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Skip)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Skip)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Skip)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Skip)
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Skip)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Skip)
    }
}

/// The metrics label of a classified frame.
pub(crate) fn label(incoming: &Incoming) -> &'static str {
    match incoming {
        Incoming::Error(_) => "invalid",
        Incoming::Route { kind, .. } => kind,
        Incoming::Ack(_) => "ack",
        Incoming::Heartbeat => "heartbeat",
        Incoming::Disconnect => "disconnect",
        Incoming::FetchPending => "fetch_pending",
    }
}

fn route(kind: &'static str, sender: &str, mut frame: Map<String, Value>) -> Incoming {
    let field = |name: &str| {
        frame
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let (Some(to), Some(id)) = (field("to"), field("id")) else {
        return Incoming::Error("Frame must carry 'to' and 'id'".to_owned());
    };
    let stamped = if frame.get("from").and_then(Value::as_str) == Some(sender) {
        None
    } else {
        // serde_json keeps key order (preserve_order): an existing `from`
        // is replaced in place, a missing one is appended.
        frame.insert("from".to_owned(), Value::String(sender.to_owned()));
        match serde_json::to_string(&frame) {
            Ok(text) => Some(text),
            Err(_) => return Incoming::Error("Frame could not be re-encoded".to_owned()),
        }
    };
    Incoming::Route { kind, to, id, stamped }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The borrowed head read classifies every frame as the full `Value`
    /// read does: same routes, same stamping, same error details.
    #[test]
    fn the_head_read_agrees_with_the_value_read() {
        let me = "did:mesh:a";
        let deep = format!(
            "{{\"type\":\"message\",\"from\":\"{me}\",\"to\":\"b\",\"id\":\"1\",\"x\":{}1{}}}",
            "[".repeat(200),
            "]".repeat(200)
        );
        let cases = [
            r#"{"type":"message","from":"did:mesh:a","to":"did:mesh:b","id":"1","ciphertext":"x"}"#.to_owned(),
            r#"{"type":"message","from":"did:mesh:a","to":"did:mesh:b","id":"1","x":1e400}"#.to_owned(),
            r#"{"type":"message","from":"did:mesh:a","to":"did:mesh:b","id":"1","x":"\ud800"}"#.to_owned(),
            r#"{"type":"message","from":"did:mesh:a","to":"did:mesh:b","id":"1","x":{"y":[1,2.5,-3,true,null,"\u00e9"]}}"#.to_owned(),
            r#"{"t\u0079pe":"knock","from":"did:mesh:a","to":"did:mesh:\u0062","id":"1"}"#.to_owned(),
            r#"{"type":"message","type":"knock","from":"did:mesh:a","to":"b","id":"1","id":"2"}"#.to_owned(),
            r#"{"type":"message","from":"did:mesh:a","from":"did:mesh:m","to":"b","id":"1"}"#.to_owned(),
            r#"{"type":"message","from":"did:mesh:m","to":"b","id":"1"}"#.to_owned(),
            r#"{"type":"message","from":7,"to":"b","id":"1"}"#.to_owned(),
            r#"{"type":"message","from":"did:mesh:a","to":"","id":"1"}"#.to_owned(),
            r#"{"type":"message","from":"did:mesh:a","to":"b","id":1}"#.to_owned(),
            r#"{"type":"ack","id":"m1"}"#.to_owned(),
            r#"{"type":"ack","id":5}"#.to_owned(),
            r#"{"type":"heartbeat"}"#.to_owned(),
            r#"{"type":"disconnect"}"#.to_owned(),
            r#"{"type":"fetch_pending"}"#.to_owned(),
            r#"{"type":"nope"}"#.to_owned(),
            r#"{"type":null}"#.to_owned(),
            r#"{"type":[1,{"a":2}]}"#.to_owned(),
            r#"{"x":1}"#.to_owned(),
            r#"[1,2]"#.to_owned(),
            r#""text""#.to_owned(),
            r#"{"type":"message"} x"#.to_owned(),
            r#"{"type":"message","#.to_owned(),
            deep,
        ];
        for case in &cases {
            assert_eq!(classify(me, case, 1 << 20), classify_value(me, case), "{case}");
        }
        assert_eq!(
            classify(me, &cases[1], 1 << 20),
            Incoming::Error("Invalid JSON".to_owned())
        );
        assert!(matches!(
            classify(me, &cases[0], 1 << 20),
            Incoming::Route { stamped: None, .. }
        ));
    }

    #[test]
    fn a_foreign_from_is_stamped_in_place() {
        let text = r#"{"type":"message","from":"did:mesh:mallory","to":"did:mesh:b","id":"1","x":2}"#;
        let Incoming::Route { to, id, stamped, .. } = classify("did:mesh:a", text, 1 << 20) else {
            panic!("not routed");
        };
        assert_eq!((to.as_str(), id.as_str()), ("did:mesh:b", "1"));
        assert_eq!(
            stamped.as_deref(),
            Some(r#"{"type":"message","from":"did:mesh:a","to":"did:mesh:b","id":"1","x":2}"#)
        );
        let own = r#"{"type":"knock","from":"did:mesh:a","to":"did:mesh:b","id":"1"}"#;
        assert!(matches!(
            classify("did:mesh:a", own, 1 << 20),
            Incoming::Route { stamped: None, .. }
        ));
        let missing = r#"{"type":"knock","to":"did:mesh:b","id":"1"}"#;
        let Incoming::Route { stamped, .. } = classify("did:mesh:a", missing, 1 << 20) else {
            panic!("not routed");
        };
        assert_eq!(
            stamped.as_deref(),
            Some(r#"{"type":"knock","to":"did:mesh:b","id":"1","from":"did:mesh:a"}"#)
        );
    }
}
