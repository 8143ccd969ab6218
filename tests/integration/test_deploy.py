"""A real deployment on 127.0.0.1: SuperLink + SuperNodes with TLS and SuperNode authentication.

Every process is real (``deploy/start-superlink.sh``, ``deploy/start-site.sh``,
``deploy/register-sites.sh``, ``flwr run``); nothing of Flower is mocked. Each test has its own
FLWR_HOME per process and its own FEDIMAGING_HOME (see ``deploy.loopback``), picks free ports, and
stops every process it started, also on failure. The machine these were written on has 2 shared
cores and each Flower message starts a fresh ClientApp process (imports torch + MONAI), so a
round takes 20-60 s there: the tests use a tiny model and few rounds.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from data_prep.demo import write_demo_site
from deploy.loopback import LoopbackFederation, process_tree
from privacy import he_keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITES = ("site-a", "site-b", "site-c")
# Small and fast: coarse voxels, 16^3 patches, a 2-level U-Net, one epoch, one torch thread.
TINY = {
    "demo-size": "small", "spacing": "6,6,6", "roi-size": "16,16,16", "channels": "4,8",
    "num-res-units": 0, "crops-per-case": 1, "local-epochs": 1, "batch-size": 2, "torch-threads": 1,
    "cross-site": False, "seed": 3,
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Prepared site datasets (as `fedimaging prep` / `demo-data` would leave them)."""
    root = tmp_path_factory.mktemp("site-data")
    return {site: write_demo_site(root / site, site, seed=11, size="small") for site in SITES}


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _start_sites(fed: LoopbackFederation, sites) -> None:
    procs = [fed.start_site(s) for s in sites]
    for proc in procs:
        fed.wait_for_log(proc, "SuperNode ID", 120)


def _finish(fed: LoopbackFederation, run, timeout: float) -> str:
    rc = run.wait(timeout)
    log = run.log()
    assert rc == 0, f"flwr run exited with {rc}\n{fed.logs_tail()}"
    return log


def test_three_sites_with_tls_auth_and_he_complete_a_study_a_broken_site_is_refused(
        make_federation, datasets, tmp_path: Path) -> None:
    """Three sites, two rounds, the deployed fast path and encrypted aggregation (``deploy init
    --secure-aggregation he``: each site's node config names its full CKKS context, the coordinator
    runs with the public one); a fourth site whose dataset.json is broken is refused by
    ``start-site.sh`` before its SuperNode starts.

    One federation for what used to be three tests (each federation costs minutes on 2 cores). A
    broken site that starts anyway is excluded with a reason code and no path: in process, in
    tests/app/test_what_leaves_a_site.py (a fourth SuperNode here cost every message one more
    ClientApp process on 2 cores). A site killed mid-round: tests/integration/test_deploy_restart.py."""
    broken = tmp_path / "broken-site"
    shutil.copytree(datasets["site-b"], broken)
    manifest = broken / "dataset.json"
    manifest.write_text("{ not json")
    fed = make_federation({**datasets, "site-d": broken}, secure_aggregation="he")  # + CKKS keys

    # start-site.sh checks the dataset first and names the wrong file
    refused = fed.start_site("site-d", name="site-d-preflight")
    assert refused.wait(120) not in (None, 0)
    assert f"{manifest} is not valid JSON" in refused.log()

    fed.start_superlink()
    reg = fed.register()
    assert reg.returncode == 0, reg.stdout + reg.stderr
    assert reg.stdout.count("registered site-") == 4
    _start_sites(fed, SITES)
    run_dir = tmp_path / "run"
    # the deployed fast path: received-model metrics in every train reply, evaluate messages after
    # the last round only (each message costs every site a new process)
    # and encrypted aggregation, with the keys deploy init wrote: the coordinator has the public context
    run = fed.run_study({"num-server-rounds": 2, "run-dir": str(run_dir), "min-available-sites": 3,
                         "evaluate-every": 0, "evaluate-received": True, **TINY,
                         "secure-aggregation": "he", "he-public-context": str(fed.link_dir / "he-public-context.ckks")})
    log = _finish(fed, run, 900)
    assert f"Run directory: {run_dir}" in log

    lines = _metrics(run_dir)
    train = [r for r in lines if r["phase"] == "train"]
    evaluate = [r for r in lines if r["phase"] == "evaluate"]
    assert [r["round"] for r in train] == [1, 2] and [r["round"] for r in evaluate] == [2]
    for r in train:
        trained = {site for site, m in r["sites"].items() if m.get("num-examples")}
        assert trained == set(SITES), r
        for site in SITES:
            expected = len(json.loads((datasets[site] / "dataset.json").read_text())["training"])
            assert r["sites"][site]["num-examples"] == expected
            assert 0.0 <= r["sites"][site]["received-dice"] <= 1.0
        assert not r["excluded"]
        assert r["secure-aggregation"]["contributors"] == 3 and r["secure-aggregation"]["decrypted-by"] in SITES
    for r in evaluate:
        assert set(SITES) <= set(r["sites"])
        assert all(0.0 <= r["sites"][s]["dice"] <= 1.0 for s in SITES)
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "final_model.pt", "run_config.json"):
        assert (run_dir / name).is_file(), name
    # no site's file path (PHI risk) reached the server's outputs
    outputs = (run_dir / "metrics.jsonl").read_text() + log
    for path in [*datasets.values(), broken]:
        assert str(path) not in outputs
    # the study went through the TLS connection written by deploy init, state persisted on disk
    assert f"Using SuperLink: fedimaging (127.0.0.1:{fed.port})" in log
    assert (fed.link_dir / "state" / "superlink.db").is_file()
    # the sites' key was used, and no byte of its secret key is anywhere on the coordinator's side
    ctx, key_id = he_keys.read_key_file(fed.site_dir("site-a") / "he-context.ckks", need_secret=True)
    assert train[0]["secure-aggregation"]["key-id"] == key_id
    secret = tmp_path / "sk.bin"
    ctx.secret_key().data.save(str(secret))
    needle = secret.read_bytes()[4096:4160]
    coordinator = [q for d in (run_dir, fed.link_dir) for q in d.rglob("*") if q.is_file()]
    assert coordinator and not [q for q in coordinator if needle in q.read_bytes()]


def test_unregistered_or_untrusting_supernodes_cannot_join(make_federation, datasets) -> None:
    sites = {"site-a": datasets["site-a"], "site-b": datasets["site-b"]}
    fed = make_federation(sites)
    fed.start_superlink()
    # a shell whose FLWR_HOME points at a local (simulation) connection: the script ignores it
    hostile = fed.workdir / "hostile-flwr-home"
    hostile.mkdir()
    (hostile / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    reg = fed.register(["site-a"], FLWR_HOME=str(hostile))  # site-b's key is never registered
    assert reg.returncode == 0, reg.stdout + reg.stderr
    assert "registered site-a: node " in reg.stdout and f"(127.0.0.1:{fed.port})" in reg.stdout
    assert [p.name for p in hostile.iterdir()] == ["config.toml"]
    again = fed.register(["site-a"])  # idempotent
    assert again.returncode == 0 and "already registered: site-a" in again.stdout
    listed = fed.list_sites()
    assert listed.returncode == 0, listed.stderr
    assert re.search(r"\d+\s+registered\s+site-a\b", listed.stdout) and "site-b" not in listed.stdout

    good = fed.start_site("site-a")
    fed.wait_for_log(good, "SuperNode ID", 120)
    # runtime dependency installation is off in every Flower process we started
    cmdlines = [_cmdline(pid) for proc in fed.procs for pid in process_tree(proc.popen.pid)]
    assert any("flower-superlink" in c and "--disable-runtime-dependency-installation" in c for c in cmdlines)
    assert any("flower-superexec" in c for c in cmdlines)  # the SuperLink's and the SuperNode's
    assert not any("--allow-runtime-dependency-installation" in c for c in cmdlines)
    unregistered = fed.start_site("site-b", extra_args=["--max-retries", "2", "--max-wait-time", "30"])
    # a registered key, but the SuperNode does not trust our CA (system roots only)
    no_ca = fed.start_site("site-a", name="site-a-without-ca", without_ca=True,
                           extra_args=["--max-retries", "2", "--max-wait-time", "30"])
    assert unregistered.wait(120) not in (None, 0), unregistered.log()
    assert no_ca.wait(120) not in (None, 0), no_ca.log()
    assert "Failed to activate SuperNode" in unregistered.log()
    # start-site.sh says what it means and what to do
    assert "does not\nknow this site's key" in unregistered.log()
    assert str(fed.site_dir("site-b") / "auth.key.pub") in unregistered.log()
    assert "CERTIFICATE_VERIFY_FAILED" in no_ca.log()
    assert "SuperNode ID" not in unregistered.log() and "SuperNode ID" not in no_ca.log()
    assert good.alive()
