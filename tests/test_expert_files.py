"""Expert files and SVD cache entries as t2fast reads and writes them: the header is checked
(duplicate keys, dtypes, shapes against the model, sizes) before any tensor data is read;
unreadable files say so; files are written with the umask's mode and no temporary file is left;
the SVD cache's tolerance is the loader's; an unwritable cache only warns."""
import json
import os
import struct
import warnings
from pathlib import Path

import pytest
import torch

from t2fast import safetensors_io
from t2fast.decompose import SVD_FORMAT, SVD_VERSION, SVDCache, decompose_model, weight_hash
from t2fast.experts import MAX_EXPERT_BYTES, Expert, expert_targets, load_expert
from t2fast.models import random_tiny_llama
from t2fast.safetensors_io import T2FileError, write_file

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def model():
    return random_tiny_llama(seed=1, **TINY).eval()


@pytest.fixture(scope="module")
def factors(model):
    return decompose_model(model, "mlp", cache_dir=False, progress=False).factors


def _raw(path: Path, header_text: str, data: bytes = b"", size: int | None = None) -> Path:
    """A safetensors file with exactly this header text and data (``size``: extend the file,
    sparse, to that many bytes of data)."""
    head = header_text.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + data)
        if size is not None:
            f.truncate(8 + len(head) + size)
    return path


def _meta_text(name="e"):
    return (f'"__metadata__": {{"format": "t2fast-expert", "format_version": "1", '
            f'"name": "{name}"}}')


def _entries(factors, lengths=None):
    """Header entries of float32 z vectors (``lengths`` replaces some ranks) and their bytes."""
    entries, start = [], 0
    for n, f in factors.items():
        r = (lengths or {}).get(n, f.rank)
        entries.append(f'"{n}": {{"dtype": "F32", "shape": [{r}], '
                       f'"data_offsets": [{start}, {start + 4 * r}]}}')
        start += 4 * r
    return entries, start


def test_duplicate_metadata_key_is_refused(tmp_path, factors):
    entries, nbytes = _entries(factors)
    text = "{" + _meta_text("a")[:-1] + ', "name": "b"}, ' + ", ".join(entries) + "}"
    path = _raw(tmp_path / "dup.safetensors", text, bytes(nbytes))
    with pytest.raises(T2FileError, match=r"dup\.safetensors'.*gives the key 'name' twice"):
        load_expert(path, factors)
    text = "{" + _meta_text() + ", " + ", ".join(entries + entries[:1]) + "}"
    path = _raw(tmp_path / "dup2.safetensors", text, bytes(nbytes))
    with pytest.raises(T2FileError, match=r"gives the key 'model\.layers\.0\.mlp\.\w+' twice"):
        load_expert(path, factors)


def test_duplicate_key_inside_json_metadata_is_refused(tmp_path, factors):
    e = Expert.ones("e", factors)
    path = write_file(tmp_path / "e.safetensors", {n: z for n, z in e.z.items()},
                      "t2fast-expert", "1", {"name": "e", "extra_json": "x"})
    # rewrite the one metadata entry by hand: a JSON object with a repeated key
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    header["__metadata__"]["extra_json"] = '{"k": 1, "k": 2}'
    text = json.dumps(header)
    _raw(path, text, blob[8 + n:])
    with pytest.raises(T2FileError, match=r"metadata extra_json gives the key 'k' twice"):
        load_expert(path, factors)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_z_in_other_float_dtypes_is_read_exactly(tmp_path, factors, dtype):
    e = Expert.random("e", factors, scale=0.3, seed=4)
    exact = {n: z.to(dtype).float() for n, z in e.z.items()}     # values the dtype holds
    path = write_file(tmp_path / "e.safetensors", {n: z.to(dtype) for n, z in exact.items()},
                      "t2fast-expert", "1", {"name": "e"})
    got = load_expert(path, factors)
    for n, z in got.z.items():
        assert z.dtype == torch.float32 and torch.equal(z, exact[n])


def test_float64_z_that_is_not_a_float32_value_is_refused(tmp_path, factors):
    z = {n: torch.ones(f.rank, dtype=torch.float64) for n, f in factors.items()}
    z[DOWN][3] = 1 + 2 ** -40                       # between two float32 values
    path = write_file(tmp_path / "f64.safetensors", z, "t2fast-expert", "1", {"name": "e"})
    with pytest.raises(T2FileError, match=r"z for model\.layers\.0\.mlp\.down_proj is float64 "
                                          r"and z\[3\] = 1\.0000000000009\d* is not a float32"):
        load_expert(path, factors)


def test_integer_z_is_refused_before_reading(tmp_path, factors):
    z = {n: torch.ones(f.rank, dtype=torch.int32) for n, f in factors.items()}
    path = write_file(tmp_path / "int.safetensors", z, "t2fast-expert", "1", {"name": "e"})
    with pytest.raises(T2FileError, match=r"int\.safetensors'.*is torch\.int32; expert files "
                                          r"hold torch\.float32, torch\.float16"):
        load_expert(path)


class _Counting:
    """A file that counts the bytes read from it."""

    def __init__(self, f, counts):
        self.f, self.counts = f, counts

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def fileno(self):
        return self.f.fileno()

    def read(self, n=-1):
        data = self.f.read(n)
        self.counts.append(len(data))
        return data

    def readinto(self, buf):
        n = self.f.readinto(buf)
        self.counts.append(n)
        return n


def _bytes_read(monkeypatch, call) -> int:
    counts, real = [], safetensors_io._open
    monkeypatch.setattr(safetensors_io, "_open", lambda *a: _Counting(real(*a), counts))
    call()
    return sum(counts)


def _long_z_file(tmp_path, factors, length: int) -> Path:
    """An expert file whose header declares the down_proj z ``length`` floats long (sparse)."""
    entries, nbytes = _entries(factors, {DOWN: length})
    return _raw(tmp_path / "big.safetensors", "{" + ", ".join([_meta_text()] + entries) + "}",
                size=nbytes)


def test_header_is_checked_against_the_model_before_the_data_is_read(tmp_path, factors,
                                                                     monkeypatch):
    big = 16 << 20              # one z declared 64 MB long (a sparse file: nothing is written)
    path = _long_z_file(tmp_path, factors, big)

    def load():
        with pytest.raises(T2FileError, match=rf"z for {DOWN} has shape \({big},\), but that "
                                              rf"matrix has rank"):
            load_expert(path, factors)
    assert _bytes_read(monkeypatch, load) < 4096, "tensor data was read before the header check"


def test_expert_without_a_model_is_capped(tmp_path, factors, monkeypatch):
    path = _long_z_file(tmp_path, factors, MAX_EXPERT_BYTES // 4 + 1)

    def load():
        with pytest.raises(T2FileError, match=r"declares \d+ bytes of tensor data, more than an? "
                                              r"expert file may hold \(268435456\)"):
            load_expert(path)
    assert _bytes_read(monkeypatch, load) < 4096


@pytest.mark.parametrize("text, pattern", [
    ('{"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}', r"needs 16 bytes, the "
                                                                       r"header gives it 8"),
    ('{"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', r"overlap or leave gaps"),
    ('{"x": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}', r"entry for tensor 'x' is "
                                                                      r"not"),
    ("[" * 100000 + "]" * 100000, r"nested too deeply"),
    ('{"__metadata__": {"a": 1}}', r"__metadata__ is not an object of strings"),
])
def test_malformed_headers_are_named(tmp_path, text, pattern):
    path = _raw(tmp_path / "bad.safetensors", text, bytes(8))
    with pytest.raises(T2FileError, match=r"bad\.safetensors'.*" + pattern):
        load_expert(path)


def test_header_length_is_capped(tmp_path):
    path = tmp_path / "long.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(T2FileError, match=r"header claims 1099511627776 bytes"):
        load_expert(path)


def test_unreadable_file_says_permission_denied(tmp_path, factors, monkeypatch):
    path = Expert.ones("e", factors).save(tmp_path / "e.safetensors")
    if os.geteuid() != 0:
        path.chmod(0)
    else:                   # root reads any file: deny it the way the OS would
        real_open = open

        def deny(file, *a, **k):
            if Path(file) == path:
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *a, **k)
        monkeypatch.setattr(safetensors_io, "open", deny, raising=False)
    with pytest.raises(T2FileError, match=r"expert file '.*e\.safetensors' cannot be read: "
                                          r"permission denied"):
        load_expert(path, factors)
    with pytest.raises(T2FileError, match=r"does not exist"):
        load_expert(tmp_path / "missing.safetensors")


def test_expert_targets_reads_the_header_only(tmp_path, factors):
    path = Expert.ones("e", factors).save(tmp_path / "e.safetensors")
    assert expert_targets(path) == list(factors)
    Expert.ones("e", factors).save_pretrained(tmp_path / "dir")
    assert expert_targets(tmp_path / "dir") == list(factors)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_are_written_with_the_umask_mode(tmp_path, factors, umask, mode):
    old = os.umask(umask)
    try:
        path = Expert.ones("e", factors).save(tmp_path / "e.safetensors")
        cache = SVDCache(tmp_path / "svd")
        w = torch.randn(6, 4)
        cache.get_or_compute(w)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert cache.path(weight_hash(w)).stat().st_mode & 0o777 == mode


# ---- the SVD cache ---------------------------------------------------------------------------
def test_cache_tolerance_is_the_loaders_never_the_files(tmp_path, model):
    w = model.get_submodule(DOWN).weight
    g = torch.Generator().manual_seed(0)
    noisy = w + 0.3 * w.abs().mean() * torch.randn(w.shape, generator=g)
    U, S, Vh = torch.linalg.svd(noisy.double(), full_matrices=False)
    cache = SVDCache(tmp_path)
    write_file(cache.path(weight_hash(w)), {"U": U.float(), "S": S.float(), "Vh": Vh.float()},
               SVD_FORMAT, SVD_VERSION, {"shape": list(w.shape), "probe_rtol": 0.9})
    with pytest.warns(UserWarning, match=r"probe error 0\.\d+ > tolerance 0\.0001"):
        f, hit = cache.get_or_compute(w, DOWN)
    assert not hit and torch.allclose(f.reconstruct(), w, atol=1e-5)
    # the recomputed entry replaced the noisy one; a loose loader may choose its tolerance
    write_file(cache.path(weight_hash(w)), {"U": U.float(), "S": S.float(), "Vh": Vh.float()},
               SVD_FORMAT, SVD_VERSION, {"shape": list(w.shape)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SVDCache(tmp_path, probe_rtol=0.9).get_or_compute(w, DOWN)[1]


def _compute_warns(cache_dir, pattern):
    w = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    cache = SVDCache(cache_dir)
    with pytest.warns(UserWarning, match=pattern) as record:
        f, hit = cache.get_or_compute(w)
        cache.get_or_compute(w * 2)             # one warning per cache, not per matrix
    assert not hit and torch.allclose(f.reconstruct(), w, atol=1e-5)
    assert len([r for r in record if "cannot be written" in str(r.message)]) == 1
    return cache


def test_cache_path_that_is_a_file_warns_and_computes(tmp_path):
    (tmp_path / "svd").write_text("not a folder")
    _compute_warns(tmp_path / "svd", r"SVD cache folder '.*svd' cannot be written \('.*svd' is "
                                     r"a file, not a folder\): the factors are computed")
    _compute_warns(tmp_path / "svd" / "sub", r"cannot be written \(Not a directory\)")


def test_unwritable_cache_warns_computes_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    root = tmp_path / "svd"
    root.mkdir()
    if os.geteuid() != 0:
        root.chmod(0o555)
    else:                   # root writes anywhere: refuse the way a read-only folder would
        def deny(file, mode="r", *a, **k):
            raise PermissionError(13, "Permission denied", str(file))
        monkeypatch.setattr(safetensors_io, "open", deny, raising=False)
    _compute_warns(root, r"cannot be written \(Permission denied\)")
    assert list(root.iterdir()) == []


def test_failed_write_removes_its_temporary_file(tmp_path, monkeypatch):
    def fail(self, target):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Path, "replace", fail)
    with pytest.raises(OSError, match="No space left"):
        write_file(tmp_path / "x.safetensors", {"a": torch.ones(3)}, "f", "1", {})
    assert list(tmp_path.iterdir()) == []
    _compute_warns(tmp_path / "svd", r"cannot be written \(No space left on device\)")
    assert list((tmp_path / "svd").iterdir()) == []


def test_tensors_at_any_offset_are_read_exactly(tmp_path):
    a, b = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), torch.tensor([2.5, -1 / 3])
    meta = {"format": "f", "format_version": "1"}
    text = json.dumps({"__metadata__": meta,          # b starts at byte 6: misaligned for float64
                       "a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
                       "b": {"dtype": "F64", "shape": [2], "data_offsets": [6, 22]}})
    path = _raw(tmp_path / "m.safetensors", text,
                a.numpy().tobytes() + b.double().numpy().tobytes())
    t, _ = safetensors_io.read_file(path, "x", "f", ("1",), max_bytes=22,
                                    dtypes=(torch.float16, torch.float64))
    assert torch.equal(t["a"], a) and torch.equal(t["b"], b.double())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "pickle"])
def test_a_pytorch_checkpoint_is_named_as_such(tmp_path, legacy):
    """An official Transformer² expert is a torch.save file: say so and how to convert it,
    not that a safetensors header claims 5e17 bytes."""
    path = tmp_path / "learnable_params.pt"
    torch.save({"model.layers.0.mlp.down_proj.weight": torch.ones(3)}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(T2FileError, match=r"learnable_params\.pt' is a zip or pickle file "
                                          r".*converted by t2fast import-official"):
        load_expert(path)
