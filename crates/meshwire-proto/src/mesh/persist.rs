//! A [`Mesh`]'s sessions, pre-keys and delivery bookkeeping as JSON
//! (`meshwire-mesh/1`).
//!
//! Secrets never pass through an untyped `serde_json::Value`: export writes
//! each part into one buffer sized in advance (zeroized on drop), and import
//! reads typed structs that borrow the secret parts from the caller's text
//! and zeroize what they own.

use super::{IdSource, Mesh, MeshConfig, Peer, Unconfirmed};
use crate::channel::SecureChannel;
use crate::encoding::hex_decode_array;
use crate::identity::Identity;
use crate::keys::X25519PublicKey;
use crate::prekeys::PreKeys;
use crate::StateError;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::collections::HashMap;
use zeroize::Zeroizing;

const FORMAT: &str = "meshwire-mesh/1";

/// One peer's bookkeeping, without its channel.
#[derive(Serialize)]
struct PeerOut<'a> {
    accepted_eks: Vec<String>,
    dialect: Option<&'static str>,
    receipts: bool,
    verified_encrypted: bool,
    seen: &'a std::collections::VecDeque<String>,
    unconfirmed: &'a [Unconfirmed],
}

#[derive(Deserialize)]
struct StateIn<'a> {
    format: String,
    #[serde(borrow)]
    prekeys: &'a RawValue,
    #[serde(borrow)]
    peers: HashMap<String, PeerIn<'a>>,
}

#[derive(Deserialize)]
struct PeerIn<'a> {
    #[serde(borrow, default)]
    channel: Option<&'a RawValue>,
    #[serde(default)]
    accepted_eks: Vec<String>,
    #[serde(default)]
    dialect: Option<String>,
    #[serde(default)]
    receipts: bool,
    #[serde(default)]
    verified_encrypted: bool,
    #[serde(default)]
    seen: Vec<String>,
    #[serde(default)]
    unconfirmed: Vec<Unconfirmed>,
}

fn json_string(text: &str) -> String {
    // A string always serializes.
    serde_json::to_string(text).unwrap_or_default()
}

/// Concatenates `parts` into one buffer of the exact size.
fn join(parts: &[Zeroizing<String>]) -> Zeroizing<String> {
    let len = parts.iter().map(|p| p.len()).sum();
    let mut out = Zeroizing::new(String::with_capacity(len));
    for part in parts {
        out.push_str(part);
    }
    out
}

/// One peer's JSON object: `{"channel": ..., bookkeeping...}`.
fn peer_json(p: &Peer) -> Zeroizing<String> {
    let channel = match &p.channel {
        Some(c) => c.export_state(),
        None => Zeroizing::new("null".to_owned()),
    };
    let rest = crate::state::to_json_text(&PeerOut {
        accepted_eks: p.accepted_eks.iter().map(|k| k.to_hex()).collect(),
        dialect: p.dialect.map(|d| d.as_str()),
        receipts: p.receipts,
        verified_encrypted: p.verified_encrypted,
        seen: &p.seen,
        unconfirmed: &p.unconfirmed,
    });
    // `rest` is `{...}`: splice its fields after the channel.
    join(&[
        Zeroizing::new("{\"channel\":".to_owned()),
        channel,
        Zeroizing::new(",".to_owned()),
        Zeroizing::new(rest.get(1..).map(str::to_owned).unwrap_or_else(|| "}".to_owned())),
    ])
}

/// Rebuilds a peer from its JSON object; `None` when it holds nothing.
fn peer_from(did: &str, v: PeerIn<'_>, seen_limit: usize) -> Result<Option<Peer>, StateError> {
    let bad = |what: &'static str| StateError::Json(format!("peer {did:?}: {what}"));
    let mut p = Peer::default();
    if let Some(channel) = v.channel {
        p.channel = Some(SecureChannel::import_state(channel.get())?);
    }
    for ek in &v.accepted_eks {
        let bytes = hex_decode_array::<32>(ek).map_err(|_| bad("accepted_eks"))?;
        p.accepted(X25519PublicKey::from_bytes(bytes));
    }
    if let Some(d) = &v.dialect {
        p.dialect = Some(d.parse().map_err(|_| bad("dialect"))?);
    }
    p.receipts = v.receipts;
    p.verified_encrypted = v.verified_encrypted;
    for id in &v.seen {
        p.remember(id, seen_limit);
    }
    p.unconfirmed = v.unconfirmed;
    Ok((!p.persists_nothing()).then_some(p))
}

impl Mesh {
    /// Sessions, pre-keys and delivery bookkeeping as JSON (contains
    /// secrets; the text zeroizes on drop). Peers that hold nothing are
    /// left out.
    pub fn export_state(&self) -> Zeroizing<String> {
        // Each part is built first, then copied once into a buffer of the
        // exact size, so no reallocation leaves secret text behind.
        let mut parts: Vec<Zeroizing<String>> = Vec::with_capacity(self.peers.len() * 2 + 4);
        parts.push(Zeroizing::new(format!(
            "{{\"format\":{},\"prekeys\":",
            json_string(FORMAT)
        )));
        parts.push(self.prekeys.export_json());
        parts.push(Zeroizing::new(",\"peers\":{".to_owned()));
        let mut peers: Vec<(&String, &Peer)> = self.peers.iter().filter(|(_, p)| !p.persists_nothing()).collect();
        peers.sort_by(|a, b| a.0.cmp(b.0));
        for (i, (did, p)) in peers.into_iter().enumerate() {
            let comma = if i == 0 { "" } else { "," };
            parts.push(Zeroizing::new(format!("{comma}{}:", json_string(did))));
            parts.push(peer_json(p));
        }
        parts.push(Zeroizing::new("}}".to_owned()));
        join(&parts)
    }

    /// The pre-keys' row for an incremental store (secret).
    pub fn export_prekeys(&self) -> Zeroizing<String> {
        self.prekeys.export_json()
    }

    /// `peer`'s row for an incremental store (secret); `None` when the peer
    /// holds nothing worth keeping (delete its row).
    pub fn export_peer(&self, peer: &str) -> Option<Zeroizing<String>> {
        self.peers.get(peer).filter(|p| !p.persists_nothing()).map(peer_json)
    }

    /// Rebuilds a mesh from the rows of an incremental store: the pre-keys
    /// of [`Mesh::export_prekeys`] and each peer's [`Mesh::export_peer`].
    pub fn import_parts<P: AsRef<str>>(
        identity: Identity,
        prekeys: &str,
        peers: impl IntoIterator<Item = (String, P)>,
        config: MeshConfig,
        ids: Box<dyn IdSource>,
    ) -> Result<Self, StateError> {
        let prekeys = PreKeys::import_json(&identity, prekeys)?;
        let mut mesh = Self::new(identity, prekeys, config, ids);
        for (did, text) in peers {
            let v: PeerIn<'_> =
                serde_json::from_str(text.as_ref()).map_err(|e| StateError::Json(format!("peer {did:?}: {e}")))?;
            if let Some(p) = peer_from(&did, v, mesh.config.seen_ids_per_peer)? {
                mesh.peers.insert(did, p);
            }
        }
        Ok(mesh)
    }

    /// Restores [`Mesh::export_state`] for `identity`. Empty peer entries
    /// (written by versions that kept them) are dropped.
    pub fn import_state(
        identity: Identity,
        text: &str,
        config: MeshConfig,
        ids: Box<dyn IdSource>,
    ) -> Result<Self, StateError> {
        let state: StateIn<'_> = serde_json::from_str(text).map_err(|e| StateError::Json(e.to_string()))?;
        if state.format != FORMAT {
            return Err(StateError::Json(format!("not a {FORMAT} state")));
        }
        let prekeys = PreKeys::import_json(&identity, state.prekeys.get())?;
        let mut mesh = Self::new(identity, prekeys, config, ids);
        for (did, v) in state.peers {
            if let Some(p) = peer_from(&did, v, mesh.config.seen_ids_per_peer)? {
                mesh.peers.insert(did, p);
            }
        }
        Ok(mesh)
    }
}
