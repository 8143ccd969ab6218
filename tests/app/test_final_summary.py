"""The ServerApp's closing line when the final metric is undefined at every site (many tiny sites)."""

from __future__ import annotations

from app.server_app import _print_final
from strategies.run_dir import RunDirectory


def test_final_line_when_no_site_defines_the_metric(tmp_path, capsys):
    directory = RunDirectory(tmp_path / "run")
    # 100 sites with one or two test cases each: every site's AUC is NaN, so the aggregate has none
    directory.append_metrics({"round": 1, "phase": "evaluate", "seconds": 1.0,
                              "sites": {"site-0": {"num-examples": 1, "accuracy": 1.0}},
                              "aggregate": {"accuracy": 0.59, "loss": 0.69}})
    _print_final(directory, "auc")
    assert "mean auc over the sites' test cases = undefined ()" in capsys.readouterr().out
    directory.append_metrics({"round": 2, "phase": "evaluate", "seconds": 1.0,
                              "sites": {"site-0": {"num-examples": 4, "auc": 0.75}}, "aggregate": {"auc": 0.75}})
    _print_final(directory, "auc")
    assert "(round 2): mean auc over the sites' test cases = 0.750 (site-0=0.750)" in capsys.readouterr().out
