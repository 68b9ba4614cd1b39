"""A synchronous, thread-safe meshwire client.

:class:`MeshClient` has the features of the asyncio :class:`meshwire.MeshClient`
(which it wraps) for code that calls tools synchronously, such as agent
runtimes' plugins::

    import meshwire
    from meshwire.sync import MeshClient

    me = meshwire.Identity.generate()   # or meshwire.Identity.load("agent.json")
    with MeshClient(me, relay_url="ws://127.0.0.1:8765/ws",
                    registry_url="http://127.0.0.1:8765", display_name="alice") as client:
        bob = client.find("bob")
        client.send(bob, {"text": "hello"})
        print(client.recv(timeout=30).payload)

Every client runs one background thread with its own asyncio event loop;
each call submits a coroutine to it and waits for the result, so any
number of threads may call one client at once. The KNOCK policy runs on
that loop thread. ``close()`` (or leaving the ``with`` block) closes the
client and stops the thread; so does garbage collection of an unclosed
client, at interpreter exit at the latest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from types import TracebackType
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Type, TypeVar, Union

import meshwire as _native  # the package: the extension module's names, re-exported (imported first)

__all__ = ["MeshClient"]

_T = TypeVar("_T")
_Path = Union[str, "os.PathLike[str]"]
_KnockPolicy = Callable[[str, Any, Optional[Dict[str, str]]], Union[bool, Awaitable[bool]]]

#: How long ``close()`` waits for the background loop thread to finish.
CLOSE_TIMEOUT = 10.0


class _LoopThread:
    """One asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                pending = asyncio.all_tasks(self.loop)
                for task in pending:
                    task.cancel()
                if pending:
                    self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            finally:
                self.loop.close()

    def submit(self, make: Callable[[], Awaitable[_T]]) -> _T:
        """Runs the awaitable ``make()`` returns on the loop (``make`` is
        called there: the extension binds awaitables to the running loop)
        and waits for its result; exceptions propagate unchanged."""
        if threading.current_thread() is self.thread:
            raise RuntimeError("meshwire.sync.MeshClient called from its own loop thread (from a KNOCK policy?)")

        async def run() -> _T:
            return await make()

        coroutine = run()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except RuntimeError:
            # The loop is closed: the client was closed.
            coroutine.close()
            raise _native.ClosedError("the client is closed") from None
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise _native.ClosedError("the client is closed") from None
        except BaseException:
            future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return
        if threading.current_thread() is not self.thread:
            self.thread.join(CLOSE_TIMEOUT)


class MeshClient:
    """An agent on the mesh, called synchronously from any thread.

    Takes the arguments of :class:`meshwire.MeshClient`. ``relay_url``: a
    URL with a path is used as given, a bare ``ws(s)://host:port`` or
    ``http(s)://host:port`` gets ``/ws``. ``relay_token``: the relay's
    shared secret, if it was started with one. Errors are those of the
    asyncio client (``RelayError`` naming the cause when joining the relay
    fails, ``MeshTimeoutError``, ``ClosedError``...).
    """

    def __init__(
        self,
        identity: _native.Identity,
        *,
        relay_url: str,
        registry_url: str,
        display_name: Optional[str] = None,
        capabilities: Sequence[str] = (),
        store_dir: Optional[_Path] = None,
        knock_policy: Optional[_KnockPolicy] = None,
        metadata: Optional[Mapping[str, str]] = None,
        connect_timeout: float = 10.0,
        relay_token: Optional[str] = None,
        manual_ack: bool = False,
    ) -> None:
        self._client = _native.MeshClient(
            identity,
            relay_url=relay_url,
            registry_url=registry_url,
            display_name=display_name,
            capabilities=list(capabilities),
            store_dir=store_dir,
            knock_policy=knock_policy,
            metadata=dict(metadata) if metadata is not None else None,
            connect_timeout=connect_timeout,
            relay_token=relay_token,
            manual_ack=manual_ack,
        )
        self._loop = _LoopThread(f"meshwire-sync-{self._client.did[-8:]}")
        self._close_lock = threading.Lock()

    # -------------------------------------------------------------- lifecycle

    @property
    def did(self) -> str:
        """This agent's DID."""
        return self._client.did

    @property
    def connected(self) -> bool:
        """Whether the relay connection is up right now."""
        return self._client.connected

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called."""
        return self._client.closed

    def connect(self) -> None:
        """Registers (proof of possession), publishes pre-keys and joins the
        relay. ``RegistryError``/``RelayError`` if they cannot be used."""
        self._loop.submit(self._client.connect)

    def close(self) -> None:
        """Sends ``disconnect``, closes and stops the loop thread;
        idempotent. What was received can still be read with ``drain()``."""
        with self._close_lock:
            if self._loop.loop.is_closed():
                return
            try:
                self._loop.submit(self._client.close)
            finally:
                self._loop.stop()

    def __enter__(self) -> "MeshClient":
        try:
            self.connect()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()

    def __del__(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is not None:
            loop.stop()

    def __repr__(self) -> str:
        return f"<meshwire.sync.MeshClient {self.did} connected={self.connected}>"

    # --------------------------------------------------------------- sending

    def send(self, peer: str, payload: Union[Any, bytes, bytearray, memoryview]) -> str:
        """Sends ``payload`` (JSON value or bytes-like) end to end encrypted,
        opening a session first if needed; returns the message id."""
        return self._loop.submit(lambda: self._client.send(peer, payload))

    # ------------------------------------------------------------- receiving

    def recv(self, timeout: Optional[float] = None) -> _native.Message:
        """The next message (``MeshTimeoutError`` after ``timeout`` seconds,
        ``ClosedError`` once closed and empty)."""
        return self._loop.submit(lambda: self._client.recv(timeout))

    def recv_from_any(self, senders: Sequence[str], timeout: Optional[float] = None) -> _native.Message:
        """The next message from one of ``senders``; others stay queued."""
        return self._loop.submit(lambda: self._client.recv_from_any(list(senders), timeout))

    def gather(self, senders: Sequence[str], timeout: float) -> List[_native.Message]:
        """One message from each sender, within ``timeout`` in all."""
        return self._loop.submit(lambda: self._client.gather(list(senders), timeout))

    def drain(self) -> List[_native.Message]:
        """Every message already received, without waiting."""
        return self._client.drain()

    def ack(self, message: _native.Message) -> bool:
        """Acknowledges ``message``: it is never handed over again, even
        after a crash (False if it was acknowledged already). Needed with
        ``manual_ack=True``; otherwise the next receive call (or the next
        step of ``for msg in client``) acknowledges what came before."""
        return self._client.ack(message)

    def messages(self, timeout: Optional[float] = None) -> Iterator[_native.Message]:
        """``for msg in client.messages():`` until the client closes (or,
        with ``timeout``, until no message came for that long)."""
        while True:
            try:
                yield self.recv(timeout)
            except (_native.ClosedError, _native.MeshTimeoutError):
                return

    def __iter__(self) -> Iterator[_native.Message]:
        return self.messages()

    def next_event(self, timeout: Optional[float] = None) -> Optional[_native.Event]:
        """The next event, or ``None`` if none came within ``timeout``."""
        return self._loop.submit(lambda: self._client.next_event(timeout))

    def events(self, timeout: Optional[float] = None) -> Iterator[_native.Event]:
        """``for ev in client.events():`` until the client closes (or, with
        ``timeout``, until no event came for that long)."""
        while not self.closed:
            try:
                event = self.next_event(timeout)
            except _native.ClosedError:
                return
            if event is None:
                if timeout is not None:
                    return
                continue
            yield event

    # -------------------------------------------------------------- registry

    def discover(self, capability: str) -> List[Dict[str, Any]]:
        """Agents advertising ``capability`` (dicts as the asyncio client's)."""
        return self._loop.submit(lambda: self._client.discover(capability))

    def find(self, display_name: str) -> Optional[str]:
        """The DID published under ``display_name`` (most recently seen), or None."""
        return self._loop.submit(lambda: self._client.find(display_name))

    # ----------------------------------------------------------------- other

    def set_knock_policy(self, policy: Optional[_KnockPolicy]) -> None:
        """Decides on incoming KNOCKs (sync or ``async def``), run on the
        client's loop thread; it must not call this client. None accepts all."""
        self._client.set_knock_policy(policy)

    def unconfirmed(self, peer: str) -> int:
        """Messages to ``peer`` not yet confirmed by a delivery receipt."""
        return self._client.unconfirmed(peer)

    @property
    def asyncio_client(self) -> _native.MeshClient:
        """The wrapped asyncio client (its awaitables belong to the loop thread)."""
        return self._client
