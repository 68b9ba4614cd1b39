//! The exception hierarchy and the mapping of Rust errors onto it.
//!
//! `MeshError` is the base of everything this module raises on its own.
//! `ProtocolError` is also a `ValueError`, `MeshTimeoutError` a
//! `TimeoutError` and `StoreError` an `OSError`, so generic handlers keep
//! working. The classes are created at import time with `type()` because
//! PyO3's static exception macro allows one base class only.

use meshwire::client::ClientError;
use meshwire::registry::RegistryError as RustRegistryError;
use meshwire::store::StoreError as RustStoreError;
use meshwire_proto::mesh::SendError;
use meshwire_proto::{AcceptError, BundleError, DecryptError, DidError, EncryptError, PreKeyError, X3dhError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// One class of the hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Mesh,
    Decrypt,
    Registry,
    Relay,
    Protocol,
    State,
    Closed,
    Timeout,
    Store,
}

impl Kind {
    const ALL: [Kind; 9] = [
        Kind::Mesh,
        Kind::Decrypt,
        Kind::Registry,
        Kind::Relay,
        Kind::Protocol,
        Kind::State,
        Kind::Closed,
        Kind::Timeout,
        Kind::Store,
    ];

    fn index(self) -> usize {
        Self::ALL.iter().position(|k| *k == self).unwrap_or(0)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Mesh => "MeshError",
            Kind::Decrypt => "DecryptError",
            Kind::Registry => "RegistryError",
            Kind::Relay => "RelayError",
            Kind::Protocol => "ProtocolError",
            Kind::State => "StateError",
            Kind::Closed => "ClosedError",
            Kind::Timeout => "MeshTimeoutError",
            Kind::Store => "StoreError",
        }
    }

    fn doc(self) -> &'static str {
        match self {
            Kind::Mesh => "Base class of every error meshwire raises.",
            Kind::Decrypt => "A message did not decrypt (forged, replayed, corrupted or from another session).",
            Kind::Registry => "The registry refused or failed a request; `status` is the HTTP status, if any.",
            Kind::Relay => "The relay could not be joined or refused the connection.",
            Kind::Protocol => "Malformed input: bad keys, bad lengths, bad JSON, bad DIDs, unknown KDF dialects.",
            Kind::State => "An operation is not possible in the current state, or a saved state is invalid.",
            Kind::Closed => "The client is closed or was never connected.",
            Kind::Timeout => "Nothing arrived within the timeout.",
            Kind::Store => "An identity or session file could not be read or written, or is not private.",
        }
    }

    /// The builtin exception class mixed in, besides the parent.
    fn builtin(self) -> Option<&'static str> {
        match self {
            Kind::Protocol => Some("ValueError"),
            Kind::Timeout => Some("TimeoutError"),
            Kind::Store => Some("OSError"),
            _ => None,
        }
    }
}

static TYPES: PyOnceLock<Vec<Py<PyType>>> = PyOnceLock::new();

fn create_types(py: Python<'_>) -> PyResult<Vec<Py<PyType>>> {
    let builtins = py.import("builtins")?;
    let type_ = builtins.getattr("type")?;
    let exception = builtins.getattr("Exception")?;
    let mut out: Vec<Py<PyType>> = Vec::with_capacity(Kind::ALL.len());
    for kind in Kind::ALL {
        let mut bases: Vec<Bound<'_, PyAny>> = Vec::new();
        match out.first() {
            Some(base) if kind != Kind::Mesh => bases.push(base.bind(py).clone().into_any()),
            _ => bases.push(exception.clone()),
        }
        if let Some(name) = kind.builtin() {
            bases.push(builtins.getattr(name)?);
        }
        let namespace = PyDict::new(py);
        namespace.set_item("__module__", "meshwire")?;
        namespace.set_item("__doc__", kind.doc())?;
        let class = type_.call1((kind.name(), PyTuple::new(py, bases)?, namespace))?;
        out.push(class.cast_into::<PyType>()?.unbind());
    }
    Ok(out)
}

/// The class of `kind`.
pub fn class(py: Python<'_>, kind: Kind) -> PyResult<Bound<'_, PyType>> {
    let types = TYPES.get_or_try_init(py, || create_types(py))?;
    types
        .get(kind.index())
        .map(|t| t.bind(py).clone())
        .ok_or_else(|| pyo3::exceptions::PySystemError::new_err("meshwire exception classes missing"))
}

/// Adds every class to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for kind in Kind::ALL {
        m.add(kind.name(), class(m.py(), kind)?)?;
    }
    Ok(())
}

/// A `kind` exception carrying `message`.
pub fn new_err(kind: Kind, message: impl Into<String>) -> PyErr {
    let message = message.into();
    Python::attach(|py| match class(py, kind) {
        Ok(class) => PyErr::from_type(class, (message,)),
        Err(e) => e,
    })
}

/// A `RegistryError` with its `status` attribute (HTTP status or None).
fn registry_err(error: &RustRegistryError, message: String) -> PyErr {
    Python::attach(|py| {
        let build = || -> PyResult<PyErr> {
            let value = class(py, Kind::Registry)?.call1((message.clone(),))?;
            value.setattr("status", error.status())?;
            Ok(PyErr::from_value(value))
        };
        build().unwrap_or_else(|e| e)
    })
}

/// Converts a Rust error into the matching Python exception.
pub trait ToPyErr {
    fn to_py_err(self) -> PyErr;
}

/// `.py()` on results: the error as its Python exception.
pub trait ResultExt<T> {
    fn py(self) -> PyResult<T>;
}

impl<T, E: ToPyErr> ResultExt<T> for Result<T, E> {
    fn py(self) -> PyResult<T> {
        self.map_err(ToPyErr::to_py_err)
    }
}

impl ToPyErr for DecryptError {
    fn to_py_err(self) -> PyErr {
        new_err(Kind::Decrypt, self.to_string())
    }
}

impl ToPyErr for EncryptError {
    fn to_py_err(self) -> PyErr {
        new_err(Kind::State, self.to_string())
    }
}

impl ToPyErr for BundleError {
    fn to_py_err(self) -> PyErr {
        new_err(Kind::Protocol, self.to_string())
    }
}

impl ToPyErr for X3dhError {
    fn to_py_err(self) -> PyErr {
        new_err(Kind::Protocol, self.to_string())
    }
}

impl ToPyErr for AcceptError {
    fn to_py_err(self) -> PyErr {
        match self {
            AcceptError::X3dh(e) => e.to_py_err(),
            AcceptError::Decrypt(e) => new_err(Kind::Decrypt, format!("first message: {e}")),
        }
    }
}

impl ToPyErr for DidError {
    fn to_py_err(self) -> PyErr {
        new_err(Kind::Protocol, format!("invalid DID: {self}"))
    }
}

impl ToPyErr for PreKeyError {
    fn to_py_err(self) -> PyErr {
        new_err(Kind::State, self.to_string())
    }
}

impl ToPyErr for meshwire_proto::StateError {
    fn to_py_err(self) -> PyErr {
        new_err(Kind::State, self.to_string())
    }
}

impl ToPyErr for RustStoreError {
    fn to_py_err(self) -> PyErr {
        new_err(Kind::Store, self.to_string())
    }
}

impl ToPyErr for RustRegistryError {
    fn to_py_err(self) -> PyErr {
        let message = self.to_string();
        registry_err(&self, message)
    }
}

impl ToPyErr for SendError {
    fn to_py_err(self) -> PyErr {
        match self {
            SendError::NoSession(_) | SendError::Encrypt(_) | SendError::TooManyUnconfirmed { .. } => {
                new_err(Kind::State, self.to_string())
            }
            SendError::X3dh(_) | SendError::Did(_) => new_err(Kind::Protocol, self.to_string()),
        }
    }
}

impl ToPyErr for ClientError {
    fn to_py_err(self) -> PyErr {
        let message = self.to_string();
        match self {
            ClientError::Registry(e) => registry_err(&e, message),
            ClientError::Relay(_) | ClientError::RelayConnect(_) => new_err(Kind::Relay, message),
            ClientError::UntrustedBundle { .. } => new_err(Kind::Protocol, message),
            ClientError::CorruptState { .. } => new_err(Kind::State, message),
            ClientError::Session(e) => e.to_py_err(),
            ClientError::Store(_) => new_err(Kind::Store, message),
            ClientError::Persist(_) => new_err(Kind::Store, message),
            ClientError::State(_) => new_err(Kind::State, message),
            ClientError::Did(_) | ClientError::Payload(_) => new_err(Kind::Protocol, message),
            ClientError::Closed => new_err(Kind::Closed, message),
            ClientError::Timeout => new_err(Kind::Timeout, message),
            _ => new_err(Kind::State, message),
        }
    }
}
