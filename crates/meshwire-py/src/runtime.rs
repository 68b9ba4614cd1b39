//! The module's tokio runtime and the bridge to asyncio.
//!
//! The runtime is created on first use and shut down by an `atexit` hook, so
//! no worker thread touches the interpreter while it finalises. Awaitables
//! come from `pyo3_async_runtimes::generic`, driven by this runtime rather
//! than a global one that could never be shut down; cancelling the asyncio
//! future drops the Rust future.

use crate::errors::{new_err, Kind};
use pyo3::prelude::*;
use pyo3_async_runtimes::generic::{self, ContextExt};
use pyo3_async_runtimes::TaskLocals;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::runtime::{Builder, Handle, Runtime};

static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);
static SHUT_DOWN: AtomicBool = AtomicBool::new(false);

fn runtime_slot() -> std::sync::MutexGuard<'static, Option<Runtime>> {
    RUNTIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The runtime's handle, creating the runtime on first use; `None` once it
/// was shut down (or could not be built).
pub fn handle() -> Option<Handle> {
    let mut slot = runtime_slot();
    if let Some(runtime) = slot.as_ref() {
        return Some(runtime.handle().clone());
    }
    if SHUT_DOWN.load(Ordering::SeqCst) {
        return None;
    }
    let runtime = Builder::new_multi_thread()
        .enable_all()
        .thread_name("meshwire-tokio")
        .build()
        .ok()?;
    let handle = runtime.handle().clone();
    *slot = Some(runtime);
    Some(handle)
}

/// The handle if the runtime is running, without creating it.
pub fn running_handle() -> Option<Handle> {
    runtime_slot().as_ref().map(|r| r.handle().clone())
}

/// Stops the runtime (registered with `atexit`): running tasks are dropped,
/// worker threads joined for at most two seconds. Later calls that need
/// the runtime raise `ClosedError`.
#[pyfunction]
pub fn _shutdown_runtime(py: Python<'_>) {
    SHUT_DOWN.store(true, Ordering::SeqCst);
    let runtime = runtime_slot().take();
    if let Some(runtime) = runtime {
        // Tasks finishing now may need the GIL to resolve their futures.
        py.detach(move || runtime.shutdown_timeout(Duration::from_secs(2)));
    }
}

/// `pyo3_async_runtimes`' view of the module runtime.
pub struct MeshRuntime;

/// A task of the module runtime.
pub struct Join(Option<tokio::task::JoinHandle<()>>);

/// A task that did not complete.
pub struct JoinFailure(tokio::task::JoinError);

impl generic::JoinError for JoinFailure {
    fn is_panic(&self) -> bool {
        self.0.is_panic()
    }

    fn into_panic(self) -> Box<dyn std::any::Any + Send + 'static> {
        match self.0.try_into_panic() {
            Ok(payload) => payload,
            Err(_) => Box::new("task cancelled"),
        }
    }
}

impl Future for Join {
    type Output = Result<(), JoinFailure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.0.as_mut() {
            Some(handle) => Pin::new(handle).poll(cx).map_err(JoinFailure),
            // The runtime is gone: the task was never started.
            None => Poll::Ready(Ok(())),
        }
    }
}

impl generic::Runtime for MeshRuntime {
    type JoinError = JoinFailure;
    type JoinHandle = Join;

    fn spawn<F>(fut: F) -> Self::JoinHandle
    where
        F: Future<Output = ()> + Send + 'static,
    {
        Join(handle().map(|h| h.spawn(fut)))
    }

    fn spawn_blocking<F>(f: F) -> Self::JoinHandle
    where
        F: FnOnce() + Send + 'static,
    {
        Join(handle().map(|h| h.spawn_blocking(f)))
    }
}

tokio::task_local! {
    static TASK_LOCALS: TaskLocals;
}

impl ContextExt for MeshRuntime {
    fn scope<F, R>(locals: TaskLocals, fut: F) -> Pin<Box<dyn Future<Output = R> + Send>>
    where
        F: Future<Output = R> + Send + 'static,
    {
        Box::pin(TASK_LOCALS.scope(locals, fut))
    }

    fn get_task_locals() -> Option<TaskLocals> {
        TASK_LOCALS.try_with(|locals| locals.clone()).ok()
    }
}

fn ensure_running() -> PyResult<()> {
    if handle().is_none() {
        return Err(new_err(
            Kind::Closed,
            "the meshwire runtime has shut down (interpreter exit)",
        ));
    }
    Ok(())
}

/// The event loop and context of the calling coroutine.
pub fn current_locals(py: Python<'_>) -> PyResult<TaskLocals> {
    generic::get_current_locals::<MeshRuntime>(py)
}

/// `fut` as an asyncio awaitable of the running loop.
pub fn awaitable<'py, F, T>(py: Python<'py>, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    ensure_running()?;
    generic::future_into_py::<MeshRuntime, F, T>(py, fut)
}

/// `fut` as an awaitable of the loop in `locals`.
pub fn awaitable_with_locals<'py, F, T>(py: Python<'py>, locals: TaskLocals, fut: F) -> PyResult<Bound<'py, PyAny>>
where
    F: Future<Output = PyResult<T>> + Send + 'static,
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    ensure_running()?;
    generic::future_into_py_with_locals::<MeshRuntime, F, T>(py, locals, fut)
}
