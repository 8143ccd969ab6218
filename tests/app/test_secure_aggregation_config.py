"""The refusal matrix of secure-aggregation=he: options that need plaintext updates at the coordinator."""

from __future__ import annotations

import pytest

from app.config import ConfigError, parse_run_config

REFUSED = [
    ({"strategy": "fedmedian"}, "strategy=fedmedian"),
    ({"strategy": "fedtrimmedavg"}, "strategy=fedtrimmedavg"),
    ({"strategy": "scaffold"}, "strategy=scaffold"),
    ({"central-dp": "server-side"}, "central-dp=server-side"),
    ({"central-dp": "client-side"}, "central-dp=client-side"),
    ({"relative-update-norm": 3.0}, "relative-update-norm=3.0"),
    ({"max-update-norm": 1.0}, "update-norm-action=reject"),
    ({"local-baselines": True}, "local-baselines=True"),
    ({"demo-sites": 1}, "demo-sites=1"),
    ({"demo": False, "min-available-sites": 1}, "min-available-sites=1"),
]


@pytest.mark.parametrize("extra, named", REFUSED)
def test_options_needing_plaintext_updates_refuse_to_start(extra, named):
    with pytest.raises(ConfigError, match="secure-aggregation=he") as info:
        parse_run_config({"secure-aggregation": "he", **extra})
    assert named in str(info.value)
    parse_run_config({"secure-aggregation": "off", **extra})  # fine without encryption


@pytest.mark.parametrize("extra", [{"strategy": s} for s in ("fedavg", "fedprox", "fedadam", "fedyogi", "fedbn")]
                         + [{"max-update-norm": 1.0, "update-norm-action": "clip"}, {"dp-epsilon": 8.0}])
def test_options_that_work_on_the_encrypted_sum_are_accepted(extra):
    assert parse_run_config({"secure-aggregation": "he", **extra}).secure_aggregation == "he"


def test_an_unknown_mode_names_the_key():
    with pytest.raises(ConfigError, match="'secure-aggregation' must be 'off' or 'he'"):
        parse_run_config({"secure-aggregation": "secagg"})
