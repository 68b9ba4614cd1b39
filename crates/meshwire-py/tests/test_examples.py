"""examples/python: the echo agent and the ping client against `meshwire
serve`, and the ping client against the Rust echo agent."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO, Process, unique

EXAMPLES = REPO / "examples" / "python"


def ping(backend, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / "ping.py"), "--relay", backend.relay_url, "--registry",
         backend.registry_url, "--name", name, "--count", "3"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def test_python_echo_agent_and_ping(meshwire_server):
    name = unique("py-echo")
    agent = Process(
        "py-echo",
        [sys.executable, str(EXAMPLES / "echo_agent.py"), "--relay", meshwire_server.relay_url,
         "--registry", meshwire_server.registry_url, "--name", name],
        stdout=subprocess.PIPE,
    )
    try:
        assert agent.proc.stdout is not None
        did = agent.proc.stdout.readline().decode().strip()
        assert did.startswith("did:mesh:"), agent.log()
        result = ping(meshwire_server, name)
        assert result.returncode == 0, result.stderr + agent.log()
        lines = result.stdout.splitlines()
        assert lines[0] == f"{name} is {did}"
        assert [line.split(" in ")[0] for line in lines[1:]] == [f"ping {n}: echo" for n in (1, 2, 3)]
    finally:
        agent.stop()


def test_ping_rust_echo(meshwire_server, echo_agent):
    echo = echo_agent()
    result = ping(meshwire_server, echo.name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"{echo.name} is {echo.did}"


def test_ping_fails_without_agent(meshwire_server):
    result = ping(meshwire_server, unique("nobody"))
    assert result.returncode == 1
    assert "no agent named" in result.stderr
