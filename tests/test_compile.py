"""The Triton kernels build for a Hopper GPU (sm_90), checked on the CPU: scripts/compile_kernels.py runs Triton's
compiler and the ptxas it ships, no GPU needed. The interpreter tests what kernels compute; some mistakes only
the compiler refuses (e.g. a loop bound that must be a constexpr), and those would otherwise first show on a GPU."""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90(tmp_path):
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton ships no ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "compile_kernels.py")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "all compiled" in run.stdout, run.stdout + run.stderr
    assert run.stdout.count("OK ") == 20
