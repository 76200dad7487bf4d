"""The floor under a step of many small kernels (issue 14): a chain of LAUNCHES kernels, each reading what the
one before wrote (as a decoder layer's kernels do), replayed as one CUDA graph, with and without programmatic
dependent launch, at several grid sizes, and with each kernel also reading its own slice of "weights" from HBM
(WEIGHT_MB a launch: SmolLM2's 269 MB of bf16 over ~150 kernels is ~1.8 MB each). Prints microseconds a link.

    python scripts/launch_floor.py                  # on a GPU (a few seconds)
    TRITON_INTERPRET=1 python scripts/launch_floor.py --check   # on the CPU: the chain's values only

Why: SmolLM2's AR step is ~150 dependent kernels in ~0.79 ms (~5 us each, run 23). Run 23 found that putting two
of them in one launch, ordered by a count, was slower than two launches; run 18 that merging attention splits in
the kernel instead of a combine launch changed nothing. If an empty dependent link costs about what a real one
does, the step's time is set by how many dependent levels it has, not by what each does, and a 0.40 ms AR step
(issue 14's target) needs fewer than ~0.40 ms / (a link's cost) levels."""
import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels as K  # noqa: E402


@triton.jit
def _link_kernel(x_ptr, y_ptr, w_ptr, n, w_per_prog, BLOCK: tl.constexpr, W_BLOCK: tl.constexpr, PDL: tl.constexpr,
                 EARLY: tl.constexpr):
    """y = x + 1 + the sum of this program's w slice: the x it reads is what the link before wrote. EARLY: the
    weights (which do not depend on the link before) are read before the dependent launch's wait."""
    if not EARLY:
        K._pdl_start(PDL)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([W_BLOCK], dtype=tl.float32)
    base = w_ptr + pid.to(tl.int64) * w_per_prog
    for start in range(0, w_per_prog, W_BLOCK):
        w_offs = start + tl.arange(0, W_BLOCK)
        acc += tl.load(base + w_offs, mask=w_offs < w_per_prog, other=0.0).to(tl.float32)
    if EARLY:
        K._pdl_start(PDL)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(y_ptr + offs, x + 1.0 + tl.sum(acc, axis=0), mask=offs < n)


def chain(bufs, weights, launches, grid, pdl, early=False):
    """launches links, ping-ponging between the two buffers; launch i reads weights[i]."""
    x, y = bufs
    n = x.numel()
    w_per_prog = weights.shape[1] // grid
    launch = dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)
    for i in range(launches):
        _link_kernel[(grid,)](x, y, weights[i], n, w_per_prog, BLOCK=triton.next_power_of_2(triton.cdiv(n, grid)),
                              W_BLOCK=1024, EARLY=early, **launch)
        x, y = y, x
    return x


def time_chain(launches, grid, pdl, weight_mb, early=False, reps=30):
    """Median microseconds a link of the chain (weights of zeros), replayed as one CUDA graph."""
    bufs = [torch.zeros(4096, device="cuda") for _ in range(2)]
    per_launch = triton.cdiv(max(int(weight_mb * 2**20 / 2), grid), 64 * grid) * 64 * grid  # (aligned slices)
    weights = torch.zeros(launches, per_launch, dtype=torch.bfloat16, device="cuda")
    chain(bufs, weights, launches, grid, pdl, early)  # (compile, warm)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = chain(bufs, weights, launches, grid, pdl, early)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    assert out.eq(out[0]).all()  # (every element went up by one a link)
    return statistics.median(times) * 1e3 / launches


def check(launches=6, grid=3):
    """The chain computes what it says (interpreter or GPU): each element goes up by one a link."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bufs = [torch.zeros(50, device=device) for _ in range(2)]
    weights = torch.zeros(launches, 3 * 40, dtype=torch.bfloat16, device=device)
    out = chain(bufs, weights, launches, grid, False)
    assert torch.equal(out, torch.full_like(out, float(launches))), out
    print(f"chain of {launches} links: every element {launches}: OK")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--launches", type=int, default=150)
    p.add_argument("--grids", type=int, nargs="+", default=[36, 132, 528])
    p.add_argument("--weight-mb", type=float, nargs="+", default=[0, 1.8])
    p.add_argument("--check", action="store_true", help="only check the chain's values (runs on the CPU interpreter)")
    args = p.parse_args(argv)
    if args.check or not torch.cuda.is_available():
        return check()
    print(f"{torch.cuda.get_device_name()}, {args.launches} dependent links in one CUDA graph, us a link")
    print("| weights a link | grid | plain launch | dependent launch (PDL) | PDL, weights read before the wait |")
    print("| --- | --- | --- | --- | --- |")
    pdl_ok = K.gdc_wait is not None and torch.cuda.get_device_capability()[0] >= 9
    for mb in args.weight_mb:
        for grid in args.grids:
            plain = time_chain(args.launches, grid, False, mb)
            dep = [f"{time_chain(args.launches, grid, True, mb, early):.2f}" if pdl_ok else "n/a" for early in (False, True)]
            print(f"| {mb} MB | {grid} | {plain:.2f} | {dep[0]} | {dep[1]} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
