//! What a text frame on an open relay connection asks for (pure: no I/O).
//!
//! Routed frames (`message`, `knock`, `knock_accept`, `knock_reject`) are
//! forwarded byte for byte when their `from` is the connection's
//! authenticated DID. A frame that claims another `from`, or none, is
//! stamped: the relay writes the authenticated DID into `from` (key order
//! kept) and forwards that, as AGT's relay does on main after 5.0.0, so a
//! recipient can trust `from` without trusting the sender.

use crate::http::clip;
use serde_json::{Map, Value};

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
pub(crate) fn classify(sender: &str, text: &str, max_frame_bytes: usize) -> Incoming {
    if text.len() > max_frame_bytes {
        return Incoming::Error(too_large(text.len(), max_frame_bytes));
    }
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
