#!/usr/bin/env bash
# The kernel checks under Triton 3.6 (the version on the GPU machine the project measures on),
# beside the Triton of .venv: builds .venv36, a venv with triton==3.6.0 in its own
# site-packages, in front of .venv's packages (torch, t2fast, pytest: read through a .pth),
# then runs the interpreter kernel tests and the sm_90 compile gate (Triton 3.6 compiles the
# cubin with its own ptxas, whose spills the gate rejects) with it.
#
#   scripts/test_triton36.sh               # the tests (make test-triton36)
#   scripts/test_triton36.sh --registers   # and the register/spill table of every gated kernel
#
# TRITON_VERSION (default 3.6.0) and VENV36 (default .venv36) choose another pair.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${TRITON_VERSION:-3.6.0}
ENV=${VENV36:-.venv36}
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

test -x .venv/bin/python || { echo ".venv is missing: run 'make install' first" >&2; exit 1; }
test -x "$ENV/bin/python" || .venv/bin/python -m venv "$ENV"
echo "import site; site.addsitedir('$(purelib .venv/bin/python)')" \
    > "$(purelib "$ENV/bin/python")/zz_t2fast_venv.pth"
if ! "$ENV/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$VERSION')" \
        2>/dev/null; then
    "$ENV/bin/python" -m pip install -q --no-deps "triton==$VERSION"
fi
"$ENV/bin/python" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, triton.__file__)"
"$ENV/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '$VERSION')"

TRITON_INTERPRET=1 "$ENV/bin/python" -m pytest -q -rs tests/test_svf_groups.py \
    tests/test_ops_kernels.py tests/test_kernel_configs.py tests/test_kernel_compile.py
if [ "${1:-}" = "--registers" ]; then
    "$ENV/bin/python" scripts/kernel_registers.py
fi
