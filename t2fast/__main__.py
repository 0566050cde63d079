"""``python -m t2fast ...``: the ``t2fast`` command line (:mod:`t2fast.cli`)."""
import sys

from .cli import main

sys.exit(main())
