//! `MeshClient`: the asyncio face of `meshwire::MeshClient`.

use crate::convert::{dumps, json_to_py, Deferred};
use crate::crypto::PyIdentity;
use crate::errors::{new_err, Kind, ResultExt};
use crate::runtime::{awaitable, awaitable_with_locals, current_locals, running_handle};
use meshwire::client::{ClientConfig, ClientError, ClientEvent, KnockInfo, KnockPolicy, Message, Payload};
use meshwire::registry::DiscoverResult;
use meshwire::Identity;
use meshwire_proto::mesh::ErrorKind;
use pyo3::exceptions::{PyStopAsyncIteration, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyMemoryView};
use pyo3_async_runtimes::TaskLocals;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::sync::watch;

/// How long a KNOCK policy may take before the KNOCK is rejected.
const POLICY_TIMEOUT: Duration = Duration::from_secs(30);
/// "No timeout" for the Rust calls that need one.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A timeout in seconds from Python: finite and non-negative; a huge one
/// (`1e18`) saturates at [`meshwire::client::MAX_WAIT`] instead of
/// overflowing the clock.
fn duration(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    timeout
        .map(|t| {
            if t.is_finite() && t >= meshwire::client::MAX_WAIT.as_secs_f64() {
                return Ok(meshwire::client::MAX_WAIT);
            }
            Duration::try_from_secs_f64(t).map_err(|_| {
                PyValueError::new_err(format!(
                    "timeout must be a non-negative, finite number of seconds, got {t}"
                ))
            })
        })
        .transpose()
}

fn check_callable(policy: &Option<Py<PyAny>>, py: Python<'_>) -> PyResult<()> {
    match policy {
        Some(p) if !p.bind(py).is_callable() => Err(PyTypeError::new_err(
            "knock_policy must be a callable (from_did, intent, metadata) -> bool or an async one",
        )),
        _ => Ok(()),
    }
}

const POLICY_HELPER: &std::ffi::CStr = cr#"
import inspect

async def call_policy(policy, from_did, intent, metadata):
    verdict = policy(from_did, intent, metadata)
    if inspect.isawaitable(verdict):
        verdict = await verdict
    return bool(verdict)
"#;

static CALL_POLICY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `async def call_policy(...)`: runs a sync or async policy on the loop.
fn call_policy(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    CALL_POLICY
        .get_or_try_init(py, || -> PyResult<Py<PyAny>> {
            let module = PyModule::from_code(
                py,
                POLICY_HELPER,
                c"meshwire/_knock_policy.py",
                c"meshwire._knock_policy",
            )?;
            Ok(module.getattr("call_policy")?.unbind())
        })
        .map(|f| f.bind(py))
}

struct State {
    client: Option<meshwire::MeshClient>,
    connecting: bool,
    closed: bool,
}

struct Shared {
    identity: Identity,
    config: ClientConfig,
    store_dir: Option<PathBuf>,
    policy: Mutex<Option<Py<PyAny>>>,
    locals: Mutex<Option<TaskLocals>>,
    state: Mutex<State>,
    closed: watch::Sender<bool>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Dropped without `close()`: say goodbye to the relay if the runtime
        // still runs.
        let state = self.state.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let (Some(client), false) = (state.client.take(), state.closed) {
            if let Some(handle) = running_handle() {
                handle.spawn(async move { client.close().await });
            }
        }
    }
}

impl Shared {
    /// The connected client, for operations that need the connection.
    fn live(&self) -> PyResult<meshwire::MeshClient> {
        let state = lock(&self.state);
        if state.closed {
            return Err(new_err(Kind::Closed, "the client is closed"));
        }
        state.client.clone().ok_or_else(not_connected)
    }

    /// The client even when closed (what was received can still be read).
    fn reader(&self) -> PyResult<meshwire::MeshClient> {
        let state = lock(&self.state);
        match (&state.client, state.closed) {
            (Some(client), _) => Ok(client.clone()),
            (None, true) => Err(new_err(Kind::Closed, "the client is closed")),
            (None, false) => Err(not_connected()),
        }
    }

    fn begin_connect(&self) -> PyResult<()> {
        let mut state = lock(&self.state);
        if state.closed {
            return Err(new_err(Kind::Closed, "the client is closed; create a new MeshClient"));
        }
        if state.client.is_some() || state.connecting {
            return Err(new_err(Kind::State, "the client is already connected or connecting"));
        }
        state.connecting = true;
        Ok(())
    }

    async fn connect(self: Arc<Self>) -> PyResult<()> {
        /// Clears `connecting` however the connection attempt ends
        /// (including cancellation of the awaitable).
        struct Attempt<'a>(&'a Shared);
        impl Drop for Attempt<'_> {
            fn drop(&mut self) {
                lock(&self.0.state).connecting = false;
            }
        }
        let attempt = Attempt(&self);
        let identity = Identity::from_seed(&self.identity.seed());
        let policy = knock_policy(Arc::downgrade(&self));
        let config = self.config.clone();
        let mut builder =
            meshwire::MeshClient::builder(identity, config.relay_url.clone(), config.registry_url.clone())
                .config(|c| *c = config)
                .knock_policy(policy);
        if let Some(dir) = self.store_dir.clone() {
            // The client opens the store, and releases it on close().
            builder = builder.state_dir(dir);
        }
        let result = builder.connect().await;
        let client = result.py()?;
        let closed_meanwhile = {
            let mut state = lock(&self.state);
            if !state.closed {
                state.client = Some(client.clone());
            }
            state.closed
        };
        drop(attempt);
        if closed_meanwhile {
            client.close().await;
            return Err(new_err(Kind::Closed, "the client was closed while connecting"));
        }
        Ok(())
    }

    /// Marks the client closed; returns the Rust client to close.
    fn mark_closed(&self) -> Option<meshwire::MeshClient> {
        let mut state = lock(&self.state);
        state.closed = true;
        self.closed.send_replace(true);
        state.client.clone()
    }
}

fn not_connected() -> PyErr {
    new_err(
        Kind::Closed,
        "the client is not connected: use `async with client:` or `await client.connect()`",
    )
}

fn knock_policy(shared: Weak<Shared>) -> KnockPolicy {
    Arc::new(move |info: KnockInfo| {
        let shared = shared.clone();
        Box::pin(async move {
            match shared.upgrade() {
                Some(shared) => decide(shared, info).await,
                None => false,
            }
        })
    })
}

/// Asks the Python policy, on the client's event loop; fails closed.
async fn decide(shared: Arc<Shared>, info: KnockInfo) -> bool {
    let pending = Python::attach(|py| -> PyResult<Option<_>> {
        let Some(policy) = lock(&shared.policy).as_ref().map(|p| p.clone_ref(py)) else {
            return Ok(None);
        };
        let locals = lock(&shared.locals)
            .clone()
            .ok_or_else(|| new_err(Kind::State, "no event loop to run the KNOCK policy on"))?;
        let intent = json_to_py(py, &info.intent)?;
        let metadata = match &info.metadata {
            Some(m) => Some(m.into_pyobject(py)?),
            None => None,
        };
        let coroutine = call_policy(py)?.call1((policy, info.from.as_str(), intent, metadata))?;
        Ok(Some(pyo3_async_runtimes::into_future_with_locals(&locals, coroutine)?))
    });
    let verdict = match pending {
        Ok(None) => return true,
        Ok(Some(verdict)) => match tokio::time::timeout(POLICY_TIMEOUT, verdict).await {
            Ok(Ok(value)) => Python::attach(|py| value.bind(py).is_truthy()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(new_err(
                Kind::State,
                format!("the KNOCK policy did not answer within {POLICY_TIMEOUT:?}"),
            )),
        },
        Err(e) => Err(e),
    };
    verdict.unwrap_or_else(|e| {
        Python::attach(|py| e.write_unraisable(py, None));
        false
    })
}

/// A message received from a peer.
#[pyclass(frozen, name = "Message", module = "meshwire")]
pub struct PyMessage {
    message: Message,
    payload: PyOnceLock<Py<PyAny>>,
}

impl PyMessage {
    fn new(message: Message) -> Self {
        Self {
            message,
            payload: PyOnceLock::new(),
        }
    }
}

#[pymethods]
impl PyMessage {
    /// The sender's DID.
    #[getter]
    fn sender(&self) -> &str {
        &self.message.from
    }

    /// The message id.
    #[getter]
    fn id(&self) -> &str {
        &self.message.id
    }

    /// The decoded JSON value, or `bytes` for what was sent as bytes.
    #[getter]
    fn payload(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.payload
            .get_or_try_init(py, || -> PyResult<Py<PyAny>> {
                Ok(match &self.message.payload {
                    Payload::Json(value) => json_to_py(py, value)?.unbind(),
                    Payload::Bytes(bytes) => PyBytes::new(py, bytes).into_any().unbind(),
                })
            })
            .map(|p| p.clone_ref(py))
    }

    /// The decrypted bytes exactly as the sender encrypted them.
    #[getter]
    fn raw<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.message.raw)
    }

    /// Whether the payload arrived as bytes (`send(did, b"...")`).
    #[getter]
    fn is_bytes(&self) -> bool {
        matches!(self.message.payload, Payload::Bytes(_))
    }

    /// Sent in plaintext by an allow-listed peer (never, unless allowed).
    #[getter]
    fn plaintext(&self) -> bool {
        self.message.plaintext
    }

    /// Loaded from the store after a restart, unacknowledged: the
    /// application may have seen it before the process stopped (or not).
    #[getter]
    fn redelivered(&self) -> bool {
        self.message.redelivered
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let payload = self.payload(py)?;
        Ok(format!(
            "Message(sender={:?}, id={:?}, payload={})",
            self.message.from,
            self.message.id,
            payload.bind(py).repr()?
        ))
    }
}

fn error_kind_name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Frame => "frame",
        ErrorKind::UnknownFrame => "unknown_frame",
        ErrorKind::Decrypt => "decrypt",
        ErrorKind::NoSession => "no_session",
        ErrorKind::Knock => "knock",
        ErrorKind::Plaintext => "plaintext",
        ErrorKind::Relay => "relay",
        ErrorKind::Rollback => "rollback",
    }
}

/// Something that happened besides messages. `kind` is one of
/// `connected`, `reconnected`, `disconnected`, `taken_over`, `rejected`,
/// `knock`, `knock_accepted`, `knock_rejected`, `session_established`,
/// `session_replaced`, `delivered`, `reregistered`, `registry_error`,
/// `store_error`, `relay_changed`, `error`; the other attributes are set
/// where they apply and `None` elsewhere.
#[pyclass(frozen, name = "Event", module = "meshwire")]
pub struct PyEvent {
    event: ClientEvent,
}

#[pymethods]
impl PyEvent {
    #[getter]
    fn kind(&self) -> &'static str {
        match &self.event {
            ClientEvent::Connected { reconnect: false } => "connected",
            ClientEvent::Connected { reconnect: true } => "reconnected",
            ClientEvent::Disconnected { .. } => "disconnected",
            ClientEvent::Displaced { .. } => "displaced",
            ClientEvent::TakenOver { .. } => "taken_over",
            ClientEvent::Rejected { .. } => "rejected",
            ClientEvent::Knock { .. } => "knock",
            ClientEvent::KnockAccepted { .. } => "knock_accepted",
            ClientEvent::KnockRejected { .. } => "knock_rejected",
            ClientEvent::SessionEstablished { .. } => "session_established",
            ClientEvent::SessionReplaced { .. } => "session_replaced",
            ClientEvent::Delivered { .. } => "delivered",
            ClientEvent::Reregistered { .. } => "reregistered",
            ClientEvent::RegistryError { .. } => "registry_error",
            ClientEvent::StoreError { .. } => "store_error",
            ClientEvent::Error { .. } => "error",
            ClientEvent::RelayChanged { .. } => "relay_changed",
            _ => "other",
        }
    }

    /// The peer concerned (the knocking agent for `knock`).
    #[getter]
    fn peer(&self) -> Option<&str> {
        match &self.event {
            ClientEvent::Knock { from, .. }
            | ClientEvent::KnockAccepted { from }
            | ClientEvent::KnockRejected { from, .. } => Some(from),
            ClientEvent::SessionEstablished { peer }
            | ClientEvent::SessionReplaced { peer }
            | ClientEvent::Delivered { peer, .. } => Some(peer),
            ClientEvent::Error { peer, .. } => peer.as_deref(),
            _ => None,
        }
    }

    /// The WebSocket close code (`disconnected`, `rejected`).
    #[getter]
    fn code(&self) -> Option<u16> {
        match &self.event {
            ClientEvent::Disconnected { code, .. } => *code,
            ClientEvent::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Why (`disconnected`, `displaced`, `taken_over`, `rejected`,
    /// `knock_rejected`).
    #[getter]
    fn reason(&self) -> Option<&str> {
        match &self.event {
            ClientEvent::Disconnected { reason, .. }
            | ClientEvent::TakenOver { reason }
            | ClientEvent::Displaced { reason, .. }
            | ClientEvent::Rejected { reason, .. } => Some(reason),
            ClientEvent::KnockRejected { reason, .. } => reason.as_deref(),
            ClientEvent::Reregistered { reason } => Some(reason),
            _ => None,
        }
    }

    /// The relay joined now (`relay_changed`).
    #[getter]
    fn url(&self) -> Option<&str> {
        match &self.event {
            ClientEvent::RelayChanged { url, .. } => Some(url),
            _ => None,
        }
    }

    /// The KNOCK policy's verdict (`knock`).
    #[getter]
    fn accepted(&self) -> Option<bool> {
        match &self.event {
            ClientEvent::Knock { accepted, .. } => Some(*accepted),
            _ => None,
        }
    }

    /// Message ids the peer confirmed (`delivered`).
    #[getter]
    fn ids(&self) -> Option<Vec<String>> {
        match &self.event {
            ClientEvent::Delivered { ids, .. } => Some(ids.clone()),
            _ => None,
        }
    }

    /// What went wrong (`error`, `registry_error`, `store_error`).
    #[getter]
    fn detail(&self) -> Option<&str> {
        match &self.event {
            ClientEvent::Error { detail, .. }
            | ClientEvent::RegistryError { detail, .. }
            | ClientEvent::StoreError { detail } => Some(detail),
            _ => None,
        }
    }

    /// `frame`, `unknown_frame`, `decrypt`, `no_session`, `knock`,
    /// `plaintext` or `relay` (`error`).
    #[getter]
    fn error_kind(&self) -> Option<&'static str> {
        match &self.event {
            ClientEvent::Error { kind, .. } => Some(error_kind_name(*kind)),
            _ => None,
        }
    }

    fn __repr__(&self) -> String {
        let mut parts = vec![format!("kind={:?}", self.kind())];
        if let Some(peer) = self.peer() {
            parts.push(format!("peer={peer:?}"));
        }
        if let Some(code) = self.code() {
            parts.push(format!("code={code}"));
        }
        if let Some(reason) = self.reason() {
            parts.push(format!("reason={reason:?}"));
        }
        if let Some(accepted) = self.accepted() {
            parts.push(format!("accepted={}", if accepted { "True" } else { "False" }));
        }
        if let Some(ids) = self.ids() {
            parts.push(format!("ids={ids:?}"));
        }
        if let Some(kind) = self.error_kind() {
            parts.push(format!("error_kind={kind:?}"));
        }
        if let Some(detail) = self.detail() {
            parts.push(format!("detail={detail:?}"));
        }
        format!("Event({})", parts.join(", "))
    }
}

fn discover_results(py: Python<'_>, hits: Vec<DiscoverResult>) -> PyResult<Bound<'_, PyAny>> {
    let list = PyList::empty(py);
    for hit in hits {
        let dict = PyDict::new(py);
        dict.set_item("did", hit.did.as_str())?;
        dict.set_item("capabilities", hit.capabilities)?;
        dict.set_item("last_seen", hit.last_seen.map(|t| t.0))?;
        dict.set_item("reputation_score", hit.reputation_score)?;
        dict.set_item("metadata", hit.metadata)?;
        list.append(dict)?;
    }
    Ok(list.into_any())
}

enum Body {
    Bytes(Vec<u8>),
    Json(String),
}

/// An agent on the mesh.
#[pyclass(frozen, name = "MeshClient", module = "meshwire")]
pub struct PyMeshClient {
    shared: Arc<Shared>,
}

impl PyMeshClient {
    fn start_connect<'py, T>(
        &self,
        py: Python<'py>,
        done: impl FnOnce() -> T + Send + 'static,
    ) -> PyResult<Bound<'py, PyAny>>
    where
        T: for<'a> IntoPyObject<'a> + Send + 'static,
    {
        let locals = current_locals(py)?;
        self.shared.begin_connect()?;
        *lock(&self.shared.locals) = Some(locals.clone());
        let shared = self.shared.clone();
        let result = awaitable_with_locals(py, locals, async move {
            shared.connect().await?;
            Ok(done())
        });
        if result.is_err() {
            lock(&self.shared.state).connecting = false;
        }
        result
    }
}

#[pymethods]
impl PyMeshClient {
    #[new]
    #[pyo3(signature = (
        identity,
        *,
        relay_url,
        registry_url,
        display_name = None,
        capabilities = Vec::new(),
        store_dir = None,
        knock_policy = None,
        metadata = None,
        connect_timeout = 10.0,
        relay_token = None,
        manual_ack = false,
        fallback_relay_urls = Vec::new(),
        fallback_registry_urls = Vec::new(),
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        identity: &Bound<'_, PyIdentity>,
        relay_url: String,
        registry_url: String,
        display_name: Option<String>,
        capabilities: Vec<String>,
        store_dir: Option<PathBuf>,
        knock_policy: Option<Py<PyAny>>,
        metadata: Option<BTreeMap<String, String>>,
        connect_timeout: f64,
        relay_token: Option<String>,
        manual_ack: bool,
        fallback_relay_urls: Vec<String>,
        fallback_registry_urls: Vec<String>,
    ) -> PyResult<Self> {
        check_callable(&knock_policy, py)?;
        let mut config = ClientConfig::new(relay_url, registry_url);
        config.fallback_relay_urls = fallback_relay_urls;
        config.fallback_registry_urls = fallback_registry_urls;
        config.display_name = display_name;
        config.capabilities = capabilities;
        config.metadata = metadata.unwrap_or_default();
        config.connect_timeout = duration(Some(connect_timeout))?.unwrap_or(config.connect_timeout);
        config.relay_token = relay_token.map(zeroize::Zeroizing::new);
        config.manual_ack = manual_ack;
        let (closed, _) = watch::channel(false);
        Ok(Self {
            shared: Arc::new(Shared {
                identity: identity.get().copy(),
                config,
                store_dir,
                policy: Mutex::new(knock_policy),
                locals: Mutex::new(None),
                state: Mutex::new(State {
                    client: None,
                    connecting: false,
                    closed: false,
                }),
                closed,
            }),
        })
    }

    /// This agent's DID.
    #[getter]
    fn did(&self) -> &str {
        self.shared.identity.did().as_str()
    }

    /// Whether the relay connection is up right now.
    #[getter]
    fn connected(&self) -> bool {
        let state = lock(&self.shared.state);
        !state.closed && state.client.as_ref().is_some_and(|c| c.is_connected())
    }

    #[getter]
    fn closed(&self) -> bool {
        lock(&self.shared.state).closed
    }

    /// Registers, publishes pre-keys and joins the relay.
    fn connect<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.start_connect(py, || ())
    }

    fn __aenter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let me = slf.clone().unbind();
        slf.get().start_connect(slf.py(), move || me)
    }

    /// Sends `disconnect` and stops. Messages already received can still be
    /// read (`drain()`, `recv()`), nothing can be sent.
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.shared.mark_closed();
        awaitable(py, async move {
            if let Some(client) = client {
                client.close().await;
            }
            Ok(())
        })
    }

    fn __aexit__<'py>(
        &self,
        py: Python<'py>,
        _exc_type: &Bound<'py, PyAny>,
        _exc: &Bound<'py, PyAny>,
        _traceback: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.shared.mark_closed();
        awaitable(py, async move {
            if let Some(client) = client {
                client.close().await;
            }
            Ok(false)
        })
    }

    /// Sends `payload` to `peer` end to end encrypted, opening a session
    /// first if needed; resolves to the message id. `bytes`-like payloads
    /// go as bytes, anything else as JSON (`json.dumps` with
    /// `separators=(",", ":")`, `ensure_ascii=False`: the bytes
    /// `JSON.stringify` produces).
    fn send<'py>(&self, py: Python<'py>, peer: String, payload: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.shared.live()?;
        let body = if let Ok(bytes) = payload.cast::<PyBytes>() {
            Body::Bytes(bytes.as_bytes().to_vec())
        } else if let Ok(bytes) = payload.cast::<PyByteArray>() {
            Body::Bytes(bytes.to_vec())
        } else if payload.is_instance_of::<PyMemoryView>() {
            let bytes = py.import("builtins")?.getattr("bytes")?.call1((payload,))?;
            Body::Bytes(bytes.cast::<PyBytes>()?.as_bytes().to_vec())
        } else {
            Body::Json(dumps(payload)?)
        };
        awaitable(py, async move {
            match body {
                Body::Bytes(bytes) => client.send_bytes(&peer, &bytes).await,
                Body::Json(text) => client.send_json_text(&peer, text.as_bytes()).await,
            }
            .py()
        })
    }

    /// The next message; waits at most `timeout` seconds (forever if None).
    /// Raises `MeshTimeoutError` on timeout, `ClosedError` once the client
    /// is closed and nothing is left.
    #[pyo3(signature = (timeout = None))]
    fn recv<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.shared.reader()?;
        let timeout = duration(timeout)?;
        awaitable(py, async move {
            let message = match timeout {
                None => client.recv().await.ok_or(ClientError::Closed),
                Some(t) => client.recv_timeout(t).await,
            };
            Ok(PyMessage::new(message.py()?))
        })
    }

    /// The next message from any of `senders`; others stay queued.
    #[pyo3(signature = (senders, timeout = None))]
    fn recv_from_any<'py>(
        &self,
        py: Python<'py>,
        senders: Vec<String>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let client = self.shared.reader()?;
        let timeout = duration(timeout)?.unwrap_or(FOREVER);
        awaitable(py, async move {
            let senders: Vec<&str> = senders.iter().map(String::as_str).collect();
            Ok(PyMessage::new(client.recv_from_any(&senders, timeout).await.py()?))
        })
    }

    /// One message from each of `senders`, waiting at most `timeout` in
    /// all; what arrived (fewer on timeout), in arrival order.
    fn gather<'py>(&self, py: Python<'py>, senders: Vec<String>, timeout: f64) -> PyResult<Bound<'py, PyAny>> {
        let client = self.shared.reader()?;
        let timeout = duration(Some(timeout))?.unwrap_or_default();
        awaitable(py, async move {
            let senders: Vec<&str> = senders.iter().map(String::as_str).collect();
            let messages = client.gather(&senders, timeout).await;
            Ok(messages.into_iter().map(PyMessage::new).collect::<Vec<_>>())
        })
    }

    /// Acknowledges `message`: it leaves the durable inbox and is never
    /// handed over again, even after a crash. Returns False if it was
    /// acknowledged already. Needed with `manual_ack=True`; otherwise the
    /// next receive call (or the next step of `async for`) acknowledges the
    /// messages handed over before it.
    fn ack(&self, message: &PyMessage) -> PyResult<bool> {
        self.shared.reader()?.ack(&message.message).py()
    }

    /// Every message already received, without waiting.
    fn drain(&self) -> PyResult<Vec<PyMessage>> {
        Ok(self.shared.reader()?.drain().into_iter().map(PyMessage::new).collect())
    }

    /// `async for message in client.messages()`: ends when the client is
    /// closed.
    fn messages(&self) -> PyResult<MessageIterator> {
        self.shared.reader()?;
        Ok(MessageIterator {
            shared: self.shared.clone(),
        })
    }

    fn __aiter__(&self) -> PyResult<MessageIterator> {
        self.messages()
    }

    /// The next event; `None` if none came within `timeout` seconds.
    #[pyo3(signature = (timeout = None))]
    fn next_event<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.shared.reader()?;
        let mut closed = self.shared.closed.subscribe();
        let timeout = duration(timeout)?;
        awaitable(py, async move {
            let next = async {
                tokio::select! {
                    biased;
                    event = client.next_event() => event,
                    _ = closed.wait_for(|c| *c) => None,
                }
            };
            let event = match timeout {
                None => next.await,
                Some(t) => match tokio::time::timeout(t, next).await {
                    Ok(event) => event,
                    Err(_) => return Ok(None),
                },
            };
            match event {
                Some(event) => Ok(Some(PyEvent { event })),
                None => Err(new_err(Kind::Closed, "the client is closed")),
            }
        })
    }

    /// `async for event in client.events()`: ends when the client is
    /// closed.
    fn events(&self) -> PyResult<EventIterator> {
        self.shared.reader()?;
        Ok(EventIterator {
            shared: self.shared.clone(),
        })
    }

    /// Agents advertising `capability`: dicts with `did`, `capabilities`,
    /// `last_seen` (ms since the epoch), `reputation_score`, `metadata`.
    fn discover<'py>(&self, py: Python<'py>, capability: String) -> PyResult<Bound<'py, PyAny>> {
        let client = self.shared.live()?;
        awaitable(py, async move {
            let hits = client.discover(&capability).await.py()?;
            Ok(Deferred::new(move |py| discover_results(py, hits)))
        })
    }

    /// The DID of the agent published as `display_name` (the most recently
    /// seen one), or None.
    fn find<'py>(&self, py: Python<'py>, display_name: String) -> PyResult<Bound<'py, PyAny>> {
        let client = self.shared.live()?;
        awaitable(py, async move { client.find(&display_name).await.py() })
    }

    /// Replaces the KNOCK policy: `policy(from_did, intent, metadata)`
    /// returning a bool, or an awaitable of one (run on the client's event
    /// loop). None accepts every KNOCK. An exception or a policy slower
    /// than 30 s rejects.
    fn set_knock_policy(&self, py: Python<'_>, policy: Option<Py<PyAny>>) -> PyResult<()> {
        check_callable(&policy, py)?;
        if let Ok(locals) = current_locals(py) {
            let mut slot = lock(&self.shared.locals);
            if slot.is_none() {
                *slot = Some(locals);
            }
        }
        *lock(&self.shared.policy) = policy;
        Ok(())
    }

    /// Messages to `peer` not yet confirmed by a delivery receipt.
    fn unconfirmed(&self, peer: &str) -> PyResult<usize> {
        Ok(self.shared.reader()?.unconfirmed(peer))
    }

    fn __repr__(&self) -> String {
        let state = lock(&self.shared.state);
        let status = match (&state.client, state.closed, state.connecting) {
            (_, true, _) => "closed",
            (Some(_), false, _) => "connected",
            (None, false, true) => "connecting",
            (None, false, false) => "not connected",
        };
        format!("MeshClient(did={:?}, {status})", self.shared.identity.did().as_str())
    }
}

/// `async for message in client.messages()`.
#[pyclass(frozen, name = "MessageIterator", module = "meshwire")]
pub struct MessageIterator {
    shared: Arc<Shared>,
}

#[pymethods]
impl MessageIterator {
    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.shared.reader()?;
        awaitable(py, async move {
            match client.recv().await {
                Some(message) => Ok(PyMessage::new(message)),
                None => Err(PyStopAsyncIteration::new_err(())),
            }
        })
    }
}

/// `async for event in client.events()`.
#[pyclass(frozen, name = "EventIterator", module = "meshwire")]
pub struct EventIterator {
    shared: Arc<Shared>,
}

#[pymethods]
impl EventIterator {
    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let client = self.shared.reader()?;
        let mut closed = self.shared.closed.subscribe();
        awaitable(py, async move {
            let event = tokio::select! {
                biased;
                event = client.next_event() => event,
                _ = closed.wait_for(|c| *c) => None,
            };
            match event {
                Some(event) => Ok(PyEvent { event }),
                None => Err(PyStopAsyncIteration::new_err(())),
            }
        })
    }
}
