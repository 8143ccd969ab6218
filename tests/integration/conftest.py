"""Helpers for tests that start real Flower processes (kept isolated and always stopped)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.loopback import LoopbackFederation, stop_processes

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def readme_block(marker: str) -> str:
    """The shell command between ``<!-- marker -->`` and ``<!-- /marker -->`` in the README."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker} -->\s*```(?:bash|sh)?\n(.*?)```\s*<!-- /{marker} -->", text, re.S)
    assert match, f"README.md has no <!-- {marker} --> block"
    return match.group(1).strip()


def processes_using(path: Path) -> list[int]:
    """PIDs whose command line mentions ``path`` (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if str(path) in cmdline and int(proc.name) != os.getpid():
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def isolated_flower(tmp_path, monkeypatch):
    """A private FLWR_HOME and local-SuperLink ports; every process using them is stopped after."""
    flwr_home = tmp_path / "flwr-home"
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
        FLWR_DISABLE_UPDATE_CHECK="1",
        FEDIMAGING_HOME=str(tmp_path / "fedimaging-home"),
    )
    try:
        yield env, flwr_home
    finally:
        stop_processes(processes_using(flwr_home))


def run_shell(command: str, env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def make_federation(tmp_path: Path) -> Iterator:
    """Factory of loopback federations; every process is stopped at the end, pass or fail."""
    made: list[LoopbackFederation] = []

    def make(sites: dict[str, Path], **kwargs) -> LoopbackFederation:
        fed = LoopbackFederation(tmp_path / f"fed{len(made)}", sites, **kwargs)
        made.append(fed)
        fed.init()
        return fed

    try:
        yield make
    finally:
        for fed in made:
            fed.stop()
