"""Deployment vs simulation on one host: seconds per round, bytes per site per round, peak memory.

    python -m bench.deploy [--size tiny|standard] [--rounds N] [--sites 3] [--skip-simulation] [--run-config "k=v ..."]

``--size tiny`` (default): small demo, a 4-8 channel U-Net, 3 rounds (minutes; a sanity check).
``--size standard``: the standard demo with the default model, 5 rounds (the realistic case).
``seconds_per_round`` is the mean of rounds 2..N (round 1 carries the app download, the first
imports and the cache build: ``first_round_seconds``). ``breakdown`` splits each site's messages
into process start and imports, data load (disk-cache hits and misses), training, evaluation and
waiting, from the ``fedimaging-timing`` lines the ClientApp logs with ``FEDIMAGING_TIMINGS=1``.

Deployment: a loopback federation exactly as ``deploy/`` sets it up (TLS, SuperNode auth, the
start scripts), each SuperNode connected through its own counting TCP relay so the bytes are
those on the wire (TLS records, HTTP framing and heartbeats included). Simulation: ``flwr run``
on Flower's local simulation runtime with the same run config and the same demo sites (same seed).
Memory: peak summed RSS of each process tree (SuperLink with its ServerApp; each SuperNode with
its ClientApp processes), sampled every 0.25 s. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from data_prep.demo import demo_site_names, demo_site_path, write_demo_site
from deploy.loopback import PROJECT_ROOT, LoopbackFederation, format_run_config, free_port, stop_tree

STANDARD = {"demo-size": "standard", "local-epochs": 1, "torch-threads": 1, "cross-site": False, "seed": 5}
TINY = {
    "demo-size": "small", "spacing": "6,6,6", "roi-size": "16,16,16", "channels": "4,8", "num-res-units": 0,
    "crops-per-case": 1, "local-epochs": 1, "batch-size": 2, "torch-threads": 1, "cross-site": False, "seed": 5,
}


class CountingRelay:
    """A TCP relay 127.0.0.1:port -> target counting the bytes each way (TLS passes through)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = 0  # site -> SuperLink
        self.down = 0  # SuperLink -> site
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while chunk := src.recv(65536):
                with self._lock:  # count before forwarding: the reply cannot overtake the count
                    setattr(self, direction, getattr(self, direction) + len(chunk))
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self._server.close()


def _round_seconds(run_dir: Path) -> list[float]:
    """Per round: train + evaluate phase seconds, from the ServerApp's metrics.jsonl."""
    per_round: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec["round"] >= 1:
                per_round[rec["round"]] = per_round.get(rec["round"], 0.0) + float(rec["seconds"])
    return [per_round[r] for r in sorted(per_round)]


def _per_round_summary(rounds: list[float]) -> dict:
    """Mean of rounds 2..N (all rounds when there is only one) and round 1 on its own."""
    later = rounds[1:] or rounds
    return {"seconds_per_round": sum(later) / len(later), "first_round_seconds": rounds[0] if rounds else None,
            "round_seconds": rounds}


def timing_lines(log: str) -> list[dict]:
    """The ClientApp's ``fedimaging-timing`` records in a log (see app/timings.py)."""
    out = []
    for line in log.splitlines():
        _, found, payload = line.partition("fedimaging-timing ")
        if found:
            try:
                out.append(json.loads(payload))
            except json.JSONDecodeError:
                continue
    return out


def breakdown(records: list[dict], round_seconds: list[float]) -> dict:
    """Per message type, mean seconds over rounds >= 2 of each part; waiting = the round minus the site's busy time."""
    parts = ("startup", "setup", "data", "train", "evaluate", "handler")
    by_message: dict[str, list[dict]] = {}
    busy: dict[int, float] = {}
    for rec in records:
        startup = sum(rec.get(k, 0.0) for k in ("process_start_to_imports_s", "imports_s", "flower_to_handler_s"))
        row = {"startup": startup, **{p: rec.get(f"{p}_s", 0.0) for p in parts[1:]},
               "cache_hits": rec.get("cache_hits", 0), "cache_misses": rec.get("cache_misses", 0),
               "fresh_process": rec.get("message_in_process") == 1, "round": rec.get("round", 0)}
        by_message.setdefault(rec.get("message", "?"), []).append(row)
        busy[row["round"]] = busy.get(row["round"], 0.0) + startup + row["handler"]
    summary: dict[str, dict] = {}
    for message, rows in by_message.items():
        later = [r for r in rows if r["round"] >= 2] or rows
        summary[message] = {
            **{f"{p}_s": round(sum(r[p] for r in later) / len(later), 3) for p in parts},
            "cache_hits": sum(r["cache_hits"] for r in rows), "cache_misses": sum(r["cache_misses"] for r in rows),
            "fresh_processes": sum(r["fresh_process"] for r in rows), "messages": len(rows),
        }
    waits = [round_seconds[r - 1] - busy[r] for r in busy if 2 <= r <= len(round_seconds)]
    summary["waiting_s_per_round"] = round(sum(waits) / len(waits), 3) if waits else None
    return summary


def _snapshot_bytes_per_round(run, run_dir: Path, relays: dict, last_phase: str, timeout: float) -> list[dict]:
    """Relay counters at the end of each round (when its last metrics.jsonl line appears)."""
    snaps: list[dict] = []
    seen_rounds: set[int] = set()
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while True:
        running = run.alive() and time.monotonic() < deadline
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:  # a line being appended right now
                    continue
                if rec and rec["phase"] == last_phase and rec["round"] >= 1 and rec["round"] not in seen_rounds:
                    seen_rounds.add(rec["round"])
                    snaps.append({s: (r.up, r.down) for s, r in relays.items()})
        if not running:
            return snaps
        time.sleep(0.2)


def _model_bytes(run_dir: Path) -> int:
    """Bytes of the model's arrays (what one direction of a round carries, before framing)."""
    import torch

    state = torch.load(run_dir / "final_model.pt", weights_only=True, map_location="cpu")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return int(sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel")))


def run_deployment(work: Path, sites: dict[str, Path], config: dict, timeout: float) -> dict:
    fed = LoopbackFederation(work / "deployment-run", sites, extra_env={"FEDIMAGING_TIMINGS": "1"})
    relays: dict[str, CountingRelay] = {}
    try:
        fed.init()
        fed.start_memory_sampling()
        fed.start_superlink()
        if fed.register().returncode != 0:
            raise RuntimeError(f"registration failed\n{fed.logs_tail()}")
        procs = {}
        for site in sites:
            relays[site] = CountingRelay(("127.0.0.1", fed.port))
            procs[site] = fed.start_site(site, superlink_address=f"127.0.0.1:{relays[site].port}")
        for proc in procs.values():
            fed.wait_for_log(proc, "SuperNode ID", 180)
        idle = {s: (r.up, r.down) for s, r in relays.items()}
        run_dir = work / "deployment-run" / "run"
        t0 = time.monotonic()
        run = fed.run_study({**config, "run-dir": str(run_dir)})
        last_phase = "evaluate" if float(config.get("fraction-evaluate", 1.0)) > 0 else "train"
        snapshots = _snapshot_bytes_per_round(run, run_dir, relays, last_phase, timeout)
        rc = run.wait(timeout)
        wall = time.monotonic() - t0
        if rc != 0:
            raise RuntimeError(f"deployment run failed ({rc})\n{fed.logs_tail()}")
        rounds = _round_seconds(run_dir)
        fed.stop_memory_sampling()
        per_round = {}
        for site in sites:
            marks = [idle[site]] + [snap[site] for snap in snapshots]
            per_round[site] = [
                {"site_to_superlink": b[0] - a[0], "superlink_to_site": b[1] - a[1]}
                for a, b in zip(marks, marks[1:], strict=False)
            ]
        later = {s: rows[1:] or rows for s, rows in per_round.items()}
        site_logs = {p.name: p.log() for p in fed.procs if p.name in sites}
        return {
            **_per_round_summary(rounds),
            "breakdown": {s: breakdown(timing_lines(text), rounds) for s, text in site_logs.items()},
            "wall_seconds_flwr_run": wall,
            "model_bytes_float32": _model_bytes(run_dir),
            "bytes_per_site_per_round": {
                s: {k: sum(r[k] for r in rows) / len(rows) for k in ("site_to_superlink", "superlink_to_site")}
                for s, rows in later.items()
            },
            "bytes_per_site_by_round": per_round,
            "bytes_note": "on the wire (TLS records, HTTP, heartbeats) through a relay per site; "
                          "per-round mean over rounds >= 2 (round 1 also carries the app bundle download)",
            "peak_rss_mb": {p.name: round(p.peak_tree_rss / 2**20, 1) for p in fed.procs if p.name != "flwr-run"},
        }
    finally:
        fed.stop()
        for r in relays.values():
            r.close()


def run_simulation(work: Path, config: dict, n_sites: int, demo_root: Path, timeout: float) -> dict:
    """The same study on Flower's simulation runtime (its own FLWR_HOME and ports)."""
    home = work / "simulation-flwr-home"
    run_dir = work / "simulation-run"
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(home), "FEDIMAGING_HOME": str(work / "simulation-fedimaging-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "OMP_NUM_THREADS": "1", "FEDIMAGING_TIMINGS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    cfg = {**config, "run-dir": str(run_dir), "demo-root": str(demo_root), "demo-sites": n_sites, "demo": True}
    cmd = ["flwr", "run", str(PROJECT_ROOT), "--stream", "--run-config", format_run_config(cfg),
           "--federation-config", f"num-supernodes={n_sites} client-resources-num-cpus=1"]
    log = work / "simulation.log"
    t0 = time.monotonic()
    try:
        with open(log, "wb") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=work)
        wall = time.monotonic() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"simulation failed ({proc.returncode}); see {log}")
        rounds = _round_seconds(run_dir)
        records = timing_lines(log.read_text(errors="replace"))  # present when Flower forwards ClientApp stderr
        return {**_per_round_summary(rounds), "wall_seconds_flwr_run": wall,
                "breakdown": {"all-sites": breakdown(records, rounds)} if records else None}
    finally:
        _stop_local_superlink(home)


def _stop_local_superlink(flwr_home: Path) -> None:
    """`flwr run` leaves its local SuperLink running; stop the one using our FLWR_HOME only."""
    needle = str(flwr_home).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"flower-superlink" in cmdline and needle in cmdline:
            stop_tree(int(entry))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "standard"), default="tiny")
    parser.add_argument("--rounds", type=int, default=None, help="default: 3 (tiny), 5 (standard)")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--run-config", default="", help="extra run config, e.g. \"roi-size='32,32,32'\"")
    parser.add_argument("--skip-simulation", action="store_true")
    parser.add_argument("--timeout", type=float, default=3000.0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs and runs here")
    args = parser.parse_args(argv)

    from flwr.common.config import parse_config_args

    args.rounds = args.rounds or (3 if args.size == "tiny" else 5)
    base = TINY if args.size == "tiny" else STANDARD
    config = {**base, "num-server-rounds": args.rounds, "min-available-sites": args.sites, "demo": False,
              **parse_config_args([args.run_config] if args.run_config else None)}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedimaging-bench-deploy-"))
    work.mkdir(parents=True, exist_ok=True)
    names = demo_site_names(args.sites)
    demo_root = work / "demo"
    sites = {
        s: write_demo_site(demo_site_path(demo_root, int(config["seed"]), "segmentation", s, config["demo-size"]),
                           s, int(config["seed"]), "segmentation", config["demo-size"])
        for s in names
    }
    result = {
        "benchmark": "deploy", "size": args.size, "rounds": args.rounds, "sites": names, "run_config": config,
        "host": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg()[0]},
        "deployment": run_deployment(work, sites, config, args.timeout),
    }
    if not args.skip_simulation:
        result["simulation"] = run_simulation(work, config, args.sites, demo_root, args.timeout)
    result["host"]["loadavg_end"] = os.getloadavg()[0]
    result["workdir"] = str(work)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
