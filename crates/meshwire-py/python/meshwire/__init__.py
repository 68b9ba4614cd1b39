"""AgentMesh end-to-end encrypted agent-to-agent messaging: Rust core,
asyncio API (:class:`MeshClient`) and a synchronous, thread-safe one
(:class:`meshwire.sync.MeshClient`)."""

from .meshwire import *  # noqa: F401,F403  (the extension module's classes and errors)
from .meshwire import __all__ as _native_all
from .meshwire import __version__  # noqa: F401
from . import sync  # noqa: F401

__all__ = [*_native_all, "sync"]
