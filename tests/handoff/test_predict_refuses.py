"""predict refuses input and models that would give a wrong mask with exit 0 (issue 18, items 5, 9).

Before: an all-NaN or partly infinite image, or a model with a NaN weight, gave an all-background
mask and exit code 0; ``--force`` let the mask replace the input image itself.
"""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from app.predict import predict_main
from data_prep.synthetic_dicom import write_volume

from .fixtures import write_run_config


def _args(run, case, out, *extra):
    return ["--model", str(run / "final_model.pt"), "--input", str(case), "--output", str(out),
            "--device", "cpu", "--quiet", *extra]


def _damaged_image(src, dst, how: str):
    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    if how == "all_nan":
        data[:] = np.nan
    else:
        data[0, 0, 0], data[3, 4, 5] = np.inf, -np.inf
    nib.save(nib.Nifti1Image(data, img.affine), str(dst))
    return dst


@pytest.mark.parametrize("how, count", [("all_nan", None), ("part_inf", 2)])
def test_non_finite_input_is_refused(seg_run, ct_case, tmp_path, capsys, how, count):
    bad = _damaged_image(ct_case, tmp_path / f"{how}_0000.nii.gz", how)
    out = tmp_path / "mask.nii.gz"
    assert predict_main(_args(seg_run, bad, out)) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "NaN or infinite" in err
    if count:
        assert f"{count} of" in err
    assert not out.exists()


def test_model_with_nan_weights_is_refused(seg_run, ct_case, tmp_path, capsys):
    run = tmp_path / "run-nan"
    write_run_config(run)
    state = torch.load(seg_run / "final_model.pt", weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    torch.save(state, run / "final_model.pt")
    out = tmp_path / "mask.nii.gz"
    assert predict_main(_args(run, ct_case, out)) == 2
    err = capsys.readouterr().err
    assert str(run / "final_model.pt") in err and name in err and "NaN" in err
    assert not out.exists()


def test_force_never_overwrites_the_input(seg_run, ct_case, tmp_path, capsys):
    own = tmp_path / "own_0000.nii.gz"
    shutil.copy(ct_case, own)
    before = own.read_bytes()
    assert predict_main(_args(seg_run, own, own, "--force")) == 1
    assert "would overwrite or write into the input" in capsys.readouterr().err
    assert own.read_bytes() == before
    # nor through a symlink to it, nor into an input DICOM folder
    link = tmp_path / "link.nii.gz"
    link.symlink_to(own)
    assert predict_main(_args(seg_run, own, link, "--force")) == 1
    assert own.read_bytes() == before
    series = tmp_path / "series"
    write_volume(series, np.diag([4.0, 4.0, 5.0, 1.0]), np.zeros((12, 10, 6)) - 1000.0)
    files = sorted(p.name for p in series.iterdir())
    assert predict_main(_args(seg_run, series, series / "mask.nii.gz", "--force")) == 1
    assert sorted(p.name for p in series.iterdir()) == files
