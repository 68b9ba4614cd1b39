//! `meshwire` for Python: the AgentMesh end-to-end encrypted agent protocol
//! with a Rust core and an asyncio API.
//!
//! High level, `client::PyMeshClient` wraps `meshwire::MeshClient`
//! (registry, relay, sessions opened on demand, KNOCK policy, events).
//! Low level, the `crypto` module exposes identities, pre-keys, bundles and
//! secure channels for runtimes with their own transport. Errors map onto
//! the `MeshError` hierarchy of the `errors` module. The tokio runtime of
//! the `runtime` module is created on first use and shut down at
//! interpreter exit.
//!
//! The Python API is documented in the package's own docstrings and type
//! stubs (`python/meshwire/`); nothing here is a Rust API.
#![warn(missing_docs)]

mod client;
mod convert;
mod crypto;
mod errors;
mod rng;
mod runtime;

use pyo3::prelude::*;

const EXPORTS: &[&str] = &[
    "Identity",
    "PreKeys",
    "PreKeyBundle",
    "Establishment",
    "EncryptedMessage",
    "SecureChannel",
    "MeshClient",
    "Message",
    "Event",
    "MessageIterator",
    "EventIterator",
    "MeshError",
    "DecryptError",
    "RegistryError",
    "RelayError",
    "ProtocolError",
    "StateError",
    "ClosedError",
    "MeshTimeoutError",
    "StoreError",
    "KDF_DIALECTS",
    // Listed so that the package's `from .meshwire import *` re-exports it.
    "__version__",
];

#[pymodule]
#[pyo3(name = "meshwire")]
fn meshwire_py(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("KDF_DIALECTS", ("spec", "legacy-ff-salt"))?;
    m.add_class::<crypto::PyIdentity>()?;
    m.add_class::<crypto::PyPreKeys>()?;
    m.add_class::<crypto::PyPreKeyBundle>()?;
    m.add_class::<crypto::PyEstablishment>()?;
    m.add_class::<crypto::PyEncryptedMessage>()?;
    m.add_class::<crypto::PySecureChannel>()?;
    m.add_class::<client::PyMeshClient>()?;
    m.add_class::<client::PyMessage>()?;
    m.add_class::<client::PyEvent>()?;
    m.add_class::<client::MessageIterator>()?;
    m.add_class::<client::EventIterator>()?;
    errors::register(m)?;

    // Not a module attribute: only `atexit` holds it.
    let shutdown = wrap_pyfunction!(runtime::_shutdown_runtime, m)?;
    m.py().import("atexit")?.call_method1("register", (shutdown,))?;
    m.setattr("__all__", EXPORTS.to_vec())?;
    Ok(())
}
