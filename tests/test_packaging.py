"""The sdist is the whole project and the wheel is the product: built as a user builds them, the
wheel installed in a fresh environment runs the demo and the README's example from any folder.

The wheel is built from the sdist (as ``python -m build`` does), so a file the sdist lacks
breaks the build here. The fresh environment is a virtualenv that sees the installed
dependencies (torch, transformers, ...) through a ``.pth`` file but not this checkout.
"""
import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

import t2fast
from test_readme import ten_line_example

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_EXPERTS = ("arith", "choice", "classify", "strings")


def tracked_files() -> list[str]:
    res = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if res.returncode != 0:
        pytest.skip("not a git checkout (the sdist's own tests have no git index to compare)")
    return [f for f in res.stdout.decode().split("\0") if f and (ROOT / f).exists()]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """``{"sdist": ..., "wheel": ...}``, the wheel built from the unpacked sdist."""
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                    "print(b.build_sdist(sys.argv[1]))", str(out)],
                   cwd=ROOT, check=True, capture_output=True)
    sdist, = out.glob("t2fast-*.tar.gz")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "-w", str(out), str(sdist)],
                   check=True, capture_output=True)
    wheel, = out.glob("t2fast-*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_sdist_holds_every_tracked_file(dist):
    with tarfile.open(dist["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    missing = sorted(set(tracked_files()) - names)
    assert not missing, f"the sdist lacks {missing[:20]} (MANIFEST.in)"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_holds_the_package_the_tiny_world_and_the_license(dist):
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = {n for n in whl.namelist() if ".dist-info/" not in n}
        meta = whl.read(f"t2fast-{t2fast.__version__}.dist-info/METADATA").decode()
        licenses = [n for n in whl.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    tracked = tracked_files()
    expected = ({f for f in tracked if f.startswith("t2fast/")}
                | {f"t2fast/assets/experts/{e}.safetensors" for e in SHIPPED_EXPERTS})
    assert names == expected, (f"missing {sorted(expected - names)[:10]}, "
                               f"unexpected {sorted(names - expected)[:10]} (setup.py)")
    assert licenses and "License-Expression: Apache-2.0" in meta
    assert f"Version: {t2fast.__version__}\n" in meta
    assert "Requires-Dist: torch>=" in meta and "<2.14" not in meta


def _fresh_env(path: Path) -> Path:
    """A virtualenv that sees this interpreter's installed packages but not this checkout (the
    ``.pth`` lists their folders; the editable install's own ``.pth`` hook is not run)."""
    venv.create(path, with_pip=False)
    python = path / "bin" / "python"
    site = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    Path(site, "zz_t2fast_test_deps.pth").write_text("\n".join(deps) + "\n")
    return python


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_and_the_readme_example(dist, tmp_path):
    python = _fresh_env(tmp_path / "env")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(dist["wheel"])], check=True, capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(T2FAST_CACHE=str(tmp_path / "cache"), TRITON_INTERPRET="0")

    def run(*args) -> str:
        res = subprocess.run([*args], cwd=work, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    where = run(python, "-c", "import importlib.metadata as m, t2fast; "
                "print(t2fast.__file__); print(m.version('t2fast'), t2fast.__version__)")
    installed = Path(where.splitlines()[0]).parent
    assert installed.is_relative_to(tmp_path / "env"), where
    assert where.splitlines()[1] == f"{t2fast.__version__} {t2fast.__version__}"
    assert "import-official" in run(tmp_path / "env" / "bin" / "t2fast", "--help")

    # the README's table names the tiny world by attribute after `import t2fast`
    assert run(python, "-c", "import t2fast; print(t2fast.tasks.get_task('arith').name, "
               "t2fast.models.tiny_expert('arith').name)").split() == ["arith",
                                                                     "arith.safetensors"]

    code, printed = ten_line_example()
    assert run(python, "-c", code) == printed

    demo = run(python, "-m", "t2fast.demo", "--rows-per-family", "4", "--max-new-tokens", "8")
    assert "bundled tiny Llama" in demo and "random stand-in" not in demo
    for family in ("arith", "strings", "choice"):
        assert f"{family:<10} {installed / 'assets' / 'experts' / family}.safetensors" in demo


def test_ci_runs_the_readme_test_command_first_then_the_newest_releases():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## The two commands", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    test_command = [line.split("#")[0].strip() for line in block.splitlines()
                    if "test suite" in line]
    steps = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line and not line.startswith(("#", "set ", "cd "))]
    assert test_command == ["make test"] and steps == ["make test", "make test-newest"]


def test_the_checkout_root_holds_no_package_but_t2fast():
    """Where the checkout root is on sys.path (``python -m pytest``, ``make demo``), a top-level
    package would shadow an installed one of that name: a ``kernels/`` folder hid PyPI's
    ``kernels``, which transformers imports when it loads a model."""
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["t2fast"]
