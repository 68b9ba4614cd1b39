//! A [`Mesh`]'s sessions, pre-keys and delivery bookkeeping as JSON
//! (`meshwire-mesh/1`).
//!
//! Secrets never pass through an untyped `serde_json::Value`: export writes
//! each part into one buffer sized in advance (zeroized on drop), and import
//! reads typed structs that borrow the secret parts from the caller's text
//! and zeroize what they own.

use super::{IdSource, Mesh, MeshConfig, Peer, Unconfirmed, UnconfirmedList};
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

/// The side rows of an incremental store, by peer DID (see
/// [`Mesh::import_parts`]).
#[derive(Default)]
pub struct SideRows<U> {
    /// Remembered message ids, oldest first.
    pub seen: std::collections::BTreeMap<String, Vec<String>>,
    /// Unconfirmed messages' JSON, in sending order (secret).
    pub unconfirmed: std::collections::BTreeMap<String, Vec<U>>,
}

impl<U> std::fmt::Debug for SideRows<U> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideRows")
            .field("seen", &self.seen.values().map(Vec::len).sum::<usize>())
            .field("unconfirmed", &self.unconfirmed.values().map(Vec::len).sum::<usize>())
            .finish()
    }
}

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

/// One peer's JSON object: `{"channel": ..., bookkeeping...}`; with
/// `side_rows`, without the duplicate-id memory and the unconfirmed
/// messages (they are written as side rows).
fn peer_json(p: &Peer, side_rows: bool) -> Zeroizing<String> {
    let no_seen = std::collections::VecDeque::new();
    let channel = match &p.channel {
        Some(c) => c.export_state(),
        None => Zeroizing::new("null".to_owned()),
    };
    let rest = crate::state::to_json_text(&PeerOut {
        accepted_eks: p.accepted_eks.iter().map(|k| k.to_hex()).collect(),
        dialect: p.dialect.map(|d| d.as_str()),
        receipts: p.receipts,
        verified_encrypted: p.verified_encrypted,
        seen: if side_rows { &no_seen } else { &p.seen },
        unconfirmed: if side_rows { &[] } else { p.unconfirmed.as_slice() },
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
    let p = peer_of(did, v, seen_limit)?;
    Ok((!p.persists_nothing()).then_some(p))
}

/// Rebuilds a peer from its JSON object.
fn peer_of(did: &str, v: PeerIn<'_>, seen_limit: usize) -> Result<Peer, StateError> {
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
    p.unconfirmed = UnconfirmedList::from_vec(v.unconfirmed);
    Ok(p)
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
            parts.push(peer_json(p, false));
        }
        parts.push(Zeroizing::new("}}".to_owned()));
        join(&parts)
    }

    /// The pre-keys' row for an incremental store (secret).
    pub fn export_prekeys(&self) -> Zeroizing<String> {
        self.prekeys.export_json()
    }

    /// `peer`'s row for an incremental store (secret); `None` when the peer
    /// holds nothing worth keeping (delete its row and its side rows).
    /// With [`Mesh::track_side_rows`], the duplicate-id memory and the
    /// unconfirmed messages are not in it (see [`super::Dirty`]).
    pub fn export_peer(&self, peer: &str) -> Option<Zeroizing<String>> {
        self.peers
            .get(peer)
            .filter(|p| !p.persists_nothing())
            .map(|p| peer_json(p, self.side_rows))
    }

    /// Rebuilds a mesh from the rows of an incremental store: the pre-keys
    /// of [`Mesh::export_prekeys`], each peer's [`Mesh::export_peer`] and
    /// its side rows (`seen`: remembered ids, oldest first; `unconfirmed`:
    /// the JSON of each unconfirmed message, in sending order), and turns
    /// [`Mesh::track_side_rows`] on. Rows written before side rows existed
    /// hold both lists inline: those peers are marked changed, so that the
    /// next [`Mesh::take_dirty`] moves them into side rows.
    pub fn import_parts<P: AsRef<str>, U: AsRef<str>>(
        identity: Identity,
        prekeys: &str,
        peers: impl IntoIterator<Item = (String, P)>,
        side: &SideRows<U>,
        config: MeshConfig,
        ids: Box<dyn IdSource>,
    ) -> Result<Self, StateError> {
        let prekeys = PreKeys::import_json(&identity, prekeys)?;
        let mut mesh = Self::new(identity, prekeys, config, ids);
        mesh.side_rows = true;
        let limit = mesh.config.seen_ids_per_peer;
        let mut inline = Vec::new();
        for (did, text) in peers {
            let v: PeerIn<'_> =
                serde_json::from_str(text.as_ref()).map_err(|e| StateError::Json(format!("peer {did:?}: {e}")))?;
            let had_inline = !v.seen.is_empty() || !v.unconfirmed.is_empty();
            let mut v = v;
            if let Some(stored) = side.unconfirmed.get(&did) {
                for text in stored {
                    let u: Unconfirmed = serde_json::from_str(text.as_ref())
                        .map_err(|e| StateError::Json(format!("peer {did:?}: unconfirmed row: {e}")))?;
                    if !v.unconfirmed.iter().any(|have| have.id == u.id) {
                        v.unconfirmed.push(u);
                    }
                }
            }
            let mut p = peer_of(&did, v, limit)?;
            for id in side.seen.get(&did).into_iter().flatten() {
                p.remember(id, limit);
            }
            if !p.persists_nothing() {
                mesh.peers.insert(did.clone(), p);
            }
            if let Some(p) = mesh.peers.get_mut(&did) {
                if had_inline {
                    inline.push(did);
                } else {
                    // The store holds exactly this.
                    p.seen_persisted = p.seen_total;
                    p.unconfirmed_persisted = p
                        .unconfirmed
                        .as_slice()
                        .iter()
                        .map(|u| (u.id.clone(), u.fingerprint()))
                        .collect();
                    p.unconfirmed.mark_clean();
                }
            }
        }
        for did in inline {
            if let Some(p) = mesh.peers.get_mut(&did) {
                p.seen_persisted = 0;
            }
            mesh.touch(&did);
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
