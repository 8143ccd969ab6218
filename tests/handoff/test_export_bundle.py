"""fedimaging export: a MONAI bundle that MONAI's own runner executes, giving predict's mask."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run

from app.export_bundle import export_main
from app.predict import predict_main


def _predict(seg_run, case, out):
    assert predict_main(["--model", str(seg_run / "final_model.pt"), "--input", str(case), "--output", str(out),
                         "--device", "cpu", "--force"]) == 0
    img = nib.load(str(out))
    return np.asanyarray(img.dataobj), img.affine


@pytest.fixture(scope="module")
def bundle(seg_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "bundle"
    assert export_main([str(seg_run), str(out)]) == 0
    return out


def test_bundle_layout(bundle, seg_run):
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    weights = torch.load(bundle / "models/model.pt", weights_only=True)
    source = torch.load(seg_run / "final_model.pt", weights_only=True)
    assert weights.keys() == source.keys() and all(torch.equal(weights[k], source[k]) for k in source)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs/inference.json"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(weights)  # the config describes exactly this model (strict)
    assert "--input_file" in (bundle / "docs/README.md").read_text()


def test_bundle_runs_in_process_and_matches_predict(bundle, seg_run, ct_case, demo_mr, tmp_path):
    mr_case = sorted((demo_mr / "imagesTs").glob("*.nii.gz"))[0]
    for kind, case in (("ct", ct_case), ("mr", mr_case)):  # demo case names are pseudonyms
        out_dir = tmp_path / f"bundle-out-{kind}"
        bundle_run(config_file=str(bundle / "configs/inference.json"), bundle_root=str(bundle),
                   input_file=str(case), output_dir=str(out_dir), device="$torch.device('cpu')")
        produced = sorted(out_dir.glob("*.nii.gz"))
        assert [p.name for p in produced] == [case.name.replace(".nii.gz", "_seg.nii.gz")]
        img = nib.load(str(produced[0]))
        expected, affine = _predict(seg_run, case, tmp_path / f"predict-{case.name}")
        assert img.shape == expected.shape
        np.testing.assert_allclose(img.affine, affine, atol=1e-5)
        assert np.array_equal(np.asanyarray(img.dataobj), expected)


def test_export_refuses_to_overwrite(bundle, seg_run, capsys):
    assert export_main([str(seg_run), str(bundle)]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("fire") is None, reason="python -m monai.bundle needs the 'fire' package")
def test_bundle_command_line(bundle, seg_run, ct_case, tmp_path):
    out_dir = tmp_path / "cli-out"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs/inference.json"),
           "--bundle_root", str(bundle), "--input_file", str(ct_case), "--output_dir", str(out_dir),
           "--device", "$torch.device('cpu')"]
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    (produced,) = out_dir.glob("*.nii.gz")
    expected, _ = _predict(seg_run, ct_case, tmp_path / "predict.nii.gz")
    assert np.array_equal(np.asanyarray(nib.load(str(produced)).dataobj), expected)


def test_fedbn_export_carries_the_site_layers(tmp_path):
    from .fixtures import save_random_model, write_run_config

    run = tmp_path / "run-fedbn"
    write_run_config(run, strategy="fedbn")
    save_random_model(run)
    source = torch.load(run / "final_model.pt", weights_only=True)
    local = {k: torch.full_like(v, 0.25) for k, v in source.items() if ".adn.N." in k}
    assert local
    site_file = tmp_path / "fedbn-round-000004.pt"
    torch.save(local, site_file)
    assert export_main([str(run), str(tmp_path / "no-site")]) == 2  # FedBN needs a site's layers
    out = tmp_path / "bundle"
    assert export_main([str(run), str(out), "--site-state", str(site_file)]) == 0
    weights = torch.load(out / "models/model.pt", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in local.items())
    assert all(torch.equal(weights[k], source[k]) for k in source if k not in local)
    assert json.loads((out / "configs/metadata.json").read_text())["federated_run"]["fedbn_site_layers"] is True


def test_bundle_of_a_mirrored_run_mirrors_as_predict_does(seg_run, demo_mr, tmp_path):
    from .fixtures import write_run_config

    run = tmp_path / "run-mirrored"
    write_run_config(run, **{"mirror-axes": "0,2"})
    (run / "final_model.pt").write_bytes((seg_run / "final_model.pt").read_bytes())  # the same weights
    out = tmp_path / "bundle-mirrored"
    assert export_main([str(run), str(out)]) == 0
    case = sorted((demo_mr / "imagesTs").glob("*.nii.gz"))[0]
    bundle_run(config_file=str(out / "configs/inference.json"), bundle_root=str(out),
               input_file=str(case), output_dir=str(tmp_path / "out"), device="$torch.device('cpu')")
    produced = np.asanyarray(nib.load(str(sorted((tmp_path / "out").glob("*.nii.gz"))[0])).dataobj)
    expected, _ = _predict(run, case, tmp_path / "predict-mirrored.nii.gz")
    unmirrored, _ = _predict(seg_run, case, tmp_path / "predict-plain.nii.gz")
    assert np.array_equal(produced, expected)
    assert not np.array_equal(expected, unmirrored)  # mirroring changed the mask, in predict and the bundle
    # a reader of the bundle learns that it mirrors, along which axes, and how many passes it costs
    assert "RAS axes [0, 2] (4 passes" in (out / "docs" / "README.md").read_text()
    assert "mirrored along every combination of RAS axes [0, 2]" in json.loads(
        (out / "configs/metadata.json").read_text())["description"]
    plain = tmp_path / "bundle-plain"
    assert export_main([str(seg_run), str(plain)]) == 0
    assert "mirror" not in (plain / "docs" / "README.md").read_text()
