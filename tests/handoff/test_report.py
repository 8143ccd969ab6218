"""report.md and its plots: every linked PNG is a real, readable image; partial runs still report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from PIL import Image

from app.report import exclusions, load_run, report_main, site_summary, write_report

from .fixtures import SITES, make_run_dir, synthetic_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _linked_pngs(report: Path) -> list[Path]:
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    return [report.parent / n for n in names]


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
    assert width >= 400 and height >= 250, (path, image.size)
    pixels = imread(path)  # matplotlib reads it back
    assert pixels.shape[:2] == (height, width)
    assert np.asarray(pixels).std() > 0.01  # not a blank canvas


def test_full_run_report_then_rebuilt_from_the_cli(tmp_path, capsys):
    run = make_run_dir(tmp_path / "run", rounds=5, dp=True, cross=True)
    report = write_report(run)
    assert report == run / "report.md"
    text = report.read_text()
    pngs = _linked_pngs(report)
    assert {p.name for p in pngs} == {"report-global.png", "report-sites.png", "report-epsilon.png",
                                      "report-cross-site.png", "report-seconds.png"}
    for png in pngs:
        _check_png(png)
    # the exclusion and its reason, the run config and the site case counts are in the text
    assert "rejected: update norm 41.2 > bound 10.0" in text
    assert "out of memory" in text  # cross-site exclusion
    assert "| strategy | fedavg |" in text
    records = synthetic_metrics(5)
    last_eval = [r for r in records if r["phase"] == "evaluate"][-1]
    assert f"{last_eval['aggregate']['dice']:.4f} (round 5)" in text
    for site in SITES:
        n_train = next(r for r in records if r["phase"] == "train" and site in r["sites"])["sites"][site]["num-examples"]
        assert re.search(rf"\| {site} \| {n_train} \|", text)
    assert not list(run.glob(".*.tmp*"))  # atomic writes leave no temporaries

    # rebuilt by `fedimaging report` after the metrics lost their DP entries: the stale epsilon plot goes
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_metrics(5, dp=False)))
    assert report_main([str(run)]) == 0
    assert str(run / "report.md") in capsys.readouterr().out
    assert not (run / "report-epsilon.png").exists()
    assert "report-epsilon.png" not in report.read_text()
    assert report_main([str(tmp_path / "missing")]) == 2


def test_summaries_match_records(tmp_path):
    run = make_run_dir(tmp_path / "run", rounds=4)
    data = load_run(run)
    rows = {r["site"]: r for r in site_summary(data.records, "dice")}
    records = synthetic_metrics(4)
    for site in SITES:
        trained = sum(1 for r in records if r["phase"] == "train" and site in r["sites"])
        excluded = sum(1 for r in records if site in r["excluded"])
        assert rows[site]["rounds trained"] == trained
        assert rows[site]["times excluded"] == excluded
        last = [r for r in records if r["phase"] == "evaluate"][-1]["sites"][site]["dice"]
        assert rows[site]["dice"] == pytest.approx(last)
    assert ("3", "train", "site-c", "rejected: update norm 41.2 > bound 10.0") in exclusions(data)


def test_crashed_run_still_gets_a_report(tmp_path):
    """Round 2 crashed mid-write: torn last line, no final model, no cross-site, no run config."""
    run = tmp_path / "crashed"
    run.mkdir()
    records = synthetic_metrics(rounds=2, dp=False)
    lines = [json.dumps(r) for r in records[:3]]  # round 1 complete, round 2 train only
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"round": 2, "phase": "evalu')
    report = write_report(run)
    text = report.read_text()
    assert "1 incomplete or invalid line" in text
    assert "run_config.json` is missing" in text
    assert "no final model" in text
    for png in _linked_pngs(report):
        _check_png(png)
    assert "report-epsilon.png" not in text and "report-cross-site.png" not in text


def test_empty_and_damaged_inputs(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    (run / "run_config.json").write_text("{not json")
    (run / "cross_site.json").write_text('{"models": ["global"], "sites": ["a"], "matrix": [[null]]}')
    report = write_report(run)
    text = report.read_text()
    assert "`run_config.json` could not be read" in text
    assert "no round finished" in text
    assert _linked_pngs(report) == []
