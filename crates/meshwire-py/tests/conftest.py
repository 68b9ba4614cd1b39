"""Shared fixtures: the embedded meshwire server, the AGT 5.0.0 relay and
registry, and the Rust echo agent, each started as a subprocess on a free
loopback port and stopped afterwards."""

from __future__ import annotations

import os
import pathlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Iterator, List, Optional

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
MESHWIRE_BIN = pathlib.Path(os.environ.get("MESHWIRE_BIN", REPO / "target" / "debug" / "meshwire"))
ECHO_BIN = pathlib.Path(os.environ.get("MESHWIRE_ECHO_BIN", REPO / "target" / "debug" / "examples" / "echo"))
LOG_DIR = pathlib.Path(os.environ.get("MESHWIRE_TEST_LOGS", REPO / "target" / "py-test-logs"))


#: Why the tests that need the reference package are skipped without it.
AGENTMESH_MISSING = (
    "the reference package `agentmesh` is not installed "
    "(pip install 'agent-governance-toolkit-core[api]==5.0.0' uvicorn websockets; ci.sh does)"
)


def require_agentmesh() -> None:
    """Skips the calling test (with the reason) unless `agentmesh` imports."""
    pytest.importorskip("agentmesh", reason=AGENTMESH_MISSING)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _require(path: pathlib.Path, what: str, env: str) -> None:
    if not path.is_file():
        pytest.fail(f"{what} not found at {path}: build it (crates/meshwire-py/ci.sh does) or set {env}")


class Process:
    """A subprocess whose stderr goes to a log file, stopped on `stop()`."""

    def __init__(self, name: str, argv: List[str], stdout=subprocess.DEVNULL, env: Optional[dict] = None):
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOG_DIR / f"{name}-{os.getpid()}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=self._log, env=env, cwd=REPO
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


def wait_healthy(process: Process, url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = process.proc.poll()
        if code is not None:
            pytest.fail(f"{process.name} exited with {code}:\n{process.log()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.stop()
            pytest.fail(f"{process.name} did not become healthy at {url}:\n{process.log()}")
        time.sleep(0.1)


@dataclass
class Backend:
    name: str
    relay_url: str
    registry_url: str


@pytest.fixture(scope="session")
def meshwire_server() -> Iterator[Backend]:
    """`meshwire serve`: relay and registry on one port."""
    _require(MESHWIRE_BIN, "the meshwire CLI", "MESHWIRE_BIN")
    port = free_port()
    process = Process("meshwire-serve", [str(MESHWIRE_BIN), "serve", "--memory", "--listen", f"127.0.0.1:{port}"])
    try:
        wait_healthy(process, f"http://127.0.0.1:{port}")
        yield Backend("meshwire", f"ws://127.0.0.1:{port}", f"http://127.0.0.1:{port}")
    finally:
        process.stop()


@pytest.fixture(scope="session")
def agt_servers() -> Iterator[Backend]:
    """The reference AGT 5.0.0 relay and registry (`python -m agentmesh.relay`
    and `python -m agentmesh.registry`) from this interpreter's environment."""
    require_agentmesh()
    registry_port, relay_port = free_port(), free_port()
    common = ["--host", "127.0.0.1", "--log-level", "warning"]
    registry = Process(
        "agt-registry", [sys.executable, "-m", "agentmesh.registry", *common, "--port", str(registry_port)]
    )
    relay = Process("agt-relay", [sys.executable, "-m", "agentmesh.relay", *common, "--port", str(relay_port)])
    try:
        wait_healthy(registry, f"http://127.0.0.1:{registry_port}")
        wait_healthy(relay, f"http://127.0.0.1:{relay_port}")
        yield Backend("agt", f"ws://127.0.0.1:{relay_port}", f"http://127.0.0.1:{registry_port}")
    finally:
        relay.stop()
        registry.stop()


class EchoAgent:
    """The Rust echo example (`crates/meshwire/examples/echo.rs`)."""

    def __init__(self, backend: Backend, name: str, extra: List[str]):
        _require(ECHO_BIN, "the Rust echo example", "MESHWIRE_ECHO_BIN")
        self.name = name
        argv = [str(ECHO_BIN), "--relay", backend.relay_url, "--registry", backend.registry_url, "--name", name]
        self.process = Process(f"echo-{name}", argv + extra, stdout=subprocess.PIPE)
        lines: "queue.Queue[str]" = queue.Queue()
        stdout = self.process.proc.stdout
        assert stdout is not None
        threading.Thread(target=lambda: lines.put(stdout.readline().decode()), daemon=True).start()
        try:
            first = lines.get(timeout=60)
        except queue.Empty:
            self.process.stop()
            pytest.fail(f"the echo agent printed nothing:\n{self.process.log()}")
        self.did = first.strip()
        if not self.did.startswith("did:mesh:"):
            self.process.stop()
            pytest.fail(f"the echo agent's first line is not a DID: {first!r}\n{self.process.log()}")

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
def echo_agent(meshwire_server: Backend):
    """A factory of Rust echo agents on the embedded server."""
    agents: List[EchoAgent] = []

    def start(name: Optional[str] = None, *extra: str) -> EchoAgent:
        agent = EchoAgent(meshwire_server, name or unique("rust-echo"), list(extra))
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()
