"""Run/site config parsing: defaults agree with pyproject, errors name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from app.config import ConfigError, RunConfig, parse_run_config, parse_site_config

ROOT = Path(__file__).resolve().parents[2]


def pyproject_run_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_defaults_are_the_run_config_defaults():
    assert parse_run_config(pyproject_run_config()) == RunConfig()


def test_every_run_config_key_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for key in pyproject_run_config():
        assert f"`{key}`" in readme, f"README does not document run config key {key!r}"


def test_lists_are_parsed_once_at_the_edge():
    config = parse_run_config({"spacing": "1.5,1.5,3", "roi-size": "64,64,32", "channels": "8,16"})
    assert config.spacing == (1.5, 1.5, 3.0)
    assert config.roi_size == (64, 64, 32)
    assert config.task_settings().channels == (8, 16)
    assert parse_run_config({"spacing": "2"}).spacing == (2.0, 2.0, 2.0)


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"no-such-key": 1}, "no-such-key"),
        ({"task": "detection"}, "task"),
        ({"strategy": "fedsomething"}, "strategy"),
        ({"spacing": "1,2"}, "spacing"),
        ({"roi-size": "32,32,x"}, "roi-size"),
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"num-server-rounds": 2.5}, "num-server-rounds"),
        ({"dp-required": "maybe"}, "dp-required"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"run-name": "../escape"}, "run-name"),
        ({"data-path-template": "/data/all"}, "data-path-template"),
    ],
)
def test_bad_values_name_the_key(raw, named):
    with pytest.raises(ConfigError, match=named):
        parse_run_config(raw)


def test_run_dir_is_absolute_under_home(tmp_path):
    config = parse_run_config({"home": str(tmp_path)})
    assert config.run_dir_path("x") == tmp_path / "runs" / "x"
    assert parse_run_config({"home": str(tmp_path), "run-dir": "rel/run"}).run_dir_path("x").is_absolute()


def test_deployed_site_config(tmp_path):
    run = RunConfig()
    site = parse_site_config({"data-path": str(tmp_path / "hospital-1"), "dp-epsilon": 8}, run)
    assert site.site_name == "hospital-1"
    assert site.state_dir == tmp_path / "hospital-1" / "private" / "state"
    assert site.dp_epsilon == 8.0 and not site.is_demo
    with pytest.raises(ConfigError, match="site-name"):
        parse_site_config({"data-path": str(tmp_path), "site-name": "a b/c"}, run)
    with pytest.raises(ConfigError, match="data-path"):
        parse_site_config({}, run)


def test_simulation_maps_partitions_to_demo_sites(tmp_path):
    run = parse_run_config({"home": str(tmp_path)})
    names = [parse_site_config({"partition-id": i, "num-partitions": 3}, run).site_name for i in range(3)]
    assert names == ["site-a", "site-b", "site-c"]
    with pytest.raises(ConfigError, match="num-supernodes=3"):
        parse_site_config({"partition-id": 3, "num-partitions": 4}, run)
    own = parse_run_config({"home": str(tmp_path), "data-path-template": str(tmp_path / "{site}")})
    site = parse_site_config({"partition-id": 1}, own)
    assert site.data_path == tmp_path / "site-1" and not site.is_demo


def test_deployed_studies_do_not_use_the_demo(tmp_path):
    from app.server_app import strategy_settings

    demo = parse_run_config({})
    deployed = parse_run_config({"demo": False, "min-available-sites": 5})
    assert demo.uses_demo and not deployed.uses_demo
    assert strategy_settings(demo, "dice", 3).unseen_site
    assert not strategy_settings(deployed, "dice", 5).unseen_site
    site = parse_site_config({"data-path": str(tmp_path)}, demo)  # a data-path always wins
    assert not site.is_demo


def test_round_learning_rate_decays_from_lr_to_a_tenth():
    config = parse_run_config({"num-server-rounds": 5, "lr": 0.01})
    rates = [config.round_lr(0.01, r) for r in range(1, 6)]
    assert rates[0] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.001)
    assert rates[2] == pytest.approx(0.0055)  # half-way: 0.1 + 0.9 * 0.5
    assert all(a > b for a, b in zip(rates, rates[1:]))
    constant = parse_run_config({"lr-schedule": "constant"})
    assert constant.round_lr(0.01, 7) == 0.01
