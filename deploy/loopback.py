"""A whole deployment on one host (127.0.0.1): real SuperLink, SuperNodes and ``flwr run``.

Used by the integration tests and ``bench/deploy.py`` to exercise exactly what a coordinator and
its sites run: the material from ``deploy init`` and the scripts ``deploy/start-superlink.sh``,
``deploy/start-site.sh`` and ``deploy/register-sites.sh``. Each process gets its own FLWR_HOME,
runs in its own session, logs to a file, and is stopped with all its descendants by
:meth:`LoopbackFederation.stop` (also on failure, via the context manager).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploy.init import InitOptions, write_deployment

DEPLOY_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = DEPLOY_DIR.parent
# Flower's own local SuperLink (started by `flwr run` for simulations) uses these ports.
_RESERVED_PORTS = {39091, 39093}


def copy_checkout(dest: Path, source: Path = PROJECT_ROOT) -> Path:
    """Copy the project as a coordinator or site checks it out (code, tests, docs, scripts; no caches)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")
    dest.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        skip = {".git", ".pytest_cache", ".venv", "runs", "build", "dist"}
        if entry.name in skip or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest / entry.name, ignore=ignore, symlinks=True)
        elif entry.is_file():
            shutil.copy2(entry, dest / entry.name)
    return dest


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel picks it)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _RESERVED_PORTS:
            return port


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc), parents first."""
    children = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Proc:
    """A started process, its log file and the peak memory of its process tree (when sampled)."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    peak_tree_rss: int = 0

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def _signal(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def stop_processes(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM ``pids``, then SIGKILL whatever is left after ``grace`` s."""
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_exists(p) for p in pids):
        time.sleep(0.1)
    _signal(pids, signal.SIGKILL)


def stop_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM ``pid`` and its descendants, then SIGKILL whatever is left after ``grace`` s."""
    stop_processes(process_tree(pid), grace)
    _signal(process_tree(pid), signal.SIGKILL)  # children started while the others stopped


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().decode(errors="replace").rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


@dataclass
class LoopbackFederation:
    """Deployment material plus the processes of one loopback federation.

    ``sites`` maps site name -> prepared site dataset folder.
    """

    workdir: Path
    sites: Mapping[str, Path]
    dp_epsilon: float = 0.0
    secure_aggregation: str = "off"  # "he": deploy init also writes the CKKS keys
    port: int = field(default_factory=free_port)
    extra_env: Mapping[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    connection: str = "fedimaging"
    _sampler: threading.Thread | None = None
    _sampling: bool = False

    # ---- material -------------------------------------------------------------------------
    @property
    def deploy_dir(self) -> Path:
        return self.workdir / "deployment"

    @property
    def link_dir(self) -> Path:
        return self.deploy_dir / "superlink"

    def site_dir(self, site: str) -> Path:
        return self.deploy_dir / "sites" / site

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def init(self) -> None:
        """``deploy init`` for 127.0.0.1, data paths pointing at ``sites``."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        opts = InitOptions(
            out_dir=self.deploy_dir, sites=tuple(self.sites), hosts=("127.0.0.1",), port=self.port,
            data_path=str(self.workdir / "data-path-{site}"), state_dir=str(self.workdir / "state" / "{site}"),
            dp_epsilon=self.dp_epsilon, secure_aggregation=self.secure_aggregation,
        )
        write_deployment(opts)
        # Point each node config at its dataset (deploy init writes one template for all sites).
        for site, data in self.sites.items():
            cfg = self.site_dir(site) / "node-config.toml"
            text = cfg.read_text(encoding="utf-8").replace(
                str(self.workdir / f"data-path-{site}"), str(Path(data).resolve())
            )
            cfg.write_text(text, encoding="utf-8")

    def env(self, role: str, **extra: str) -> dict[str, str]:
        """Environment of one process: own FLWR_HOME, shared FEDIMAGING_HOME, no runtime installs."""
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_HOME"] = str(self.workdir / f"flwr-home-{role}")
        env["FEDIMAGING_HOME"] = str(self.workdir / "fedimaging-home")
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        env.update(self.extra_env)
        env.update(extra)
        return env

    # ---- processes ------------------------------------------------------------------------
    def _start(self, name: str, cmd: Sequence[str], env: Mapping[str, str]) -> Proc:
        log_path = self.workdir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_fh:
            log_fh.write(f"$ {shlex.join(cmd)}\n".encode())
            log_fh.flush()
            popen = subprocess.Popen(
                list(cmd), stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env), cwd=self.workdir, start_new_session=True,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start_superlink(self, name: str = "superlink", wait: float = 60.0) -> Proc:
        env = self.env("superlink", SUPERLINK_BIND_HOST="127.0.0.1", SUPERLINK_PORT=str(self.port))
        proc = self._start(name, [str(DEPLOY_DIR / "start-superlink.sh"), str(self.link_dir)], env)
        self.wait_for_log(proc, "Uvicorn running on https://", wait)
        return proc

    def register(self, sites: Sequence[str] | None = None, timeout: float = 120.0,
                 **env_extra: str) -> subprocess.CompletedProcess:
        """``deploy/register-sites.sh`` (registers all sites, or ``sites``); it picks its own FLWR_HOME."""
        env = self.env("register", **env_extra)
        cmd = [str(DEPLOY_DIR / "register-sites.sh"), str(self.link_dir), "--connection", self.connection,
               *(sites or [])]
        return subprocess.run(cmd, env=env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout)

    def list_sites(self, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """``fedimaging deploy sites list``: node ids with site names, as the coordinator sees them."""
        cmd = [sys.executable, "-m", "deploy.sites", "list", str(self.link_dir), "--connection", self.connection]
        env = self.env("register")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        return subprocess.run(cmd, env=env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout)

    def start_site(
        self, site: str, *, name: str | None = None, skip_preflight: bool = False,
        without_ca: bool = False, extra_args: Sequence[str] = (), superlink_address: str | None = None,
    ) -> Proc:
        """A SuperNode via ``deploy/start-site.sh`` (or bare ``flower-supernode`` for ``without_ca``)."""
        name = name or site
        address = superlink_address or self.address
        env = self.env(name, SUPERNODE_RUNTIME_PORT=str(free_port()), SUPERLINK_ADDRESS=address)
        if skip_preflight:
            env["FEDIMAGING_SKIP_PREFLIGHT"] = "1"
        d = self.site_dir(site)
        if without_ca:
            cmd = ["flower-supernode", "--superlink", address, "--auth-supernode-private-key", str(d / "auth.key"),
                   "--node-config", str(d / "node-config.toml"), "--port", env["SUPERNODE_RUNTIME_PORT"], *extra_args]
        else:
            cmd = [str(DEPLOY_DIR / "start-site.sh"), str(d), *extra_args]
        return self._start(name, cmd, env)

    def run_study(self, run_config: Mapping[str, object], name: str = "flwr-run", timeout: float = 600.0,
                  project: Path = PROJECT_ROOT) -> Proc:
        """``flwr run <project> fedimaging --stream --run-config ...`` (started; wait on it)."""
        env = self.env("cli")
        env["FLWR_HOME"] = str(self.link_dir / "flwr-home")
        cmd = ["flwr", "run", str(project), self.connection, "--stream", "--run-config", format_run_config(run_config)]
        return self._start(name, cmd, env)

    @staticmethod
    def wait_for_log(proc: Proc, needle: str, timeout: float, start: int = 0) -> int:
        """Wait until ``needle`` appears in the log (after offset ``start``); return its offset."""
        deadline = time.monotonic() + timeout
        while True:
            text = proc.log()
            pos = text.find(needle, start)
            if pos >= 0:
                return pos
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited ({proc.popen.returncode}) before logging {needle!r}:\n{text[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{proc.name} did not log {needle!r} within {timeout:.0f}s:\n{text[-3000:]}")
            time.sleep(0.2)

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs_tail()}")
            time.sleep(0.25)

    def logs_tail(self, chars: int = 2500) -> str:
        return "\n".join(f"----- {p.name} -----\n{p.log()[-chars:]}" for p in self.procs)

    # ---- memory sampling (benchmark) ------------------------------------------------------
    def start_memory_sampling(self, interval: float = 0.25) -> None:
        """Track, per started process, the peak summed RSS of its process tree."""
        self._sampling = True

        def loop() -> None:
            while self._sampling:
                for proc in list(self.procs):
                    if proc.alive():
                        total = sum(rss_bytes(p) for p in process_tree(proc.popen.pid))
                        proc.peak_tree_rss = max(proc.peak_tree_rss, total)
                time.sleep(interval)

        self._sampler = threading.Thread(target=loop, daemon=True)
        self._sampler.start()

    def stop_memory_sampling(self) -> None:
        self._sampling = False
        if self._sampler is not None:
            self._sampler.join(timeout=5)

    # ---- teardown -------------------------------------------------------------------------
    def stop(self, proc: Proc | None = None, sig_kill: bool = False) -> None:
        """Stop one process (with descendants) or, by default, all of them."""
        targets = [proc] if proc is not None else list(reversed(self.procs))
        for p in targets:
            if sig_kill:
                for pid in process_tree(p.popen.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            else:
                stop_tree(p.popen.pid)
            try:
                p.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL was sent
                pass
        if proc is None:
            self.stop_memory_sampling()

    def __enter__(self) -> "LoopbackFederation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def format_run_config(values: Mapping[str, object]) -> str:
    """``{"num-server-rounds": 2, "run-dir": "/x"}`` -> ``num-server-rounds=2 run-dir='/x'``."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value!r}")
        else:
            text = str(value)
            if "'" in text:
                raise ValueError(f"run config value for {key!r} may not contain a single quote")
            parts.append(f"{key}='{text}'")
    return " ".join(parts)
