"""Run/site config parsing: defaults agree with pyproject, errors name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from app.config import ConfigError, RunConfig, parse_run_config
from app.site_config import parse_site_config

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
    assert parse_run_config({"mirror-axes": "2, 0"}).task_settings().mirror_axes == (0, 2)
    assert parse_run_config({"mirror-axes": ""}).task_settings().mirror_axes == ()
    assert parse_run_config({"mirror-axes": [2, 1]}).task_settings().mirror_axes == (1, 2)
    assert parse_run_config({"mirror-axes": 0}).task_settings().mirror_axes == (0,)


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
    from app.config import strategy_settings

    demo = parse_run_config({})
    deployed = parse_run_config({"demo": False, "min-available-sites": 5})
    assert demo.uses_demo and not deployed.uses_demo
    assert strategy_settings(demo, "dice", 3).unseen_site
    assert not strategy_settings(deployed, "dice", 5).unseen_site
    site = parse_site_config({"data-path": str(tmp_path)}, demo)  # a data-path always wins
    assert not site.is_demo


def test_round_learning_rate_decays_from_lr_to_a_tenth():
    from app.config import strategy_settings

    settings = strategy_settings(parse_run_config({"num-server-rounds": 5, "lr": 0.01}), "dice", 3)
    rates = [settings.round_lr(r) for r in range(1, 6)]
    assert rates[0] == pytest.approx(0.01) and rates[-1] == pytest.approx(0.001)
    assert rates[2] == pytest.approx(0.0055)  # half-way: 0.1 + 0.9 * 0.5
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert settings.round_lr(0) == 0.01  # local baselines: no schedule
    constant = strategy_settings(parse_run_config({"lr-schedule": "constant", "lr": 0.01}), "dice", 3)
    assert constant.round_lr(7) == 0.01


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"spacing": "0,1,1"}, "spacing"),
        ({"spacing": "-1"}, "spacing"),
        ({"spacing": "nan,1,1"}, "spacing"),
        ({"spacing": "inf"}, "spacing"),
        ({"roi-size": "30,32,32"}, "roi-size"),
        ({"lr": "inf"}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"dp-delta": 1.0}, "dp-delta"),
        ({"dp-delta": -1e-5}, "dp-delta"),
        ({"dp-max-grad-norm": 0}, "dp-max-grad-norm"),
        ({"min-train-sites": -1}, "min-train-sites"),
        ({"tau": 0}, "tau"),
        ({"tau": -0.1}, "tau"),
        ({"run-name": ".."}, "run-name"),
        ({"run-name": "."}, "run-name"),
        ({"num-server-rounds": "inf"}, "num-server-rounds"),
        ({"num-server-rounds": 10**400}, "num-server-rounds"),
        ({"seed": "1e400"}, "seed"),
        ({"beta-1": 1.0}, "beta-1"),
        ({"server-lr": -1}, "server-lr"),
        ({"round-timeout-s": 0}, "round-timeout-s"),
        ({"run-dir": "a\x00b"}, "run-dir"),
        ({"mirror-axes": "3"}, "mirror-axes"),
        ({"mirror-axes": "0,0"}, "mirror-axes"),
        ({"mirror-axes": "-1"}, "mirror-axes"),
        ({"mirror-axes": "0.5"}, "mirror-axes"),
        ({"mirror-axes": "x"}, "mirror-axes"),
        ({"mirror-axes": True}, "mirror-axes"),
        ({"mirror-axes": "true"}, "mirror-axes"),
        ({"mirror-axes": "1.0"}, "mirror-axes"),
        ({"mirror-axes": [0, True]}, "mirror-axes"),
        ({"mirror-axes": "0", "task": "classification"}, "mirror-axes"),
        ({"classifier-norm": "layer", "task": "classification"}, "classifier-norm"),
        ({"classifier-norm": "group"}, "classifier-norm"),  # the segmentation task
        ({"classifier-feature-norm": "batch", "task": "classification"}, "classifier-feature-norm"),
        ({"classifier-feature-norm": "layer"}, "classifier-feature-norm"),  # the segmentation task
    ],
)
def test_values_that_would_fail_later_are_refused_now(raw, named):
    with pytest.raises(ConfigError, match=named):
        parse_run_config(raw)


def test_dp_delta_zero_still_means_the_sites_default():
    assert parse_run_config({"dp-delta": 0}).dp_delta == 0.0
    assert parse_run_config({"dp-delta": 1e-6}).dp_delta == 1e-6


def test_pyproject_lists_every_key_with_its_default():
    """The one definition is RunConfig: pyproject holds exactly its keys, with its values."""
    pyproject, defaults = pyproject_run_config(), RunConfig().to_json()
    assert sorted(pyproject) == sorted(defaults)
    for key, value in defaults.items():
        if isinstance(value, list):  # written as text, e.g. spacing = "3,3,3"
            assert [type(v)(x) for v, x in zip(value, pyproject[key].split(","))] == value, key
        else:
            assert pyproject[key] == value and type(pyproject[key]) is type(value), key


BOUNDARY = [0, 1, -1, 0.5, 1.0, 8, 1e-12, 1e308, 10**400, float("nan"), float("inf"), -float("inf"), "", " ",
            "nan", "inf", "-inf", "1e400", "abc", "1,2", "1,2,3", "8,8,8", "0,0,0", "-150,250", "..", "../x",
            "a\x00b", "true", "false", "yes", True, False, None, [1, 2, 3], [8, 8, 8], {"a": 1}, "fedavg",
            "segmentation", "cosine", "server-side", "{site}", "\u00e9\u00e8"]


def test_fuzzed_run_configs_give_a_config_or_a_config_error():
    """Random and boundary values for every key: a valid object or ConfigError, nothing else."""
    import random

    from app.config import strategy_settings

    rng = random.Random(20261201)
    keys = list(RunConfig().to_json())
    outcomes = {"ok": 0, "refused": 0}
    for _ in range(3000):
        raw = {}
        for key in rng.sample(keys, rng.randint(1, 4)):
            raw[key] = rng.choice(BOUNDARY) if rng.random() < 0.7 else rng.uniform(-1e6, 1e6)
        try:
            config = parse_run_config(raw)
        except ConfigError:
            outcomes["refused"] += 1
            continue
        outcomes["ok"] += 1
        config.task_settings()  # what the sites derive must not fail either
        strategy_settings(config, "dice", max(1, config.min_available_sites))
        assert RunConfig(**{f: getattr(config, f) for f in config.__dataclass_fields__}) == config
    assert outcomes["ok"] > 100 and outcomes["refused"] > 100, outcomes
