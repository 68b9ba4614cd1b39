//! The low-level API: identities, pre-keys, bundles and secure channels for
//! runtimes that bring their own transport. Crypto runs with the GIL
//! released.

use crate::convert::{json_to_py, py_to_json};
use crate::errors::{new_err, Kind, ResultExt};
use crate::rng::BufferedOsRng;
use meshwire_proto::ratchet::HEADER_LEN;
use meshwire_proto::{
    Did, Establishment, Identity, KdfDialect, OneTimeKeyId, PreKeyBundle, PreKeys, SecureChannel, X25519PublicKey,
};
use pyo3::prelude::*;
use pyo3::pyclass::CompareOp;
use pyo3::types::{PyBool, PyBytes, PyString};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn key32(field: &str, bytes: &[u8]) -> PyResult<[u8; 32]> {
    bytes
        .try_into()
        .map_err(|_| new_err(Kind::Protocol, format!("{field} must be 32 bytes, got {}", bytes.len())))
}

fn public_key(field: &str, bytes: &[u8]) -> PyResult<X25519PublicKey> {
    key32(field, bytes).map(X25519PublicKey::from_bytes)
}

fn did(field: &str, text: &str) -> PyResult<Did> {
    Did::parse(text).map_err(|e| new_err(Kind::Protocol, format!("{field}: invalid DID {text:?}: {e}")))
}

pub fn dialect(name: &str) -> PyResult<KdfDialect> {
    name.parse().map_err(|_| {
        new_err(
            Kind::Protocol,
            format!("unknown KDF dialect {name:?} (expected \"spec\" or \"legacy-ff-salt\")"),
        )
    })
}

fn compare<T: PartialEq>(a: &T, b: &T, op: CompareOp, py: Python<'_>) -> Py<PyAny> {
    match op {
        CompareOp::Eq => PyBool::new(py, a == b).to_owned().into_any().unbind(),
        CompareOp::Ne => PyBool::new(py, a != b).to_owned().into_any().unbind(),
        _ => py.NotImplemented(),
    }
}

/// An agent's long-term identity: an Ed25519 key, the X25519 key derived
/// from it and the DID.
#[pyclass(frozen, name = "Identity", module = "meshwire")]
pub struct PyIdentity {
    pub inner: Identity,
}

impl PyIdentity {
    pub fn copy(&self) -> Identity {
        Identity::from_seed(&self.inner.seed())
    }
}

#[pymethods]
impl PyIdentity {
    /// A new random identity.
    #[staticmethod]
    fn generate() -> Self {
        Self {
            inner: Identity::generate(&mut rand_core::OsRng),
        }
    }

    /// The identity of a 32-byte Ed25519 seed.
    #[staticmethod]
    fn from_seed(seed: &[u8]) -> PyResult<Self> {
        let seed = zeroize::Zeroizing::new(key32("seed", seed)?);
        Ok(Self {
            inner: Identity::from_seed(&seed),
        })
    }

    /// Loads an identity file written by `save` (or the Rust
    /// `meshwire::save_identity`); refuses a file group or others can read.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| meshwire::load_identity(&path)).py()?;
        Ok(Self { inner })
    }

    /// Writes the identity file (mode 0600, atomically).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| meshwire::save_identity(&self.inner, &path)).py()
    }

    #[getter]
    fn did(&self) -> &str {
        self.inner.did().as_str()
    }

    /// The Ed25519 public key (32 bytes).
    #[getter]
    fn public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.ed25519_public().as_bytes())
    }

    /// The X25519 identity public key (32 bytes).
    #[getter]
    fn x25519_public_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.x25519_public().as_bytes())
    }

    /// Ed25519 signature (64 bytes) of `message`.
    fn sign<'py>(&self, py: Python<'py>, message: &[u8]) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.sign(message))
    }

    fn __richcmp__(&self, other: &Bound<'_, PyAny>, op: CompareOp, py: Python<'_>) -> Py<PyAny> {
        match other.cast::<PyIdentity>() {
            Ok(other) => compare(self.inner.did(), other.get().inner.did(), op, py),
            Err(_) => py.NotImplemented(),
        }
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.inner.did().hash(&mut h);
        h.finish()
    }

    fn __repr__(&self) -> String {
        format!("Identity(did={:?})", self.inner.did().as_str())
    }
}

/// A responder's public pre-keys, as the registry serves them.
#[pyclass(frozen, name = "PreKeyBundle", module = "meshwire")]
pub struct PyPreKeyBundle {
    pub inner: PreKeyBundle,
}

#[pymethods]
impl PyPreKeyBundle {
    #[new]
    #[pyo3(signature = (
        identity_key,
        identity_key_ed,
        signed_pre_key_id,
        signed_pre_key,
        signed_pre_key_signature,
        one_time_pre_key_id = None,
        one_time_pre_key = None,
    ))]
    fn new(
        identity_key: &[u8],
        identity_key_ed: &[u8],
        signed_pre_key_id: u32,
        signed_pre_key: &[u8],
        signed_pre_key_signature: &[u8],
        one_time_pre_key_id: Option<OneTimeKeyId>,
        one_time_pre_key: Option<&[u8]>,
    ) -> PyResult<Self> {
        let otk = match (one_time_pre_key_id, one_time_pre_key) {
            (Some(id), Some(key)) => Some((id, key)),
            (None, None) => None,
            _ => {
                return Err(new_err(
                    Kind::Protocol,
                    "one_time_pre_key_id and one_time_pre_key go together: give both or neither",
                ))
            }
        };
        let inner = PreKeyBundle::from_parts(
            identity_key,
            identity_key_ed,
            signed_pre_key_id,
            signed_pre_key,
            signed_pre_key_signature,
            otk,
        )
        .py()?;
        Ok(Self { inner })
    }

    /// Parses the registry's bundle JSON (base64 in either alphabet).
    #[staticmethod]
    fn from_json(text: &str) -> PyResult<Self> {
        Ok(Self {
            inner: PreKeyBundle::from_json(text).py()?,
        })
    }

    /// The registry's bundle JSON (base64url without padding).
    fn to_json(&self) -> String {
        self.inner.to_json()
    }

    /// Checks the signed pre-key's signature; raises `ProtocolError` if it
    /// does not verify.
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.verify()).py()
    }

    #[getter]
    fn identity_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.identity_key.as_bytes())
    }

    #[getter]
    fn identity_key_ed<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.identity_key_ed.as_bytes())
    }

    #[getter]
    fn signed_pre_key_id(&self) -> u32 {
        self.inner.signed_pre_key_id
    }

    #[getter]
    fn signed_pre_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.signed_pre_key.as_bytes())
    }

    #[getter]
    fn signed_pre_key_signature<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.signed_pre_key_signature)
    }

    #[getter]
    fn one_time_pre_key_id(&self) -> Option<OneTimeKeyId> {
        self.inner.one_time_pre_key.map(|(id, _)| id)
    }

    #[getter]
    fn one_time_pre_key<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner
            .one_time_pre_key
            .map(|(_, key)| PyBytes::new(py, key.as_bytes()))
    }

    fn __richcmp__(&self, other: &Bound<'_, PyAny>, op: CompareOp, py: Python<'_>) -> Py<PyAny> {
        match other.cast::<PyPreKeyBundle>() {
            Ok(other) => compare(&self.inner, &other.get().inner, op, py),
            Err(_) => py.NotImplemented(),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "PreKeyBundle(identity_key={}, signed_pre_key_id={}, one_time_pre_key_id={})",
            self.inner.identity_key.to_hex(),
            self.inner.signed_pre_key_id,
            self.inner
                .one_time_pre_key
                .map(|(id, _)| id.to_string())
                .unwrap_or_else(|| "None".into())
        )
    }
}

/// A responder's private pre-keys: the signed pre-key and the one-time
/// pre-keys not used yet.
#[pyclass(frozen, name = "PreKeys", module = "meshwire")]
pub struct PyPreKeys {
    pub inner: Mutex<PreKeys>,
}

#[pymethods]
impl PyPreKeys {
    /// A fresh signed pre-key (id 0) signed by `identity`; no one-time keys.
    #[staticmethod]
    fn generate(py: Python<'_>, identity: &Bound<'_, PyIdentity>) -> Self {
        let identity = &identity.get().inner;
        let inner = py.detach(|| PreKeys::generate(&mut BufferedOsRng, identity));
        Self {
            inner: Mutex::new(inner),
        }
    }

    /// Draws `count` one-time pre-keys; returns their ids.
    fn generate_one_time_keys(&self, py: Python<'_>, count: usize) -> PyResult<Vec<OneTimeKeyId>> {
        if count > 100_000 {
            return Err(new_err(Kind::Protocol, "at most 100000 one-time keys at once"));
        }
        py.detach(|| lock(&self.inner).generate_one_time_keys(&mut BufferedOsRng, count))
            .py()
    }

    /// The public bundle, with the one-time key `otk_id` if it is still
    /// held (else without one-time key).
    #[pyo3(signature = (identity, otk_id = None))]
    fn bundle(&self, identity: &Bound<'_, PyIdentity>, otk_id: Option<OneTimeKeyId>) -> PyResult<PyPreKeyBundle> {
        let keys = lock(&self.inner);
        if let Some(id) = otk_id {
            if keys.one_time_key(id).is_none() {
                return Err(new_err(Kind::State, format!("no one-time pre-key with id {id}")));
            }
        }
        Ok(PyPreKeyBundle {
            inner: keys.bundle(&identity.get().inner, otk_id),
        })
    }

    /// Forgets a one-time key (after a session was established with it).
    fn remove_one_time_key(&self, otk_id: OneTimeKeyId) -> PyResult<()> {
        lock(&self.inner).remove_one_time_key(otk_id).py()
    }

    /// Ids of the one-time keys still held, ascending.
    #[getter]
    fn one_time_key_ids(&self) -> Vec<OneTimeKeyId> {
        lock(&self.inner).one_time_key_ids().collect()
    }

    #[getter]
    fn signed_pre_key_id(&self) -> u32 {
        lock(&self.inner).signed_pre_key().id
    }

    /// The signed pre-key's public key.
    #[getter]
    fn signed_pre_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, lock(&self.inner).signed_pre_key().pair.public().as_bytes())
    }

    /// The private pre-keys as JSON (secret), for persistence.
    fn export_json(&self) -> String {
        lock(&self.inner).export_json().to_string()
    }

    /// The inverse of `export_json`; the signature is checked against
    /// `identity`.
    #[staticmethod]
    fn import_json(identity: &Bound<'_, PyIdentity>, text: &str) -> PyResult<Self> {
        let inner = PreKeys::import_json(&identity.get().inner, text).py()?;
        Ok(Self {
            inner: Mutex::new(inner),
        })
    }

    fn __repr__(&self) -> String {
        let keys = lock(&self.inner);
        format!(
            "PreKeys(signed_pre_key_id={}, one_time_keys={})",
            keys.signed_pre_key().id,
            keys.one_time_key_ids().count()
        )
    }
}

/// What an initiator sends so the responder can run X3DH: its identity
/// key, its ephemeral key and the one-time key id it used.
#[pyclass(frozen, name = "Establishment", module = "meshwire")]
pub struct PyEstablishment {
    pub inner: Establishment,
}

#[pymethods]
impl PyEstablishment {
    #[new]
    #[pyo3(signature = (identity_key, ephemeral_key, one_time_key_id = None))]
    fn new(identity_key: &[u8], ephemeral_key: &[u8], one_time_key_id: Option<OneTimeKeyId>) -> PyResult<Self> {
        Ok(Self {
            inner: Establishment {
                identity_key: public_key("identity_key", identity_key)?,
                ephemeral_key: public_key("ephemeral_key", ephemeral_key)?,
                one_time_key_id,
            },
        })
    }

    /// The initiator's X25519 identity key.
    #[getter]
    fn identity_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.identity_key.as_bytes())
    }

    #[getter]
    fn ephemeral_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.ephemeral_key.as_bytes())
    }

    #[getter]
    fn one_time_key_id(&self) -> Option<OneTimeKeyId> {
        self.inner.one_time_key_id
    }

    fn __richcmp__(&self, other: &Bound<'_, PyAny>, op: CompareOp, py: Python<'_>) -> Py<PyAny> {
        match other.cast::<PyEstablishment>() {
            Ok(other) => compare(&self.inner, &other.get().inner, op, py),
            Err(_) => py.NotImplemented(),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Establishment(identity_key={}, ephemeral_key={}, one_time_key_id={})",
            self.inner.identity_key.to_hex(),
            self.inner.ephemeral_key.to_hex(),
            self.inner
                .one_time_key_id
                .map(|id| id.to_string())
                .unwrap_or_else(|| "None".into())
        )
    }
}

/// A ratchet message: header (`dh`, `pn`, `n`) and `nonce || ciphertext || tag`.
#[pyclass(frozen, name = "EncryptedMessage", module = "meshwire")]
pub struct PyEncryptedMessage {
    pub inner: meshwire_proto::EncryptedMessage,
}

#[pymethods]
impl PyEncryptedMessage {
    #[new]
    fn new(dh: &[u8], pn: u32, n: u32, ciphertext: &[u8]) -> PyResult<Self> {
        Ok(Self {
            inner: meshwire_proto::EncryptedMessage {
                header: meshwire_proto::Header {
                    dh: public_key("dh", dh)?,
                    pn,
                    n,
                },
                ciphertext: ciphertext.to_vec(),
            },
        })
    }

    /// From the 40-byte header (`dh || u32be(pn) || u32be(n)`) and the
    /// ciphertext.
    #[staticmethod]
    fn from_header(header: &[u8], ciphertext: &[u8]) -> PyResult<Self> {
        let header = meshwire_proto::Header::from_bytes(header).map_err(|e| new_err(Kind::Protocol, e.to_string()))?;
        Ok(Self {
            inner: meshwire_proto::EncryptedMessage {
                header,
                ciphertext: ciphertext.to_vec(),
            },
        })
    }

    /// The `agentmesh` package's `EncryptedMessage.serialize()` layout:
    /// `u32be(40) || header || ciphertext`.
    fn serialize<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        let mut out = Vec::with_capacity(4 + HEADER_LEN + self.inner.ciphertext.len());
        out.extend_from_slice(&(HEADER_LEN as u32).to_be_bytes());
        out.extend_from_slice(&self.inner.header.to_bytes());
        out.extend_from_slice(&self.inner.ciphertext);
        PyBytes::new(py, &out)
    }

    /// The inverse of `serialize`.
    #[staticmethod]
    fn deserialize(data: &[u8]) -> PyResult<Self> {
        let bad = |why: &str| new_err(Kind::Protocol, format!("serialized message: {why}"));
        let (len, rest) = data
            .split_first_chunk::<4>()
            .ok_or_else(|| bad("shorter than 4 bytes"))?;
        let len = u32::from_be_bytes(*len) as usize;
        if len != HEADER_LEN {
            return Err(bad(&format!("header length {len}, expected {HEADER_LEN}")));
        }
        let (header, ciphertext) = rest
            .split_at_checked(HEADER_LEN)
            .ok_or_else(|| bad("truncated header"))?;
        Self::from_header(header, ciphertext)
    }

    /// The sender's ratchet public key.
    #[getter]
    fn dh<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.header.dh.as_bytes())
    }

    /// Length of the sender's previous sending chain.
    #[getter]
    fn pn(&self) -> u32 {
        self.inner.header.pn
    }

    /// Number of the message in its chain.
    #[getter]
    fn n(&self) -> u32 {
        self.inner.header.n
    }

    /// The 40-byte header the AEAD authenticates.
    #[getter]
    fn header_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.header.to_bytes())
    }

    #[getter]
    fn ciphertext<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.ciphertext)
    }

    fn __richcmp__(&self, other: &Bound<'_, PyAny>, op: CompareOp, py: Python<'_>) -> Py<PyAny> {
        match other.cast::<PyEncryptedMessage>() {
            Ok(other) => compare(&self.inner, &other.get().inner, op, py),
            Err(_) => py.NotImplemented(),
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "EncryptedMessage(dh={}, pn={}, n={}, ciphertext=<{} bytes>)",
            self.inner.header.dh.to_hex(),
            self.inner.header.pn,
            self.inner.header.n,
            self.inner.ciphertext.len()
        )
    }
}

/// An end-to-end encrypted session with one peer: X3DH plus a Double
/// Ratchet bound to both DIDs.
#[pyclass(frozen, name = "SecureChannel", module = "meshwire")]
pub struct PySecureChannel {
    inner: Mutex<SecureChannel>,
}

impl PySecureChannel {
    fn wrap(channel: SecureChannel) -> Self {
        Self {
            inner: Mutex::new(channel),
        }
    }
}

#[pymethods]
impl PySecureChannel {
    /// Opens a session to the owner of `bundle` (verifies it, runs X3DH);
    /// send the `Establishment` along with the first message.
    #[staticmethod]
    #[pyo3(signature = (identity, responder_did, bundle, kdf = "spec"))]
    fn initiate(
        py: Python<'_>,
        identity: &Bound<'_, PyIdentity>,
        responder_did: &str,
        bundle: &Bound<'_, PyPreKeyBundle>,
        kdf: &str,
    ) -> PyResult<(Self, PyEstablishment)> {
        let responder = did("responder_did", responder_did)?;
        let dialect = dialect(kdf)?;
        let identity = &identity.get().inner;
        let bundle = &bundle.get().inner;
        let (channel, establishment) = py
            .detach(|| SecureChannel::initiate(&mut BufferedOsRng, identity, &responder, bundle, dialect))
            .py()?;
        Ok((Self::wrap(channel), PyEstablishment { inner: establishment }))
    }

    /// Accepts an inbound session from its first message; returns the
    /// channel and the message's plaintext. The one-time key used is
    /// removed from `prekeys` only once that message decrypted.
    #[staticmethod]
    #[pyo3(signature = (identity, prekeys, initiator_did, establishment, first_message, kdf = "spec"))]
    fn accept<'py>(
        py: Python<'py>,
        identity: &Bound<'_, PyIdentity>,
        prekeys: &Bound<'_, PyPreKeys>,
        initiator_did: &str,
        establishment: &Bound<'_, PyEstablishment>,
        first_message: &Bound<'_, PyEncryptedMessage>,
        kdf: &str,
    ) -> PyResult<(Self, Bound<'py, PyBytes>)> {
        let initiator = did("initiator_did", initiator_did)?;
        let dialect = dialect(kdf)?;
        let identity = &identity.get().inner;
        let prekeys = &prekeys.get().inner;
        let establishment = &establishment.get().inner;
        let first = &first_message.get().inner;
        let (channel, plaintext) = py
            .detach(|| {
                let mut keys = lock(prekeys);
                SecureChannel::accept(
                    &mut BufferedOsRng,
                    identity,
                    &mut keys,
                    &initiator,
                    establishment,
                    first,
                    dialect,
                )
            })
            .py()?;
        Ok((Self::wrap(channel), PyBytes::new(py, &plaintext)))
    }

    /// The responder's channel before any message arrived. Unlike `accept`
    /// it leaves the one-time key in `prekeys`: remove it yourself once the
    /// first message decrypted.
    #[staticmethod]
    #[pyo3(signature = (identity, prekeys, initiator_did, establishment, kdf = "spec"))]
    fn respond(
        py: Python<'_>,
        identity: &Bound<'_, PyIdentity>,
        prekeys: &Bound<'_, PyPreKeys>,
        initiator_did: &str,
        establishment: &Bound<'_, PyEstablishment>,
        kdf: &str,
    ) -> PyResult<Self> {
        let initiator = did("initiator_did", initiator_did)?;
        let dialect = dialect(kdf)?;
        let identity = &identity.get().inner;
        let prekeys = &prekeys.get().inner;
        let establishment = &establishment.get().inner;
        let channel = py
            .detach(|| SecureChannel::respond(identity, &lock(prekeys), &initiator, establishment, dialect))
            .py()?;
        Ok(Self::wrap(channel))
    }

    /// Encrypts `plaintext` with the next sending key.
    fn encrypt(&self, py: Python<'_>, plaintext: &[u8]) -> PyResult<PyEncryptedMessage> {
        let inner = py
            .detach(|| lock(&self.inner).encrypt(&mut BufferedOsRng, plaintext))
            .py()?;
        Ok(PyEncryptedMessage { inner })
    }

    /// Decrypts `message`; raises `DecryptError` and leaves the channel
    /// unchanged if it does not authenticate.
    fn decrypt<'py>(&self, py: Python<'py>, message: &Bound<'_, PyEncryptedMessage>) -> PyResult<Bound<'py, PyBytes>> {
        let message = &message.get().inner;
        let plaintext = py
            .detach(|| lock(&self.inner).decrypt(&mut BufferedOsRng, message))
            .py()?;
        Ok(PyBytes::new(py, &plaintext))
    }

    /// The whole channel as JSON (secret): the ratchet's
    /// `RatchetState.to_dict` keys plus `associated_data`,
    /// `local_identity_key`, `remote_identity_key` and `kdf`.
    fn export_state(&self) -> String {
        lock(&self.inner).export_state().to_string()
    }

    /// The inverse of `export_state`.
    #[staticmethod]
    fn import_state(py: Python<'_>, state: &str) -> PyResult<Self> {
        let channel = py.detach(|| SecureChannel::import_state(state)).py()?;
        Ok(Self::wrap(channel))
    }

    /// The ratchet state as the `agentmesh` package's
    /// `RatchetState.to_dict()` writes it (secret).
    fn ratchet_state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let text = lock(&self.inner).ratchet().export_state();
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| new_err(Kind::State, format!("ratchet state: {e}")))?;
        json_to_py(py, &value)
    }

    /// A channel from a ratchet state in `RatchetState.to_dict()` shape (a
    /// dict, or its JSON text) and the channel's binding: the full
    /// associated data (`b"<initiator DID>|<responder DID>" + IK_a + IK_b`,
    /// as the package's channel holds it) and both identity keys.
    #[staticmethod]
    #[pyo3(signature = (state, associated_data, local_identity_key, remote_identity_key, kdf = "spec"))]
    fn from_ratchet_state(
        state: &Bound<'_, PyAny>,
        associated_data: &[u8],
        local_identity_key: &[u8],
        remote_identity_key: &[u8],
        kdf: &str,
    ) -> PyResult<Self> {
        let local = public_key("local_identity_key", local_identity_key)?;
        let remote = public_key("remote_identity_key", remote_identity_key)?;
        let dialect = dialect(kdf)?;
        let value = match state.cast::<PyString>() {
            Ok(text) => {
                serde_json::from_str(&text.to_cow()?).map_err(|e| new_err(Kind::State, format!("state JSON: {e}")))?
            }
            Err(_) => py_to_json(state)?,
        };
        let serde_json::Value::Object(mut map) = value else {
            return Err(new_err(Kind::State, "the ratchet state must be a dict"));
        };
        map.insert("associated_data".into(), hex::encode(associated_data).into());
        map.insert("local_identity_key".into(), local.to_hex().into());
        map.insert("remote_identity_key".into(), remote.to_hex().into());
        map.insert("kdf".into(), dialect.as_str().into());
        let text = zeroize::Zeroizing::new(serde_json::Value::Object(map).to_string());
        Ok(Self::wrap(SecureChannel::import_state(&text).py()?))
    }

    /// The associated data every message authenticates.
    #[getter]
    fn associated_data<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, lock(&self.inner).associated_data())
    }

    #[getter]
    fn local_identity_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, lock(&self.inner).local_identity_key().as_bytes())
    }

    #[getter]
    fn remote_identity_key<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, lock(&self.inner).remote_identity_key().as_bytes())
    }

    /// The X3DH KDF dialect: `"spec"` or `"legacy-ff-salt"`.
    #[getter]
    fn kdf(&self) -> &'static str {
        lock(&self.inner).dialect().as_str()
    }

    fn __repr__(&self) -> String {
        let channel = lock(&self.inner);
        format!(
            "SecureChannel(remote_identity_key={}, kdf={:?})",
            channel.remote_identity_key().to_hex(),
            channel.dialect().as_str()
        )
    }
}
