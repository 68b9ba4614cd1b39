"""AgentMesh end-to-end encrypted agent-to-agent messaging: Rust core, asyncio API.

High level: :class:`MeshClient` registers an agent, joins the relay and sends
and receives JSON (or bytes) end to end encrypted, opening sessions (X3DH +
KNOCK) on demand. :class:`meshwire.sync.MeshClient` is its synchronous,
thread-safe twin.

Low level, for runtimes with their own transport: :class:`Identity`,
:class:`PreKeys`, :class:`PreKeyBundle`, :class:`SecureChannel`,
:class:`Establishment`, :class:`EncryptedMessage`.
"""

import os
from types import TracebackType
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union, final

from . import sync as sync

__version__: str
__all__ = [
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
    "__version__",
    "sync",
]

#: The X3DH KDF dialects: ``"spec"`` (Signal's X3DH; TypeScript main and
#: Python agentmesh 5.0.0) and ``"legacy-ff-salt"`` (npm SDK 4.0.0).
KDF_DIALECTS: Tuple[str, str]

_Path = Union[str, "os.PathLike[str]"]
#: A decoded JSON value.
_JSON = Any
#: ``policy(from_did, intent, metadata) -> bool``, or an ``async def`` one.
_KnockPolicy = Callable[[str, _JSON, Optional[Dict[str, str]]], Union[bool, Awaitable[bool]]]

# ---------------------------------------------------------------- errors

class MeshError(Exception):
    """Base class of every error meshwire raises."""

class DecryptError(MeshError):
    """A message did not decrypt (forged, replayed, corrupted or from another session).

    The channel is unchanged."""

class RegistryError(MeshError):
    """The registry refused or failed a request."""

    #: The HTTP status, when the registry answered with one.
    status: Optional[int]

class RelayError(MeshError):
    """The relay could not be joined or refused the connection."""

class ProtocolError(MeshError, ValueError):
    """Malformed input: bad keys or lengths, bad JSON, bad DIDs, unknown KDF
    dialects, bundles whose signature does not verify."""

class StateError(MeshError):
    """Not possible in the current state (no sending chain yet, unknown
    one-time key, already connected), or a saved state is invalid."""

class ClosedError(MeshError):
    """The client is closed or was never connected, or the runtime has shut
    down at interpreter exit."""

class MeshTimeoutError(MeshError, TimeoutError):
    """Nothing arrived within the timeout."""

class StoreError(MeshError, OSError):
    """An identity or session file could not be read or written, or is
    readable by group or others."""

# ---------------------------------------------------------------- low level

@final
class Identity:
    """An agent's long-term identity: an Ed25519 key, the X25519 key derived
    from it (libsodium's ``sk_to_curve25519``) and the DID."""

    @staticmethod
    def generate() -> "Identity": ...
    @staticmethod
    def from_seed(seed: bytes) -> "Identity":
        """The identity of a 32-byte Ed25519 seed; ``ProtocolError`` otherwise."""
    @staticmethod
    def load(path: _Path) -> "Identity":
        """Loads an identity file (``save``'s or the Rust ``save_identity``'s
        format); ``StoreError`` if missing, malformed or readable by group or
        others."""
    def save(self, path: _Path) -> None:
        """Writes the identity file, mode 0600, atomically."""
    @property
    def did(self) -> str: ...
    @property
    def public_key(self) -> bytes:
        """The Ed25519 public key (32 bytes)."""
    @property
    def x25519_public_key(self) -> bytes:
        """The X25519 identity public key (32 bytes)."""
    def sign(self, message: bytes) -> bytes:
        """The Ed25519 signature (64 bytes) of ``message``."""
    def __eq__(self, other: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class PreKeyBundle:
    """A responder's public pre-keys (what the registry serves)."""

    def __new__(
        cls,
        identity_key: bytes,
        identity_key_ed: bytes,
        signed_pre_key_id: int,
        signed_pre_key: bytes,
        signed_pre_key_signature: bytes,
        one_time_pre_key_id: Optional[int] = None,
        one_time_pre_key: Optional[bytes] = None,
    ) -> "PreKeyBundle":
        """Keys are 32 bytes, the signature 64 (``ProtocolError`` otherwise);
        the one-time key id and key go together. Not verified here: call
        ``verify()`` (``SecureChannel.initiate`` does)."""
    @staticmethod
    def from_json(text: str) -> "PreKeyBundle":
        """Parses the registry's bundle JSON; ``ProtocolError`` if malformed."""
    def to_json(self) -> str: ...
    def verify(self) -> None:
        """Raises ``ProtocolError`` unless the signed pre-key's signature
        verifies under ``identity_key_ed``."""
    @property
    def identity_key(self) -> bytes: ...
    @property
    def identity_key_ed(self) -> bytes: ...
    @property
    def signed_pre_key_id(self) -> int: ...
    @property
    def signed_pre_key(self) -> bytes: ...
    @property
    def signed_pre_key_signature(self) -> bytes: ...
    @property
    def one_time_pre_key_id(self) -> Optional[int]: ...
    @property
    def one_time_pre_key(self) -> Optional[bytes]: ...
    def __eq__(self, other: object, /) -> bool: ...

@final
class PreKeys:
    """A responder's private pre-keys: one signed pre-key and the one-time
    pre-keys not used yet. One-time key ids are never reused."""

    @staticmethod
    def generate(identity: Identity) -> "PreKeys":
        """A fresh signed pre-key (id 0) signed by ``identity``; no one-time keys."""
    def generate_one_time_keys(self, count: int) -> List[int]:
        """Draws ``count`` one-time keys; returns their ids."""
    def bundle(self, identity: Identity, otk_id: Optional[int] = None) -> PreKeyBundle:
        """The public bundle, with one-time key ``otk_id`` (``StateError`` if
        it is not held) or without one."""
    def remove_one_time_key(self, otk_id: int) -> None:
        """``StateError`` if the key is not held."""
    @property
    def one_time_key_ids(self) -> List[int]: ...
    @property
    def signed_pre_key_id(self) -> int: ...
    @property
    def signed_pre_key(self) -> bytes:
        """The signed pre-key's public key."""
    def export_json(self) -> str:
        """The private pre-keys as JSON (secret)."""
    @staticmethod
    def import_json(identity: Identity, text: str) -> "PreKeys":
        """The inverse of ``export_json`` (``StateError`` if invalid or not
        signed by ``identity``)."""

@final
class Establishment:
    """What an initiator sends with its first message so that the responder
    can run X3DH (the KNOCK's ``{ik, ek, otk}``)."""

    def __new__(cls, identity_key: bytes, ephemeral_key: bytes, one_time_key_id: Optional[int] = None) -> "Establishment": ...
    @property
    def identity_key(self) -> bytes:
        """The initiator's X25519 identity key."""
    @property
    def ephemeral_key(self) -> bytes: ...
    @property
    def one_time_key_id(self) -> Optional[int]: ...
    def __eq__(self, other: object, /) -> bool: ...

@final
class EncryptedMessage:
    """A Double Ratchet message: header (``dh``, ``pn``, ``n``) and
    ``nonce || ciphertext || tag``."""

    def __new__(cls, dh: bytes, pn: int, n: int, ciphertext: bytes) -> "EncryptedMessage": ...
    @staticmethod
    def from_header(header: bytes, ciphertext: bytes) -> "EncryptedMessage":
        """From the 40-byte header ``dh || u32be(pn) || u32be(n)``."""
    def serialize(self) -> bytes:
        """``u32be(40) || header || ciphertext`` (the ``agentmesh`` package's
        ``EncryptedMessage.serialize()``)."""
    @staticmethod
    def deserialize(data: bytes) -> "EncryptedMessage": ...
    @property
    def dh(self) -> bytes:
        """The sender's ratchet public key."""
    @property
    def pn(self) -> int:
        """Length of the sender's previous sending chain."""
    @property
    def n(self) -> int:
        """Number of this message in its chain."""
    @property
    def header_bytes(self) -> bytes:
        """The 40-byte header the AEAD authenticates."""
    @property
    def ciphertext(self) -> bytes: ...
    def __eq__(self, other: object, /) -> bool: ...

@final
class SecureChannel:
    """An end-to-end encrypted session with one peer: X3DH plus a Double
    Ratchet whose associated data is
    ``b"<initiator DID>|<responder DID>" + IK_initiator + IK_responder``."""

    @staticmethod
    def initiate(
        identity: Identity, responder_did: str, bundle: PreKeyBundle, kdf: str = "spec"
    ) -> Tuple["SecureChannel", Establishment]:
        """Verifies ``bundle`` and runs X3DH as the initiator."""
    @staticmethod
    def accept(
        identity: Identity,
        prekeys: PreKeys,
        initiator_did: str,
        establishment: Establishment,
        first_message: EncryptedMessage,
        kdf: str = "spec",
    ) -> Tuple["SecureChannel", bytes]:
        """Runs X3DH as the responder and decrypts the first message. The
        one-time key used is removed from ``prekeys`` only if that message
        decrypted (``DecryptError`` otherwise, ``ProtocolError`` for an
        unusable establishment)."""
    @staticmethod
    def respond(
        identity: Identity,
        prekeys: PreKeys,
        initiator_did: str,
        establishment: Establishment,
        kdf: str = "spec",
    ) -> "SecureChannel":
        """The responder's channel before any message; leaves the one-time
        key in ``prekeys``."""
    def encrypt(self, plaintext: bytes) -> EncryptedMessage:
        """``StateError`` if the channel cannot send yet (a responder must
        receive first)."""
    def decrypt(self, message: EncryptedMessage) -> bytes:
        """``DecryptError`` (channel unchanged) unless the message authenticates."""
    def export_state(self) -> str:
        """The channel as JSON (secret)."""
    @staticmethod
    def import_state(state: str) -> "SecureChannel":
        """The inverse of ``export_state``; ``StateError`` if invalid."""
    def ratchet_state(self) -> Dict[str, Any]:
        """The ratchet as the ``agentmesh`` package's ``RatchetState.to_dict()``
        writes it (secret)."""
    @staticmethod
    def from_ratchet_state(
        state: Union[Mapping[str, Any], str],
        associated_data: bytes,
        local_identity_key: bytes,
        remote_identity_key: bytes,
        kdf: str = "spec",
    ) -> "SecureChannel":
        """A channel from a ``RatchetState.to_dict()`` state (or its JSON)
        and the channel's full associated data and identity keys."""
    @property
    def associated_data(self) -> bytes: ...
    @property
    def local_identity_key(self) -> bytes: ...
    @property
    def remote_identity_key(self) -> bytes: ...
    @property
    def kdf(self) -> str: ...

# ---------------------------------------------------------------- client

@final
class Message:
    """A message received from a peer."""

    @property
    def sender(self) -> str:
        """The sender's DID."""
    @property
    def id(self) -> str: ...
    @property
    def payload(self) -> Union[_JSON, bytes]:
        """The decoded JSON value, or ``bytes`` for a payload sent as bytes."""
    @property
    def raw(self) -> bytes:
        """The decrypted bytes exactly as the sender encrypted them."""
    @property
    def is_bytes(self) -> bool: ...
    @property
    def plaintext(self) -> bool:
        """Sent in plaintext by an allow-listed peer."""
    @property
    def redelivered(self) -> bool:
        """Handed over again after a restart (it was not acknowledged)."""

@final
class Event:
    """Something that happened besides messages."""

    @property
    def kind(self) -> str:
        """``connected``, ``reconnected``, ``disconnected``, ``displaced``
        (taken over; taking the DID back), ``taken_over`` (terminal),
        ``rejected``, ``knock``, ``knock_accepted``, ``knock_rejected``,
        ``session_established``, ``session_replaced``, ``delivered``,
        ``relay_changed`` (failed over to another relay of the list) or
        ``error``."""
    @property
    def peer(self) -> Optional[str]: ...
    @property
    def code(self) -> Optional[int]:
        """WebSocket close code (``disconnected``, ``rejected``)."""
    @property
    def reason(self) -> Optional[str]: ...
    @property
    def url(self) -> Optional[str]:
        """The relay joined now (``relay_changed``)."""
    @property
    def accepted(self) -> Optional[bool]:
        """The KNOCK policy's verdict (``knock``)."""
    @property
    def ids(self) -> Optional[List[str]]:
        """Message ids confirmed by the peer (``delivered``)."""
    @property
    def detail(self) -> Optional[str]: ...
    @property
    def error_kind(self) -> Optional[str]:
        """``frame``, ``unknown_frame``, ``decrypt``, ``no_session``,
        ``knock``, ``plaintext`` or ``relay`` (``error``)."""

@final
class MessageIterator:
    def __aiter__(self) -> "MessageIterator": ...
    def __anext__(self) -> Awaitable[Message]: ...

@final
class EventIterator:
    def __aiter__(self) -> "EventIterator": ...
    def __anext__(self) -> Awaitable[Event]: ...

@final
class MeshClient:
    """An agent on the mesh.

    ``async with MeshClient(identity, relay_url=..., registry_url=...) as c:``
    registers the agent (proof of possession), publishes its pre-keys and
    joins the relay; leaving the block closes it. ``relay_url``: a URL with
    a path is used as given (``http://127.0.0.1:8443/agt/relay``), a bare
    ``ws(s)://host:port`` or ``http(s)://host:port`` gets ``/ws``;
    ``registry_url`` is the registry's (``http://host:port``). With
    ``store_dir``, sessions and pre-keys persist there (one private file per
    agent) and survive restarts. ``relay_token`` is the relay's shared
    secret (``meshwire serve --relay-token``, AGT's
    ``AGENTMESH_RELAY_TOKEN``), never printed. Joining fails at once with a
    ``RelayError`` naming the cause (refused, DNS, HTTP status, TLS, a 4003/4005
    rejection with its reason). ``fallback_relay_urls`` and
    ``fallback_registry_urls``: more instances of the same cluster
    (``meshwire serve --nats``), tried in order when the one in use is down
    or drops the connection; ``connect()`` checks every URL first.
    """

    def __new__(
        cls,
        identity: Identity,
        *,
        relay_url: str,
        registry_url: str,
        display_name: Optional[str] = None,
        capabilities: Sequence[str] = ...,
        store_dir: Optional[_Path] = None,
        knock_policy: Optional[_KnockPolicy] = None,
        metadata: Optional[Mapping[str, str]] = None,
        connect_timeout: float = 10.0,
        relay_token: Optional[str] = None,
        manual_ack: bool = False,
        fallback_relay_urls: Sequence[str] = ...,
        fallback_registry_urls: Sequence[str] = ...,
    ) -> "MeshClient": ...
    @property
    def did(self) -> str: ...
    @property
    def connected(self) -> bool:
        """Whether the relay connection is up right now."""
    @property
    def closed(self) -> bool: ...
    def connect(self) -> Awaitable[None]:
        """``RegistryError`` / ``RelayError`` if the registry or relay cannot
        be used; ``StateError`` if already connected."""
    def close(self) -> Awaitable[None]:
        """Sends ``disconnect`` and stops; idempotent. What was received can
        still be read."""
    async def __aenter__(self) -> "MeshClient": ...
    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> bool: ...
    def send(self, peer: str, payload: Union[_JSON, bytes, bytearray, memoryview]) -> Awaitable[str]:
        """Sends ``payload`` end to end encrypted and resolves to the message
        id. Bytes-like payloads go as bytes; anything else as the JSON text
        ``json.dumps(payload, separators=(",", ":"), ensure_ascii=False)``
        (``TypeError``/``ValueError`` from ``json.dumps`` if it has none)."""
    def recv(self, timeout: Optional[float] = None) -> Awaitable[Message]:
        """The next message (``MeshTimeoutError`` after ``timeout`` seconds,
        ``ClosedError`` once closed and empty)."""
    def recv_from_any(self, senders: Sequence[str], timeout: Optional[float] = None) -> Awaitable[Message]:
        """The next message from one of ``senders``; others stay queued."""
    def gather(self, senders: Sequence[str], timeout: float) -> Awaitable[List[Message]]:
        """One message from each sender, within ``timeout`` in all."""
    def ack(self, message: Message) -> bool:
        """Acknowledges ``message`` durably (False if already acknowledged)."""
    def drain(self) -> List[Message]:
        """Every message already received, without waiting."""
    def messages(self) -> MessageIterator:
        """``async for msg in client.messages()``; ends when the client closes."""
    def __aiter__(self) -> MessageIterator: ...
    def next_event(self, timeout: Optional[float] = None) -> Awaitable[Optional[Event]]:
        """The next event, or ``None`` if none came within ``timeout``."""
    def events(self) -> EventIterator:
        """``async for ev in client.events()``; ends when the client closes."""
    def discover(self, capability: str) -> Awaitable[List[Dict[str, Any]]]:
        """Agents advertising ``capability``: dicts with ``did``,
        ``capabilities``, ``last_seen`` (ms since the epoch or None),
        ``reputation_score`` and ``metadata`` (None unless the registry sends it)."""
    def find(self, display_name: str) -> Awaitable[Optional[str]]:
        """The DID published under ``display_name`` (most recently seen), or None."""
    def set_knock_policy(self, policy: Optional[_KnockPolicy]) -> None:
        """Decides on incoming KNOCKs; sync or async, run on the client's
        event loop. None accepts all. An exception, or no answer within 30 s,
        rejects."""
    def unconfirmed(self, peer: str) -> int:
        """Messages to ``peer`` not yet confirmed by a delivery receipt."""
