"""Registers, spills and shared memory of every kernel binary the sm_90 compile gate checks
(``tests/test_kernel_compile.py``), compiled by the installed Triton, as a Markdown table.

    python scripts/kernel_registers.py [--json OUT] [--compare OTHER.json]

Run it with each Triton version we support (``scripts/test_triton36.sh --registers`` runs it
under Triton 3.6): the gate itself only says pass or fail. ``--compare`` puts the ``--json`` of
another version's run beside this one's (``t2fast/kernels/configs/registers-sm90.md``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import triton

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_kernel_compile import SPECS, _label  # noqa: E402

from t2fast.kernels import aot  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write {triton, ptxas, kernels: [...]} here")
    p.add_argument("--compare", help="the --json of another Triton version's run")
    args = p.parse_args()
    reports = aot.compile_reports(SPECS)
    tool = aot.ptxas()
    head = dict(triton=triton.__version__, ptxas=tool[1] if tool else None)
    rows = [dict(kernel=_label(i), **{k: r[k] for k in ("registers", "spill_bytes", "shared")})
            for i, r in enumerate(reports)]
    runs = [dict(head, kernels=rows)]
    if args.compare:
        runs.insert(0, json.loads(Path(args.compare).read_text()))
    print(" vs ".join(f"Triton {r['triton']} (ptxas {r['ptxas']})" for r in runs) + ", sm_90\n")
    cols = [f"{what} {r['triton']}" for r in runs for what in ("registers", "spill bytes")]
    print("| kernel | " + " | ".join(cols) + " | shared bytes |")
    print("|---" * (len(cols) + 2) + "|")
    other = {k["kernel"]: k for k in runs[0]["kernels"]}
    for r in rows:
        both = [other.get(r["kernel"], {}), r] if args.compare else [r]
        vals = [str(k.get(f, "-")) for k in both for f in ("registers", "spill_bytes")]
        print(f"| {r['kernel']} | " + " | ".join(vals) + f" | {r['shared']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(head, kernels=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
