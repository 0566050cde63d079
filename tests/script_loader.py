"""Load one of the repository's scripts (``scripts/NAME.py``) as a module, for the tests that
check it. The scripts folder is on ``sys.path`` while it runs, so a script may import its
neighbours."""
import importlib.util
import pathlib
import sys

SCRIPTS = pathlib.Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    """The module of ``scripts/{name}.py``."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(SCRIPTS))
