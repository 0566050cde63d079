"""The transfer base model (results/transfer_base, section 3e of results/README.md): it is the
model measured, it was pre-trained on the transfer and two-step families, its experts were made
for it and trained on training families only."""
import json
import pathlib

import pytest

from t2fast.experts import load_expert
from t2fast.tasks import CLASSIFY, STEP_FAMILIES, TRAIN_FAMILIES, TRANSFER_FAMILIES

from script_loader import load_script

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mr():
    return load_script("make_results")


def test_transfer_base_is_the_measured_model_and_knows_the_transfer_families(mr):
    from t2fast import patch_model
    from t2fast.models import load_tiny, tiny_model_path
    cm = load_script("cross_model")
    folder = ROOT / mr.TRANSFER_BASE
    results = json.loads((ROOT / "results" / "results.json").read_text())["transfer_base"]
    assert cm.weights_sha256(folder) == results["sha256"]
    assert cm.weights_sha256(folder) != cm.weights_sha256(tiny_model_path())
    report = json.loads((folder / "training_report.json").read_text())
    assert set(TRANSFER_FAMILIES) | set(STEP_FAMILIES) <= set(report["mixture"])
    assert report["mixture"] == results["mixture"]
    assert set(results["unseen"]) == set(TRANSFER_FAMILIES) | set(STEP_FAMILIES)
    # its own experts load without allow_other_model, and none trained on an unseen family
    model, _ = load_tiny(path=folder)
    own = [folder / "experts" / f"{f}.safetensors" for f in (*TRAIN_FAMILIES, CLASSIFY)]
    handle = patch_model(model, experts=own, backend="torch", progress=False)
    assert handle.expert_names == [*TRAIN_FAMILIES, CLASSIFY]
    for p in own:
        assert load_expert(p).extra["config"]["task"] in (*TRAIN_FAMILIES, CLASSIFY)


def test_transfer_base_experts_have_recipes(mr):
    outs = [o for o in mr.RECIPES if o.startswith(f"{mr.TRANSFER_BASE}/experts/")]
    assert sorted(outs) == sorted(f"{mr.TRANSFER_BASE}/experts/{f}.safetensors"
                                  for f in (*TRAIN_FAMILIES, CLASSIFY))
    for o in outs:
        argv = mr.RECIPES[o]
        assert argv[argv.index("--model") + 1] == str(mr.TRANSFER_BASE)
        assert argv[argv.index("--steps") + 1] == "400"
