"""scripts/train_tiny_model.py: which weights a run saves (``--keep``)."""
import pathlib

import pytest
from safetensors.torch import load_file

from t2fast.models import tiny_model_path

from script_loader import load_script


train_tiny_model = load_script("train_tiny_model")


def run(out: pathlib.Path, keep: str) -> dict:
    # Band 0-1 with one validation example per task: every evaluation is a candidate at margin
    # 0, so "band" keeps the first one (a later one is never strictly better) and the margin
    # of 0.6 is never reached (the run goes to the last step).
    return train_tiny_model.main([
        "--init-from", str(tiny_model_path() / "model.safetensors"), "--steps", "2",
        "--eval-every", "1", "--eval-n", "1", "--test-n", "1", "--batch-size", "4",
        "--lr", "1e-2", "--warmup", "1", "--band", "0", "1", "--margin", "0.6",
        "--mix", '{"arith": 0.5, "strings": 0.5}', "--habit", "{}", "--keep", keep,
        "--no-progress", "--out", str(out)])


def test_keep_last_saves_the_last_step_and_band_the_best_candidate(tmp_path):
    band = run(tmp_path / "band", "band")
    last = run(tmp_path / "last", "last")
    assert (band["steps_run"], band["kept_step"], band["band_reached"]) == (2, 1, True)
    assert (last["steps_run"], last["kept_step"], last["band_reached"]) == (2, 2, True)
    w_band = load_file(str(tmp_path / "band" / "model.safetensors"))
    w_last = load_file(str(tmp_path / "last" / "model.safetensors"))
    assert any(not (w_band[k] == w_last[k]).all() for k in w_band), \
        "--keep last saved the same weights as the band's step-1 candidate"


def test_keep_rejects_an_unknown_choice():
    with pytest.raises(SystemExit):
        train_tiny_model.parse_args(["--keep", "best"])
