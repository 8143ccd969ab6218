"""The README's "Deploy across sites" steps, run as written: two sites on 127.0.0.1, DP on.

The commands are read from the README (``<!-- deploy-init -->``, ``deploy-superlink``,
``deploy-site``, ``deploy-run`` blocks) and run in the working folder the README names, the root
of a checkout (a copy of this project). The only changes are the ones a one-host trial makes and
the README states: the host is 127.0.0.1, two sites instead of three, paths under a temporary
folder, a free port instead of 8000 (``--superlink-port`` / ``SUPERLINK_PORT``), the SuperLink bound
to 127.0.0.1 (``SUPERLINK_BIND_HOST``), one ``SUPERNODE_RUNTIME_PORT`` per site, and a tiny model
for one round in the run config. Each site's "PACS export" is the demo generator's DICOM.

The study may spend only its share of each site's lifetime DP budget (``dp-study-epsilon``,
default a quarter), so that the sites can take part in further studies.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomli as tomllib

from deploy.loopback import LoopbackFederation, copy_checkout, free_port

from .conftest import readme_block

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITES = ("site-a", "site-b")
TINY = ("demo-size='small' spacing='6,6,6' roi-size='16,16,16' channels='4,8' num-res-units=0 crops-per-case=1 "
        "local-epochs=1 batch-size=2 torch-threads=1 cross-site=false seed=3 fraction-evaluate=0")


def _commands(block: str) -> list[str]:
    """The block's shell commands, continuation lines joined, comment lines dropped."""
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _run(cmd: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", "-c", cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"$ {cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _study(fed: LoopbackFederation, run_block: str, env: dict, checkout: Path, name: str) -> Path:
    """Step 4 as written (one bash script: the export carries to flwr run), tiny and 1 round."""
    script = run_block.replace("num-server-rounds=20", "num-server-rounds=1").replace(
        "min-available-sites=3", f"min-available-sites={len(SITES)}")
    script = re.sub(r'--run-config "([^"]*)"', lambda m: f'--run-config "{m.group(1)} {TINY}"', script)
    assert "num-server-rounds=1" in script and TINY in script
    proc = fed._start(name, ["bash", "-c", script], env)
    rc = proc.wait(900)
    log = proc.log()
    assert rc == 0, f"study {name} exited {rc}\n{log[-4000:]}\n{fed.logs_tail()}"
    match = re.search(r"Run directory: (\S+)", log)
    assert match, log[-3000:]
    assert f"Using SuperLink: fedimaging (127.0.0.1:{fed.port})" in log  # the deployment, not a local one
    return Path(match.group(1))


def _trained_by_both(run_dir: Path, budget: float) -> dict[str, float]:
    train = [r for r in _metrics(run_dir) if r["phase"] == "train"]
    assert [r["round"] for r in train] == [1]
    assert set(train[0]["sites"]) == set(SITES) and train[0]["excluded"] == {}, train[0]
    spent = {site: m["dp-epsilon-spent"] for site, m in train[0]["sites"].items()}
    assert all(0 < eps <= budget for eps in spent.values()), spent
    assert (run_dir / "final_model.pt").is_file()
    return spent


def test_readme_deploy_steps_two_sites_dp_on(tmp_path: Path) -> None:
    checkout = copy_checkout(tmp_path / "fedimaging")
    srv = tmp_path / "srv"
    port = free_port()
    base = {"PYTHONPATH": str(checkout), "FEDIMAGING_HOME": str(tmp_path / "fedimaging-home")}
    fed = LoopbackFederation(checkout, {}, port=port, extra_env=base)
    # each site's PACS export: the demo generator's DICOM series and label maps
    _run(f"{shlex.quote(sys.executable)} -m app.cli demo-data {tmp_path / 'pacs'} --sites {len(SITES)} "
         "--size small --no-unseen --keep-dicom --workers 1", fed.env("pacs"), checkout)

    with fed:
        # 1. Coordinator: create the deployment material
        init = _commands(readme_block("deploy-init"))
        assert len(init) == 1 and init[0].startswith("fedimaging deploy init deployment ")
        cmd = (init[0].replace("fl.coordinator.example.org", "127.0.0.1")
               .replace("--sites site-a,site-b,site-c", f"--sites {','.join(SITES)}")
               .replace("/srv/fedimaging", str(srv)) + f" --superlink-port {port}")
        _run(cmd, fed.env("init"), checkout)
        node_config = tomllib.loads((checkout / "deployment/sites/site-a/node-config.toml").read_text())
        budget = node_config["dp-epsilon"]
        assert budget > 0  # DP on, as deploy init sets it

        # 2. Coordinator: start the SuperLink and register the sites
        start_link, register = _commands(readme_block("deploy-superlink"))
        assert start_link.split()[0] == "deploy/start-superlink.sh"
        link = fed._start("superlink", ["bash", "-c", start_link],
                          fed.env("superlink", SUPERLINK_BIND_HOST="127.0.0.1", SUPERLINK_PORT=str(port)))
        fed.wait_for_log(link, "Uvicorn running on https://", 120)
        reg = _run(register, fed.env("register"), checkout, timeout=120)
        for site in SITES:
            assert f"registered {site}: node " in reg.stdout, reg.stdout

        # 3. Each site: prepare the data, then start the SuperNode (own runtime port: one host)
        for site in SITES:
            prep, start_site = (c.replace("site-a", site).replace("/srv/fedimaging", str(srv))
                                .replace("/path/to/dicom", str(tmp_path / "pacs" / "dicom" / site / "images"))
                                .replace("/path/to/labels", str(tmp_path / "pacs" / "dicom" / site / "labels"))
                                for c in _commands(readme_block("deploy-site")))
            _run(prep, fed.env(f"prep-{site}"), checkout)
            assert (srv / site / "dataset" / "dataset.json").is_file()
            proc = fed._start(site, ["bash", "-c", start_site],
                              fed.env(site, SUPERNODE_RUNTIME_PORT=str(free_port())))
            fed.wait_for_log(proc, "SuperNode ID", 180)
        listing = _run("fedimaging deploy sites deployment/superlink", fed.env("register"), checkout).stdout
        for site in SITES:
            assert re.search(rf"\d+\s+online\s+{site}\b", listing), listing

        # 4. Coordinator: run a study
        run_block = readme_block("deploy-run")
        first = _study(fed, run_block, fed.env("cli"), checkout, "study-1")
        spent = _trained_by_both(first, budget)
        # the study spent at most its share of each site's lifetime budget (dp-study-epsilon, default
        # a quarter), so the next study still trains (two studies in a row: tests/app/test_dp_study.py)
        assert all(eps <= budget / 4 + 1e-6 for eps in spent.values()), (spent, budget)
