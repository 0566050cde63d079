"""Cross-model transfer (scripts/cross_model.py and its section of make_results): the arms
reorder z as they claim, the second base model is the one measured and really another model,
and re-measuring one section refuses what would mix settings."""
import json
import pathlib

import pytest
import torch

from t2fast.experts import Expert, T2FileError

from script_loader import load_script

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cm():
    return load_script("cross_model")


def toy_expert():
    g = torch.Generator().manual_seed(7)
    return Expert("arith", {"b.weight": torch.rand(16, generator=g) + 0.5,
                            "a.weight": torch.rand(16, generator=g) + 0.5},
                  "tiny", None, {"kept": 1})


def test_arms_reorder_each_matrix(cm):
    e = toy_expert()
    matched = cm.reorder(e, "matched")
    assert matched.name == "arith_matched" and matched.extra["kept"] == 1
    for t, v in e.z.items():
        assert torch.equal(matched.z[t], v)
        assert matched.z[t].data_ptr() != v.data_ptr()
        assert torch.equal(cm.reorder(e, "reversed").z[t], v.flip(0))
    sh = cm.reorder(e, "shuffled", seed=2)
    assert sh.name == "arith_shuffled2" and sh.extra["shuffle_seed"] == 2
    for t, v in e.z.items():
        assert torch.equal(sh.z[t].sort().values, v.sort().values)     # same values
        assert not torch.equal(sh.z[t], v)                             # another order
        assert torch.equal(cm.reorder(e, "shuffled", seed=2).z[t], sh.z[t])
        assert not torch.equal(cm.reorder(e, "shuffled", seed=3).z[t], sh.z[t])
    # each matrix its own permutation
    ones = Expert("x", {t: torch.arange(16.0) for t in ("a", "b")})
    perm = cm.reorder(ones, "shuffled", seed=0).z
    assert not torch.equal(perm["a"], perm["b"])
    with pytest.raises(ValueError, match="arm 'sorted'"):
        cm.reorder(e, "sorted")


def test_second_base_is_the_measured_model_and_another_model(cm):
    from t2fast import patch_model
    from t2fast.models import load_tiny, tiny_expert, tiny_model_path
    folder = ROOT / cm.SECOND_BASE
    results = json.loads((ROOT / "results" / "results.json").read_text())["cross_model"]
    assert cm.weights_sha256(folder) == results["sha256"]
    assert cm.weights_sha256(folder) != cm.weights_sha256(tiny_model_path())
    first = json.loads((tiny_model_path() / "config.json").read_text())
    second = json.loads((folder / "config.json").read_text())
    assert {k: v for k, v in first.items() if k != "transformers_version"} == \
        {k: v for k, v in second.items() if k != "transformers_version"}
    model, _ = load_tiny(path=folder)
    with pytest.raises(T2FileError, match="trained on another base model"):
        patch_model(model, experts=[tiny_expert("arith")], backend="torch", progress=False)
    handle = patch_model(model, experts=[tiny_expert("arith")], backend="torch", progress=False,
                         allow_other_model=True)
    assert handle.expert_names == ["arith"]
    handle.restore()
    # its own experts were made for it
    own = [folder / "experts" / f"{f}.safetensors" for f in ("arith", "strings", "choice")]
    assert patch_model(model, experts=own, backend="torch", progress=False).expert_names == \
        ["arith", "strings", "choice"]


def test_only_refuses_to_mix_settings(tmp_path):
    mr = load_script("make_results")
    out = tmp_path / "res"
    with pytest.raises(SystemExit, match="does not exist"):
        mr.previous_results(mr.parse_args(["--only", "cross_model", "--out", str(out)]))
    with pytest.raises(SystemExit, match="--train"):
        mr.previous_results(mr.parse_args(["--only", "cross_model", "--train", "--out",
                                           str(out)]))
    out.mkdir()
    args = mr.parse_args(["--only", "cross_model", "--out", str(out)])
    (out / "results.json").write_text(json.dumps({"args": mr.run_args(args)}))
    assert mr.previous_results(args)["args"]["n"] == 500
    with pytest.raises(SystemExit, match=r"other settings \(n, shots\)"):
        mr.previous_results(mr.parse_args(["--only", "heldout", "--n", "50", "--shots", "5",
                                           "--out", str(out)]))
    # settings only some sections use may change when all of those are re-measured
    old = mr.run_args(args)
    (out / "results.json").write_text(json.dumps({"args": {**old, "cem_variants": {}}}))
    cem_sections = ["heldout", "cross_model", "transfer_base"]
    got = mr.previous_results(mr.parse_args(["--only", *cem_sections, "--out", str(out)]))
    assert got["args"]["cem_variants"] == json.loads(json.dumps(mr.CEM_VARIANTS))
    for some in (cem_sections[:1], cem_sections[1:]):
        with pytest.raises(SystemExit, match=r"other settings \(cem_variants\)"):
            mr.previous_results(mr.parse_args(["--only", *some, "--out", str(out)]))
    with pytest.raises(SystemExit):
        mr.parse_args(["--only", "everything"])
