#!/usr/bin/env python3
"""Compile Triton kernels of kernels.py for a GPU without one: Triton's front end, its NVIDIA back end and the
ptxas it ships, down to a cubin for sm_90 (Hopper). A kernel that only a GPU would refuse (a type mismatch
between branches, a bad layout, a constexpr the interpreter lets through) fails here, on the CPU.

    python scripts/compile_kernels.py            # every kernel set below; exit 1 if any fails

The interpreter (TRITON_INTERPRET=1, the CPU tests) checks what the kernels compute; this checks that they build,
and shows what decides their speed before a GPU runs them: shared memory (software-pipelined loads take a buffer
per stage), registers a thread and bytes spilled (ptxas -v).
Kernel sets: the batch-invariant matmul in each fused form, qkv_rope, path_attention with and without the merge
in the kernel, and its combine, and the draft top-k's merge writing into the tree."""
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_kernels: unset TRITON_INTERPRET (the interpreter does not compile)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels as K  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


SHARED_MAX = 232448  # bytes of shared memory a block may take on sm_90 (227 KiB): more fails only at launch


# Integer arguments as SmolLM2's calls pass them, where a launch specializes on them: Triton compiles a 1 in as a
# constant and marks a multiple of 16 as such, and what it then knows (unit strides, aligned rows) decides which
# loads are vectorized and software-pipelined, and so the shared memory. Pointers are marked 16-byte aligned.
RUNTIME_INTS = {
    "_matmul_kernel": dict(K=576, sxm=576, sxk=1, swn=576, swk=1, srm=576),
    "_qkv_rope_kernel": dict(K=576, sxm=576, sxk=1, swn=576, swk=1),
    "_path_attn_kernel": dict(D=64, sqb=36864, sqt=576, sqh=64, sqd=1, skb=786432, skh=64, skd=1, svb=786432, svh=64, svd=1,
                              sks=192, svs=192, spj=1),
}


def build(kernel, types, constexprs, num_warps=4):
    """Compile `kernel` with arguments typed by `types` (default i32) and the constexprs given, specialized as a
    launch specializes it (RUNTIME_INTS), the matmuls and path_attention at the pipeline stages kernels.py
    launches them with; returns (cubin bytes, shared memory bytes)."""
    ints = RUNTIME_INTS.get(kernel.fn.__name__, {})
    constexprs = constexprs | {k: 1 for k, v in ints.items() if v == 1}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    aligned = [name for name in kernel.arg_names if name not in constexprs and (signature[name].startswith("*")
                                                                                or ints.get(name, 1) % 16 == 0)]
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs={(kernel.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    stages = (K._matmul_stages(constexprs["BLOCK_K"]) if kernel in (K._matmul_kernel, K._qkv_rope_kernel)
              else K.PATH_STAGES if kernel is K._path_attn_kernel else 3)  # (3: Triton's default, the others' launch)
    compiled = triton.compile(src, target=TARGET, options=dict(num_warps=num_warps, num_stages=stages))
    if compiled.metadata.shared > SHARED_MAX:
        raise RuntimeError(f"{compiled.metadata.shared} bytes of shared memory (at most {SHARED_MAX})")
    return len(compiled.asm["cubin"]), compiled.metadata.shared, registers(compiled.asm["ptx"])


def registers(ptx):
    """(registers a thread, bytes spilled to local memory) of a kernel's PTX, from ptxas -v (None: not reported).
    Registers bound how many programs an SM holds at once; a spill is a slow load or store in the loop."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")  # (the one it ships)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    except OSError:
        log = ""
    finally:
        os.unlink(f.name)
    regs, spill = re.search(r"Used (\d+) registers", log), re.search(r"(\d+) bytes spill stores", log)
    return int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None


def kernel_sets():
    """(name, kernel, argument types, constexprs[, num_warps]): SmolLM2's shapes (GQA 9/3 heads, head_dim 64), bf16."""
    bf16 = lambda *names: {n: "*bf16" for n in names}
    matmul = bf16("x_ptr", "w_ptr", "b_ptr", "y_ptr", "r_ptr") | dict(ssi_ptr="*fp32", sso_ptr="*fp32", live_ptr="*i32",
                                                                     eps="fp32")
    for norm, swiglu, residual, ss_in in ((False, False, False, False), (True, False, False, False),
                                          (True, False, False, True), (True, True, False, True), (False, False, True, False)):
        yield (f"matmul norm={norm} swiglu={swiglu} residual={residual} sums of squares in={ss_in} out={residual} "
               f"dependent launch={ss_in}", K._matmul_kernel, matmul,
               dict(HAS_BIAS=False, NORM=norm, SWIGLU=swiglu, SILU_ADD=False, RESIDUAL=residual, SS_IN=ss_in,
                    SS_OUT=residual, UPCAST=False, PREC="tf32", BY_SUM=False, BLOCK_M=64, BLOCK_N=16, BLOCK_K=64,
                    BLOCK_P=64, LIVE=False, PDL=ss_in))
    for N, K_ in ((49152, 576), (11008, 4096)):  # the widest tiles (the LM head; a 7B's gate/up) at their stages
        _, BLOCK_N, BLOCK_K = K._matmul_tiles(N, K_, True)
        yield (f"matmul norm swiglu N={N} K={K_}: {BLOCK_N} x {BLOCK_K} tiles", K._matmul_kernel, matmul,
               dict(HAS_BIAS=False, NORM=True, SWIGLU=True, SILU_ADD=False, RESIDUAL=False, SS_IN=True, SS_OUT=False,
                    UPCAST=False, PREC="tf32", BY_SUM=False, BLOCK_M=64, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_P=64,
                    LIVE=False, PDL=True))
    yield ("matmul silu_add (a draft head's residual block) with bias, dependent launch=True", K._matmul_kernel, matmul,
           dict(HAS_BIAS=True, NORM=False, SWIGLU=False, SILU_ADD=True, RESIDUAL=False, SS_IN=False, SS_OUT=False,
                UPCAST=False, PREC="tf32", BY_SUM=False, BLOCK_M=64, BLOCK_N=16, BLOCK_K=64, BLOCK_P=64, LIVE=False, PDL=True))
    yield ("matmul norm swiglu, a prefill skipping its padding (live)", K._matmul_kernel, matmul,
           dict(HAS_BIAS=False, NORM=True, SWIGLU=True, SILU_ADD=False, RESIDUAL=False, SS_IN=True, SS_OUT=False,
                UPCAST=False, PREC="tf32", BY_SUM=False, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, BLOCK_P=64, LIVE=True,
                PDL=False))
    for live in (False, True):
        yield (f"qkv_rope dependent launch={not live}, skipping a prefill's padding={live}", K._qkv_rope_kernel,
               bf16("x_ptr", "w_ptr", "q_ptr", "kc_ptr", "vc_ptr") | dict(
                   ss_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", pos_ptr="*i64", lens_ptr="*i32", live_ptr="*i32",
                   eps="fp32"),
               dict(SS_IN=True, UPCAST=False, PREC="tf32", BY_SUM=False, BLOCK_M=64, BLOCK_N=16, BLOCK_K=64, BLOCK_P=64,
                    LIVE=live, PDL=not live))
    yield ("attention, a causal prefill skipping its padding (live)", K._attn_kernel,
           bf16("q_ptr", "k_ptr", "v_ptr", "o_ptr") | dict(lens_ptr="*i32", mask_ptr="*bf16", po_ptr="*fp32",
                                                           plse_ptr="*fp32", live_ptr="*i32", scale="fp32"),
           dict(REP=3, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, HAS_MASK=False, SPLIT=False, UPCAST=False, PREC="tf32",
                LIVE=True))
    path = bf16("q_ptr", "k_ptr", "v_ptr", "o_ptr") | dict(
        lens_ptr="*i32", path_ptr="*i64", depth_ptr="*i64", po_ptr="*fp32", plse_ptr="*fp32", cnt_ptr="*i32", scale="fp32")
    for merge in (False, True):
        yield (f"path_attention merge={merge} dependent launch={merge}", K._path_attn_kernel, path,
               dict(REP=3, BLOCK_M=K.PATH_TILE_ROWS, BLOCK_N=64, BLOCK_D=64, SPLIT_LEN=K.PATH_SPLIT_LEN, UPCAST=False,
                    PREC="tf32", BY_SUM=False, MERGE=merge, PDL=merge))
    for warps in (1, 2):  # (PATH_WARPS, to time), with the shortest split steps --path-tiles offers
        yield (f"path_attention {warps} warps, splits of 64", K._path_attn_kernel, path,
               dict(REP=3, BLOCK_M=K.PATH_TILE_ROWS, BLOCK_N=64, BLOCK_D=64, SPLIT_LEN=64, UPCAST=False, PREC="tf32",
                    BY_SUM=False, MERGE=False, PDL=True), warps)
    yield ("path_attention combine dependent launch=True", K._path_combine_kernel,
           {"po_ptr": "*fp32", "plse_ptr": "*fp32", "lens_ptr": "*i32", "depth_ptr": "*i64", "o_ptr": "*bf16"},
           dict(SPLIT_LEN=K.PATH_SPLIT_LEN, BLOCK_H=16, BLOCK_D=64, BLOCK_S=16, PDL=True))
    yield ("lm_topk merge into the tree, draft vocabulary, dependent launch=True", K._lm_topk_merge_kernel,
           {"cv_ptr": "*fp32", "ci_ptr": "*i32", "vocab_ptr": "*i64", "v_ptr": "*fp32", "i_ptr": "*i64", "cl_ptr": "*fp32",
            "lse_ptr": "*fp32", "tok_ptr": "*i64", "node_ptr": "*i64"},
           dict(K=10, BLOCK_C=4096, BLOCK_K=16, HAS_VOCAB=True, HAS_LSE=False, INTO=True, BLOCK_CH=256, PDL=True))
    yield ("context_match (prompt lookup) reaching 8 tokens back, 10 tokens", K._context_match_kernel,
           {"hist_ptr": "*i64", "lens_ptr": "*i32", "out_ptr": "*i64", "found_ptr": "*i64"},
           dict(NGRAM=8, BLOCK=1024, BLOCK_K=16))
    import launch_floor  # (scripts/: the floor under a step of dependent kernels, issue 14)

    yield ("launch_floor link, weights read before the dependent launch's wait", launch_floor._link_kernel,
           {"x_ptr": "*fp32", "y_ptr": "*fp32", "w_ptr": "*bf16"}, dict(BLOCK=128, W_BLOCK=1024, PDL=True, EARLY=True))


def main():
    failed = 0
    for name, kernel, types, constexprs, *warps in kernel_sets():  # (warps: 4 unless given)
        try:
            cubin, shared, (regs, spill) = build(kernel, types, constexprs, *warps)
            print(f"OK    {name}: {cubin} bytes of sm_90 cubin, {shared} of shared memory, {regs} registers a thread, "
                  f"{spill} bytes spilled")
        except Exception as e:  # (any compiler error is the finding)
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
    print(f"{failed} failed" if failed else "all compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
