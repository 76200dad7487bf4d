"""kernels.py against the reference ops of hydra_lite.py, on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before triton is first imported in the process (kernels.py and hydra_lite.py import
it; the interpreter needs triton's own library functions interpreted too), so it is the very first thing this
module does. When another test module got there first (a whole-suite run: they import hydra_lite, which imports
triton compiled), this file reruns itself in a fresh interpreter process instead (test_in_fresh_process).
The interpreter runs every kernel in Python/numpy on CPU tensors: shapes here are small to keep the file fast.
It rounds fp32 -> bf16 by truncation (the GPU rounds to nearest), so bf16 tolerances allow a few ulps.
"""
import os
import sys

# Before any import of triton. If triton is already loaded in compiled mode, leave the setting alone (so other
# modules' GPU tests keep compiled kernels) and run this file in a subprocess.
IN_PROCESS = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"
if IN_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hydra_lite as hl  # noqa: E402
import kernels  # noqa: E402

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# The interpreter itself trips a numpy deprecation for every loop bound it reads; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.fixture(autouse=True)
def _seed(request):  # fresh inputs per test, reproducible (KERNEL_TEST_SEED picks another draw)
    if not IN_PROCESS and request.node.name != "test_in_fresh_process":
        pytest.skip("triton was imported compiled before this module; run by test_in_fresh_process")
    torch.manual_seed(zlib.crc32(request.node.name.encode()) + int(os.environ.get("KERNEL_TEST_SEED", "0")))


def test_in_fresh_process():
    """This whole file under the interpreter in its own process, when this process cannot interpret."""
    if IN_PROCESS:
        pytest.skip("running in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(__file__)],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def close(out, ref, dtype):
    """fp32 ~1e-5 relative; bf16 ~1e-2 relative. One bf16 ulp is 2^-8..2^-7 relative, and the interpreter
    truncates where the GPU rounds, so a chain of roundings (rms_norm: sum, normalize, times w) can end up to 3
    ulps away from torch here (on the GPU, benchmark.py check finds rms_norm/swiglu/rope bit-exact)."""
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2.5e-2, atol=1e-2)


def random_tree(T):
    """A random tree of T nodes in hydra_lite's order (parents before children). Returns the mask [T, T] (a node
    sees itself and its ancestors), the retrieve table [leaves, depth+1] (-1 padded) and the parent list."""
    parent = [0] + [int(torch.randint(0, i, ())) for i in range(1, T)]
    mask = torch.zeros(T, T, dtype=torch.bool)
    chains = []
    for i in range(T):
        chain, j = [], i
        while True:
            chain.append(j)
            mask[i, j] = True
            if j == 0:
                break
            j = parent[j]
        chains.append(chain[::-1])
    leaves = [c for i, c in enumerate(chains) if i not in parent[1:]] or [[0]]
    depth = max(len(c) for c in chains)
    retrieve = torch.full((len(leaves), depth), -1, dtype=torch.long)
    for p, c in enumerate(leaves):
        retrieve[p, :len(c)] = torch.tensor(c)
    return mask, retrieve, parent


def random_trees(B, T):
    """A random tree of T nodes per row (dynamic trees): masks [B, T, T] and retrieve tables [B, P, depth+1], each
    row's table padded with -1 to the largest (rows of -1 are paths that never win)."""
    trees = [random_tree(T)[:2] for _ in range(B)]
    retrieve = torch.full((B, max(r.shape[0] for _, r in trees), max(r.shape[1] for _, r in trees)), -1)
    for b, (_, r) in enumerate(trees):
        retrieve[b, :r.shape[0], :r.shape[1]] = r
    return torch.stack([m for m, _ in trees]), retrieve


# ----------------------------------------------------------------------------------------------------------
# rms_norm, swiglu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [64, 80])
def test_rms_norm(dtype, dim):
    x = torch.randn(2, 3, dim, dtype=dtype) * 3
    w = torch.randn(dim, dtype=dtype)
    close(kernels.rms_norm(x, w, 1e-5), hl.rms_norm_ref(x, w, 1e-5), dtype)
    r = torch.randn(2, 3, dim, dtype=dtype)
    y, s = kernels.rms_norm(x, w, 1e-5, r)
    y_ref, s_ref = hl.rms_norm_ref(x, w, 1e-5, r)
    assert y.dtype == y_ref.dtype and s.dtype == s_ref.dtype and y.shape == y_ref.shape
    close(y, y_ref, dtype)
    close(s, s_ref, dtype)
    # a strided input (every other row of a bigger tensor)
    xs = torch.randn(6, dim, dtype=dtype)[::2]
    close(kernels.rms_norm(xs, w, 1e-6), hl.rms_norm_ref(xs, w, 1e-6), dtype)


def test_rms_norm_mixed_dtype_weight():
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    w = torch.randn(32, dtype=torch.float32)
    y, y_ref = kernels.rms_norm(x, w, 1e-5), hl.rms_norm_ref(x, w, 1e-5)
    assert y.dtype == y_ref.dtype == torch.float32
    close(y, y_ref, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [64, 100])
def test_swiglu(dtype, H):
    g = torch.randn(2, 3, 2 * H, dtype=dtype) * 2
    out, ref = kernels.swiglu(g), hl.swiglu_ref(g)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    close(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [7, 3000])
def test_silu_add(dtype, n):
    res, z = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype) * 4
    out, ref = kernels.silu_add(res, z), hl.silu_add_ref(res, z)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if dtype == torch.float32:
        close(out, ref, dtype)
    else:  # two roundings (silu, then the sum), so a sum near zero may be a few of its terms' ulps away
        scale = res.float().abs() + torch.nn.functional.silu(z.float()).abs()
        assert ((out.float() - ref.float()).abs() <= 2 ** -6 * scale + 1e-6).all()
    a = torch.randn(2, 5, 8)[:, ::2]  # non-contiguous inputs
    close(kernels.silu_add(a, a * 2), hl.silu_add_ref(a, a * 2), torch.float32)


def test_silu_add_strided_halves():
    """The heads' fused projection: res and z are the two halves of one [rows, 2*dim] output."""
    y = torch.randn(3, 4, 2 * 40) * 3
    res, z = y[..., :40], y[..., 40:]
    out = kernels.silu_add(res, z)
    close(out, hl.silu_add_ref(res, z), torch.float32)
    assert out.is_contiguous() and out.shape == (3, 4, 40)


def test_context_match():
    """Prompt lookup in one kernel == the reference (whose own oracle is in test_runtime): random rows over a
    small vocabulary (matches of every length), a root at slot 0 (nothing before it), texts longer than a block
    of candidates, chains longer than what follows the match (they wrap), a history with a row stride."""
    for B, S, k, ngram, V in ((3, 40, 5, 4, 4), (4, 200, 10, 4, 3), (2, 130, 1, 1, 5), (5, 70, 16, 3, 2), (1, 9, 3, 4, 9),
                               (3, 300, 10, 8, 3)):
        history = torch.randint(0, V, (B, S))
        lens = torch.randint(0, S, (B,), dtype=torch.int32)
        lens[0] = 0
        if B > 1:
            lens[1] = S - 1
        tokens, found = kernels.context_match(history, lens, k, ngram)
        ref_tokens, ref_found = hl.context_match_ref(history, lens, k, ngram)
        assert torch.equal(tokens, ref_tokens) and torch.equal(found, ref_found), (B, S, k, ngram, lens)
        assert found[0] == 0 and (tokens[0] == history[0, 0]).all()  # nothing before the root: the root repeated
    wide = torch.randint(0, 3, (3, 2, 50))[:, 1]  # rows 100 apart
    lens = torch.tensor([49, 20, 3], dtype=torch.int32)
    assert all(map(torch.equal, kernels.context_match(wide, lens, 6, 8), hl.context_match_ref(wide, lens, 6, 8)))
    h = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 0, 0], [1, 2, 3, 1, 2, 3, 1, 0, 0, 0]])  # by hand
    tokens, found = kernels.context_match(h, torch.tensor([7, 6], dtype=torch.int32), 5, 4)
    assert tokens.tolist() == [[8, 9, 5, 6, 7], [2, 3, 1, 2, 3]] and found.tolist() == [3, 4]


def test_context_drafts_run_the_kernel(monkeypatch):
    """Where the kernels run, the context drafts' chain comes from the kernel: the tree's context nodes get it."""
    monkeypatch.setattr(hl, "_kernels_for", lambda x: True)
    calls = []
    monkeypatch.setattr(kernels, "context_match", lambda *a: calls.append(1) or hl.context_match_ref(*a))
    tree = hl.Tree([[0], [1], [0, 0]], context=3)
    history = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 0, 0]])
    inp = hl.DraftInput(torch.tensor([7]), None, history, torch.tensor([7], dtype=torch.int32))
    with torch.no_grad():
        tokens, _ = hl.draft([hl.ContextDrafts()], tree, inp)
    assert calls and tokens[0, tree.context_nodes].tolist() == [8, 9, 5]


@pytest.mark.parametrize("dtype", DTYPES)
def test_head_input(dtype):
    B, n_nodes, dim, V = 3, 9, 40, 50
    h = torch.randn(B, dim, dtype=dtype)
    tokens = torch.randint(0, V, (B, n_nodes))
    embed_w = torch.randn(V, dim, dtype=dtype)
    for L in (1, 2, 4):
        path = torch.randint(0, n_nodes, (5, L))
        out, ref = kernels.head_input(h, tokens, path, embed_w), hl.head_input_ref(h, tokens, path, embed_w)
        assert out.shape == ref.shape == (B, 5, (L + 1) * dim) and torch.equal(out, ref)  # a copy: exact
    # a path table per row (dynamic trees): row b is row b alone with its own [P, L] table; a column-major copy
    paths = torch.randint(0, n_nodes, (B, 5, 2)).mT.contiguous().mT
    out, ref = kernels.head_input(h, tokens, paths, embed_w), hl.head_input_ref(h, tokens, paths, embed_w)
    assert out.shape == (B, 5, 3 * dim) and torch.equal(out, ref)
    for b in range(B):
        assert torch.equal(ref[b:b + 1], hl.head_input_ref(h[b:b + 1], tokens[b:b + 1], paths[b], embed_w))
    # a shared table as an expanded [B, P, L] view (batch stride 0) gives the shared table's result
    wide = paths[0].expand(B, -1, -1)
    shared = hl.head_input_ref(h, tokens, paths[0], embed_w)
    assert torch.equal(kernels.head_input(h, tokens, wide, embed_w), shared)
    assert torch.equal(hl.head_input_ref(h, tokens, wide, embed_w), shared)
    rows = torch.randn(B, 2, dim, dtype=dtype)[:, 1]  # a strided h (a row of the verification's hidden states)
    out = kernels.head_input(rows, tokens, path, embed_w)
    assert torch.equal(out, hl.head_input_ref(rows, tokens, path, embed_w))
    assert torch.equal(out[1, 2, :dim], rows[1]) and torch.equal(out[1, 2, dim:2 * dim], embed_w[tokens[1, path[2, 0]]])


def test_silu_add_dispatch_keeps_autograd_on_the_reference(monkeypatch):
    """Training differentiates through the heads' blocks: with grad enabled the reference (autograd) runs."""
    calls = []
    monkeypatch.setattr(hl, "_kernels_for", lambda x: True)
    monkeypatch.setattr(hl._kernels, "silu_add", lambda r, z: calls.append(1) or hl.silu_add_ref(r, z))
    z = torch.randn(4, requires_grad=True)
    hl.silu_add(torch.zeros(4), z).sum().backward()
    assert not calls and z.grad is not None
    with torch.no_grad():
        hl.silu_add(torch.zeros(4), z)
    assert calls


# ----------------------------------------------------------------------------------------------------------
# rope_cache_write


def fused_qkv(B, T, Hq, Hkv, D, dtype):
    """q, k, v as the model makes them: non-contiguous views of one fused projection output."""
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, dtype=dtype)
    q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], -1)
    return q.view(B, T, Hq, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,Hq,Hkv,D", [(2, 5, 4, 2, 16), (3, 1, 3, 3, 80), (1, 4, 6, 2, 32)])
def test_rope_cache_write(dtype, B, T, Hq, Hkv, D):
    L, S = 3, 24
    q, k, v = fused_qkv(B, T, Hq, Hkv, D, dtype)
    assert not q.is_contiguous() and not k.is_contiguous()
    cos, sin = hl.rope_tables(hl.Config(dim=Hq * D, n_layers=1, n_heads=Hq, n_kv_heads=Hkv, hidden_dim=8,
                                        vocab_size=8, head_dim=D), 64, "cpu")
    lens = torch.randint(0, S - T + 1, (B,), dtype=torch.int32)
    lens[0] = 0
    lens[-1] = S - T  # the last slots of the cache
    pos = lens[:, None].long() + torch.randint(0, 3, (B, T))  # tree-like positions (not just lens + t)
    k_all = torch.randn(L, B, S, Hkv, D, dtype=dtype)
    v_all = torch.randn(L, B, S, Hkv, D, dtype=dtype)
    written = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        written[b, lens[b]:lens[b] + T] = True
    k_all[1][written] = float("nan")  # poison: every slot that must be written
    v_all[1][written] = float("nan")
    k_ref, v_ref = k_all.clone(), v_all.clone()
    q_out = kernels.rope_cache_write(q, k, v, cos, sin, pos, k_all[1], v_all[1], lens)
    q_ref = hl.rope_cache_write_ref(q, k, v, cos, sin, pos, k_ref[1], v_ref[1], lens)
    assert q_out.is_contiguous() and q_out.dtype == q.dtype
    close(q_out, q_ref, dtype)
    for got, ref in ((k_all, k_ref), (v_all, v_ref)):
        assert not got[1][written].isnan().any()
        close(got[1][written], ref[1][written], dtype)
        assert torch.equal(got[1][~written], ref[1][~written])  # nothing else touched, bit for bit
        assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])  # other layers untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,given_sumsq", [(3, 5, 4, 2, 16, False), (2, 1, 6, 2, 32, False), (2, 3, 4, 2, 16, True)])
def test_qkv_rope(dtype, B, T, Hq, Hkv, D, given_sumsq):
    """The layer's first matmul with RMSNorm before and RoPE + the cache write after, in one kernel: q and the
    written keys/values against the PyTorch ops one by one, nothing else in the cache touched, and a token's
    bits the same alone as in the batch."""
    K, L, S = 48, 2, 20
    x = torch.randn(B, T, K, dtype=dtype) * 2
    w = (torch.randn((Hq + 2 * Hkv) * D, K) / K ** 0.5).to(dtype)
    w = hl.fold_norm(w, (torch.rand(K) + 0.5).to(dtype))  # (RMSNorm's weight: the matmul test checks the folding)
    norm = 1e-5
    cos, sin = hl.rope_tables(hl.Config(dim=Hq * D, n_layers=1, n_heads=Hq, n_kv_heads=Hkv, hidden_dim=8,
                                        vocab_size=8, head_dim=D), 64, "cpu")
    lens = torch.randint(0, S - T + 1, (B,), dtype=torch.int32)
    lens[-1] = S - T
    pos = lens[:, None].long() + torch.randint(0, 3, (B, T))
    k_all, v_all = torch.randn(L, B, S, Hkv, D, dtype=dtype), torch.randn(L, B, S, Hkv, D, dtype=dtype)
    k_ref, v_ref = k_all.clone(), v_all.clone()
    sumsq = torch.rand(B, T, 3) * K if given_sumsq else None  # (parts that do not fit x: the rule is used)
    q = kernels.qkv_rope(x, w, norm, cos, sin, pos, k_all[1], v_all[1], lens, Hq, sumsq)
    q_ref = hl.qkv_rope_ref(x, w, norm, cos, sin, pos, k_ref[1], v_ref[1], lens, Hq, sumsq)
    assert q.shape == (B, T, Hq, D) and q.dtype == dtype
    tol = {} if dtype == torch.float32 else dict(rtol=0.05, atol=0.05 * q_ref.float().abs().max().item())
    torch.testing.assert_close(q.float(), q_ref.float(), **(tol or dict(rtol=1e-5, atol=1e-5)))
    written = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        written[b, lens[b]:lens[b] + T] = True
    for got, ref in ((k_all, k_ref), (v_all, v_ref)):
        torch.testing.assert_close(got[1][written].float(), ref[1][written].float(), **(tol or dict(rtol=1e-5, atol=1e-5)))
        assert torch.equal(got[1][~written], ref[1][~written]) and torch.equal(got[0], ref[0])
    b, t = B - 1, T - 1  # one token alone: the same bits for q and for what it writes
    k1, v1 = torch.zeros(1, S, Hkv, D, dtype=dtype), torch.zeros(1, S, Hkv, D, dtype=dtype)
    slot = int(lens[b]) + t
    q1 = kernels.qkv_rope(x[b:b + 1, t:t + 1], w, norm, cos, sin, pos[b:b + 1, t:t + 1], k1, v1,
                          torch.tensor([slot], dtype=torch.int32), Hq, None if sumsq is None else sumsq[b:b + 1, t:t + 1])
    assert torch.equal(q1[0, 0], q[b, t]) and torch.equal(k1[0, slot], k_all[1, b, slot])
    assert torch.equal(v1[0, slot], v_all[1, b, slot])


def test_rope_cache_write_row_view():
    """A view on one row of the batch (strided) and a bf16 cache for fp32 activations."""
    B, T, Hq, Hkv, D, S = 3, 3, 2, 1, 16, 10
    q, k, v = fused_qkv(1, T, Hq, Hkv, D, torch.float32)
    cos, sin = torch.randn(32, D // 2), torch.randn(32, D // 2)
    k_all = torch.zeros(2, B, S, Hkv, D, dtype=torch.bfloat16)
    v_all = torch.zeros(2, B, S, Hkv, D, dtype=torch.bfloat16)
    k_ref, v_ref = k_all.clone(), v_all.clone()
    lens = torch.tensor([4], dtype=torch.int32)
    pos = torch.arange(T)[None] + 4
    kernels.rope_cache_write(q, k, v, cos, sin, pos, k_all[1, 1:2], v_all[1, 1:2], lens)
    hl.rope_cache_write_ref(q, k, v, cos, sin, pos, k_ref[1, 1:2], v_ref[1, 1:2], lens)
    close(k_all, k_ref, torch.bfloat16)
    close(v_all, v_ref, torch.bfloat16)
    assert torch.equal(k_all[:, 0], k_ref[:, 0]) and torch.equal(k_all[:, 2], k_ref[:, 2])


# ----------------------------------------------------------------------------------------------------------
# attention


def attn_inputs(B, T, Hq, Hkv, D, S, dtype):
    q = torch.randn(B, T, Hq, D, dtype=dtype)
    k_all = torch.randn(2, B, S, Hkv, D, dtype=dtype)  # a layer of a [L, B, S, Hkv, D] cache, as the model has
    v_all = torch.randn(2, B, S, Hkv, D, dtype=dtype)
    lens = torch.randint(0, S - T + 1, (B,), dtype=torch.int32)
    lens[0] = 0
    if B > 2:
        lens[1] = S - T  # full cache
    return q, k_all[1], v_all[1], lens


@pytest.mark.parametrize("dtype,mask_kind", [  # (a mask per row is read the same way in any dtype: fp32 only)
    pytest.param(torch.float32, "tree", id="fp32-tree"), pytest.param(torch.bfloat16, "tree", id="bf16-tree"),
    pytest.param(torch.float32, "per-row", id="fp32-per-row"),
    pytest.param(torch.float32, "causal", id="fp32-causal"), pytest.param(torch.bfloat16, "causal", id="bf16-causal"),
])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,S", [
    (3, 6, 6, 2, 32, 80),  # GQA, a random tree
    (2, 5, 3, 3, 16, 40),  # Hq == Hkv
    (1, 9, 4, 1, 80, 50),  # MQA, non-power-of-2 head_dim
    (2, 2, 9, 3, 64, 20),  # SmolLM2's heads, the smallest tree
])
def test_tree_attention(dtype, B, T, Hq, Hkv, D, S, mask_kind):
    q, k_cache, v_cache, lens = attn_inputs(B, T, Hq, Hkv, D, S, dtype)
    if mask_kind == "tree":
        mask = random_tree(T)[0]  # [T, T]: one tree for all rows
    else:
        mask = random_trees(B, T)[0] if mask_kind == "per-row" else None  # [B, T, T]: a tree per row
    ref = hl.attention_ref(q, k_cache, v_cache, lens, mask)
    out = kernels.tree_attention(q, k_cache, v_cache, lens, mask)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    close(out, ref, dtype)
    if mask_kind == "per-row":  # row b is row b alone with its own [T, T] mask
        for b in range(B):
            one = slice(b, b + 1)
            assert torch.equal(ref[one], hl.attention_ref(q[one], k_cache[one], v_cache[one], lens[one], mask[b]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_tree_attention_split_k(dtype):
    """The split-K path (partials + combine), with chunks that hold no key of some rows; a shared and a per-row mask."""
    B, T, Hq, Hkv, D, S = 3, 5, 4, 2, 32, 160
    q, k_cache, v_cache, lens = attn_inputs(B, T, Hq, Hkv, D, S, dtype)
    lens[2] = 62  # the new tokens straddle a chunk boundary
    for splits, mask in ((2, random_tree(T)[0]), (5, random_trees(B, T)[0])):
        ref = hl.attention_ref(q, k_cache, v_cache, lens, mask)
        close(kernels.tree_attention(q, k_cache, v_cache, lens, mask, num_splits=splits), ref, dtype)
    close(kernels.tree_attention(q, k_cache, v_cache, lens, None, num_splits=3),
          hl.attention_ref(q, k_cache, v_cache, lens, None), dtype)


def test_prefill_attention():
    """A longer causal block over an empty cache (several query tiles, the causal cut-off per tile)."""
    B, T, Hq, Hkv, D, S = 1, 70, 2, 1, 16, 80
    q, k_cache, v_cache, _ = attn_inputs(B, T, Hq, Hkv, D, S, torch.float32)
    lens = torch.zeros(1, dtype=torch.int32)
    close(kernels.tree_attention(q, k_cache, v_cache, lens, None), hl.attention_ref(q, k_cache, v_cache, lens), torch.float32)


def test_tree_attention_strided_q_and_mask():
    B, T, Hq, Hkv, D, S = 2, 4, 4, 2, 16, 30
    _, k_cache, v_cache, lens = attn_inputs(B, T, Hq, Hkv, D, S, torch.float32)
    q = torch.randn(B, Hq, T, D).transpose(1, 2)  # non-contiguous
    mask = random_tree(T)[0].t().contiguous().t()  # column-major mask
    out = kernels.tree_attention(q, k_cache, v_cache, lens, mask)
    close(out, hl.attention_ref(q, k_cache, v_cache, lens, mask), torch.float32)
    # the shared mask as an expanded [B, T, T] view (batch stride 0): the same as the [T, T] mask, bit for bit
    wide = mask.expand(B, T, T)
    assert torch.equal(kernels.tree_attention(q, k_cache, v_cache, lens, wide), out)
    assert torch.equal(hl.attention_ref(q, k_cache, v_cache, lens, wide), hl.attention_ref(q, k_cache, v_cache, lens, mask))
    masks = random_trees(B, T)[0].permute(2, 0, 1).contiguous().permute(1, 2, 0)  # per row, no unit stride
    close(kernels.tree_attention(q, k_cache, v_cache, lens, masks), hl.attention_ref(q, k_cache, v_cache, lens, masks),
          torch.float32)
    with pytest.raises(kernels.KernelInputError, match="mask"):
        kernels.tree_attention(q, k_cache, v_cache, lens, masks[:1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Hq,Hkv,D,S", [(3, 9, 3, 64, 40), (2, 4, 4, 32, 70), (1, 8, 1, 80, 20)])
@pytest.mark.parametrize("splits", [None, 3])
def test_decode_attention(dtype, B, Hq, Hkv, D, S, splits):
    q, k_cache, v_cache, lens = attn_inputs(B, 1, Hq, Hkv, D, S, dtype)
    ref = hl.attention_ref(q, k_cache, v_cache, lens)
    out = kernels.decode_attention(q, k_cache, v_cache, lens, num_splits=splits)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    close(out, ref, dtype)


def test_attention_ignores_slots_past_the_row():
    """Slots past lens[b] + T hold scratch (NaN here): they must not leak into the result."""
    B, T, Hq, Hkv, D, S = 2, 3, 2, 1, 16, 40
    q, k_cache, v_cache, lens = attn_inputs(B, T, Hq, Hkv, D, S, torch.float32)
    lens = torch.tensor([5, 20], dtype=torch.int32)
    for b in range(B):
        k_cache[b, lens[b] + T:] = float("nan")
        v_cache[b, lens[b] + T:] = float("nan")
    mask = random_tree(T)[0]
    ref = hl.attention_ref(q, k_cache, v_cache, lens, mask)
    for splits in (None, 4):
        out = kernels.tree_attention(q, k_cache, v_cache, lens, mask, num_splits=splits)
        assert not out.isnan().any()
        close(out, ref, torch.float32)
    out = kernels.decode_attention(q[:, :1], k_cache, v_cache, lens, num_splits=3)
    close(out, hl.attention_ref(q[:, :1], k_cache, v_cache, lens), torch.float32)


def test_attention_mixed_dtypes():
    """fp32 activations over a bf16 cache: the result is in q's dtype, products in fp32."""
    q, k_cache, v_cache, lens = attn_inputs(2, 3, 4, 2, 16, 20, torch.bfloat16)
    q = q.float()
    mask = random_tree(3)[0]
    out = kernels.tree_attention(q, k_cache, v_cache, lens, mask)
    assert out.dtype == torch.float32
    close(out, hl.attention_ref(q, k_cache, v_cache, lens, mask), torch.float32)


# ----------------------------------------------------------------------------------------------------------
# batch-invariant kernels (path_attention, matmul): a token's bits do not depend on the batch or the tree


def tree_paths(parents):
    """Node paths [B, T, D1] (from the root, 0 padded) and depths [B, T] of parent lists (one per row)."""
    chains = [[hl.ancestry(p, i) for i in range(len(p))] for p in parents]
    D1 = max(len(c) for row in chains for c in row)
    path = torch.zeros(len(parents), len(parents[0]), D1, dtype=torch.long)
    for b, row in enumerate(chains):
        for i, c in enumerate(row):
            path[b, i, :len(c)] = torch.tensor(c)
    return path, torch.tensor([[len(c) - 1 for c in row] for row in chains])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,Hq,Hkv,D,S,split", [(3, 7, 6, 2, 32, 90, 32), (2, 5, 9, 3, 64, 40, 256), (1, 9, 4, 1, 80, 70, 64)])
def test_path_attention(dtype, B, T, Hq, Hkv, D, S, split, monkeypatch):
    """Against the reference, trees per row, one split or several (splits shortened to exercise the combine)."""
    monkeypatch.setattr(kernels, "PATH_SPLIT_LEN", split)
    q, k_cache, v_cache, lens = attn_inputs(B, T, Hq, Hkv, D, S, dtype)
    path, depth = tree_paths([random_tree(T)[2] for _ in range(B)])
    ref = hl.path_attention_ref(q, k_cache, v_cache, lens, path, depth)
    mask = torch.stack([random_tree(1)[0].new_zeros(T, T).scatter_(1, path[b] * (torch.arange(path.shape[2]) <=
                        depth[b][:, None]), True) for b in range(B)])  # the same trees as masks: an independent oracle
    close(ref, hl.attention_ref(q, k_cache, v_cache, lens, mask), dtype)
    close(kernels.path_attention(q, k_cache, v_cache, lens, path, depth), ref, dtype)
    one = q[:, :1]  # decoding: a path of one node
    close(kernels.path_attention(one, k_cache, v_cache, lens), hl.attention_ref(one, k_cache, v_cache, lens), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_path_attention_is_decoding_bit_for_bit(dtype, monkeypatch):
    """A tree node's output equals, bit for bit, one-token decoding over a cache that holds its path in order
    (what the cache holds once the path is accepted), whatever the other nodes, the batch, the cache's size or
    the tokens per program at the splits that reach past the cache."""
    monkeypatch.setattr(kernels, "PATH_SPLIT_LEN", 32)
    B, T, Hq, Hkv, D, S = 2, 8, 6, 2, 32, 200
    q, k_cache, v_cache, lens = attn_inputs(B, T, Hq, Hkv, D, S - T, dtype)
    k_cache, v_cache = (torch.cat([c, torch.randn(B, T, Hkv, D).to(dtype)], 1) for c in (k_cache, v_cache))
    # Paths that straddle a block and a split boundary: 2 splits, and 5-6 (the combine reads 4 at a time).
    lens[0], lens[1] = 29, 160 - 3
    path, depth = tree_paths([random_tree(T)[2] for _ in range(B)])
    out = kernels.path_attention(q, k_cache, v_cache, lens, path, depth)
    for edge in (1, 3, 16):  # tokens per program at the edge splits: how work is shared out, not a row's bits
        monkeypatch.setattr(kernels, "PATH_EDGE_TOKENS", edge)
        assert torch.equal(kernels.path_attention(q, k_cache, v_cache, lens, path, depth), out), edge
    for programs in (1, 20):  # splits below lens looped by fewer programs: all by one per tile, or every 3rd
        monkeypatch.setattr(kernels, "PATH_PROGRAMS", programs)
        assert torch.equal(kernels.path_attention(q, k_cache, v_cache, lens, path, depth), out), programs
        assert torch.equal(kernels.path_attention(q[:, :1], k_cache, v_cache, lens),
                           kernels.path_attention(q[:, :1], k_cache, v_cache, lens, path[:, :1, :1], depth[:, :1]))
    monkeypatch.setattr(kernels, "PATH_PROGRAMS", 0)
    for b in range(B):
        for t in {0, int(depth[b].argmax())}:  # the root, a deepest node
            n = int(lens[b])
            slots = torch.cat([torch.arange(n), n + path[b, t, :depth[b, t] + 1]])
            k1 = torch.randn(1, S + 17, Hkv, D).to(dtype)  # another capacity, scratch past the path
            v1 = torch.randn(1, S + 17, Hkv, D).to(dtype)
            k1[0, :len(slots)], v1[0, :len(slots)] = k_cache[b, slots], v_cache[b, slots]
            ar = kernels.path_attention(q[b:b + 1, t:t + 1], k1, v1, torch.tensor([len(slots) - 1], dtype=torch.int32))
            assert torch.equal(ar[0, 0], out[b, t]), (b, t)


def test_path_attention_sharing_out_changes_no_bits(monkeypatch):
    """Splits of two blocks (the interpreter's blocks are 32 positions) that one program a tile loops over, each
    split from nothing at its first block: the same bits as one program per split (the test above holds splits
    of one block to decoding). (One dtype: the interpreter's bits do not depend on it here.)"""
    B, T, Hq, Hkv, D, S = 2, 8, 6, 2, 32, 200
    q, k_cache, v_cache, lens = attn_inputs(B, T, Hq, Hkv, D, S - T, torch.bfloat16)
    k_cache, v_cache = (torch.cat([c, torch.randn(B, T, Hkv, D).to(torch.bfloat16)], 1) for c in (k_cache, v_cache))
    lens[1] = int(torch.randint(130, S - T, ()))
    tree = tree_paths([random_tree(T)[2] for _ in range(B)])
    monkeypatch.setattr(kernels, "PATH_SPLIT_LEN", 64)
    want = kernels.path_attention(q, k_cache, v_cache, lens, *tree)
    monkeypatch.setattr(kernels, "PATH_PROGRAMS", 1)
    assert torch.equal(kernels.path_attention(q, k_cache, v_cache, lens, *tree), want)


def test_path_attention_refuses_a_grid_too_tall(monkeypatch):
    """Programs go on the grid's second axis (at most 65,535): one per split and tile over a huge cache is refused
    with a one-line KernelInputError naming the knob, not a launch failure."""
    monkeypatch.setattr(kernels, "PATH_SPLIT_LEN", 32)
    monkeypatch.setattr(kernels, "PATH_PROGRAMS", 0)
    T, S = 256, 32 * 4096  # 16 tiles of 16 tokens x 4,096 splits
    q, cache = torch.randn(1, T, 1, 16), torch.zeros(1, S, 1, 16)
    path, depth = torch.zeros(1, T, 1, dtype=torch.long), torch.zeros(1, T, dtype=torch.long)
    with pytest.raises(kernels.KernelInputError, match="HYDRA_LITE_PATH_PROGRAMS"):
        kernels.path_attention(q, cache, cache, torch.tensor([5], dtype=torch.int32), path, depth)


@pytest.mark.parametrize("dtype", DTYPES)
def test_path_attention_merge_in_kernel_equals_combine(dtype, monkeypatch):
    """PATH_MERGE_IN_KERNEL: the last program of a row's splits merges them in place of the combine kernel; the
    same bits (ragged rows, 1 to 6 splits, decoding and a tree), and every count back at 0 afterwards."""
    monkeypatch.setattr(kernels, "PATH_SPLIT_LEN", 32)
    B, T, Hq, Hkv, D, S = 3, 6, 6, 2, 32, 200
    q, k_cache, v_cache, _ = attn_inputs(B, T, Hq, Hkv, D, S, dtype)
    lens = torch.tensor([3, 61, 160], dtype=torch.int32)
    path, depth = tree_paths([random_tree(T)[2] for _ in range(B)])
    for args in ((q, k_cache, v_cache, lens, path, depth), (q[:, :1], k_cache, v_cache, lens)):
        monkeypatch.setattr(kernels, "PATH_MERGE_IN_KERNEL", False)
        want = kernels.path_attention(*args)
        for programs in (0, 1):  # (1: a program merges after its last split)
            monkeypatch.setattr(kernels, "PATH_MERGE_IN_KERNEL", True)
            monkeypatch.setattr(kernels, "PATH_PROGRAMS", programs)
            assert torch.equal(kernels.path_attention(*args), want)
            assert not kernels._MERGE_COUNTS[q.device].any()
        monkeypatch.setattr(kernels, "PATH_MERGE_IN_KERNEL", False)
        monkeypatch.setattr(kernels, "PATH_MERGE_DECODE", True)  # (decode steps merge in the kernel; trees combine)
        assert torch.equal(kernels.path_attention(*args), want)
        assert not kernels._MERGE_COUNTS[q.device].any()
        monkeypatch.setattr(kernels, "PATH_MERGE_DECODE", False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,bias", [(1, 40, 48, False), (37, 96, 80, True), (70, 33, 64, False)])
def test_matmul(dtype, M, N, K, bias):
    """F.linear's values (fp32: ~1e-5), and each row's bits the same alone, in this batch or in another."""
    x = torch.randn(M, K, dtype=dtype)
    w = torch.randn(N, K, dtype=dtype) / K ** 0.5
    b = torch.randn(N, dtype=dtype) if bias else None
    y = kernels.matmul(x, w, b)
    assert y.shape == (M, N) and y.dtype == dtype
    close(y, hl.matmul_ref(x, w, b), dtype)
    i = int(torch.randint(0, M, ()))
    assert torch.equal(kernels.matmul(x[i:i + 1], w, b)[0], y[i])
    other = torch.cat([torch.randn(5, K, dtype=dtype), x[i:i + 1], torch.randn(20, K, dtype=dtype)])
    assert torch.equal(kernels.matmul(other, w, b)[5], y[i])
    x3 = torch.randn(2, 3, K, dtype=dtype).transpose(0, 1)  # [..., K] with any leading strides
    close(kernels.matmul(x3, w, b), hl.matmul_ref(x3, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,swiglu,residual", [(True, False, False), (False, False, True), (True, True, False),
                                                  (True, True, True)])
def test_matmul_fused(dtype, norm, swiglu, residual):
    """The decoder layer's neighbours folded into the matmul: RMSNorm before, SwiGLU and the residual add after.
    Against the ops one by one (independent PyTorch: rms_norm_ref, F.linear, F.silu), and each row's bits the
    same alone and in another batch."""
    M, H, K = 37, 40, 96  # K over one BLOCK_K of the interpreter's tiles: the norm's sum runs over two blocks
    x = torch.randn(M, K, dtype=dtype) * 3
    w = torch.randn(2 * H if swiglu else H, K, dtype=dtype) / K ** 0.5
    nw = (torch.rand(K) + 0.5).to(dtype)
    r = torch.randn(M, H, dtype=dtype)
    kw = dict(rms_eps=1e-5 if norm else None, residual=r if residual else None, swiglu=swiglu)
    y = kernels.matmul(x, hl.fold_norm(w, nw) if norm else w, **kw)
    xn = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * nw if norm else x
    want = F.linear(xn, w)  # RMSNorm with its weight, then the matmul: what the folded weight must give
    if swiglu:
        want = F.silu(want[:, :H]) * want[:, H:]
    want = want + r if residual else want
    assert y.shape == (M, H) and y.dtype == dtype
    w = hl.fold_norm(w, nw) if norm else w
    for ref in (want, hl.matmul_ref(x, w, **kw)):
        if dtype == torch.float32:  # the values: fp32 is where the math is checked
            close(y, ref, dtype)
        else:  # bf16: a chain of roundings (and the interpreter truncates): within a few ulps of the largest value
            torch.testing.assert_close(y.float(), ref.float(), rtol=0.05, atol=0.05 * ref.float().abs().max().item())
    i = int(torch.randint(0, M, ()))
    one = kernels.matmul(x[i:i + 1], w, **(kw | dict(residual=r[i:i + 1] if residual else None)))
    other_x = torch.cat([torch.randn(5, K, dtype=dtype), x[i:i + 1], torch.randn(70, K, dtype=dtype)])
    other_r = torch.cat([torch.randn(5, H, dtype=dtype), r[i:i + 1], torch.randn(70, H, dtype=dtype)])
    other = kernels.matmul(other_x, w, **(kw | dict(residual=other_r if residual else None)))
    assert torch.equal(one[0], y[i]) and torch.equal(other[5], y[i])


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_hands_on_sums_of_squares(dtype):
    """A matmul that writes the residual stream leaves each row's sum of squares in parts (sumsq_out); the next
    fused norm takes its scale from them (sumsq) instead of summing x again. The parts add up to the squares of
    what was written, a row's parts are the same bits alone as in the batch, and the next matmul uses the parts
    it is given (against matmul_ref with the same parts), not its own sum."""
    M, N, K, H = 37, 72, 96, 40
    x, r = torch.randn(M, K, dtype=dtype), torch.randn(M, N, dtype=dtype) * 2
    w = torch.randn(N, K, dtype=dtype) / K ** 0.5
    y, parts = kernels.matmul(x, w, residual=r, sumsq_out=True)
    assert torch.equal(y, kernels.matmul(x, w, residual=r)) and parts.dtype == torch.float32 and parts.shape[0] == M
    torch.testing.assert_close(parts.sum(-1), y.float().pow(2).sum(-1), rtol=1e-5, atol=1e-5)
    i = int(torch.randint(0, M, ()))
    y1, parts1 = kernels.matmul(x[i:i + 1], w, residual=r[i:i + 1], sumsq_out=True)
    assert torch.equal(y1[0], y[i]) and torch.equal(parts1[0], parts[i])
    w2 = torch.randn(2 * H, N, dtype=dtype) / N ** 0.5
    for given in (parts, torch.rand(M, 5) * N * 4):  # the real parts, and parts that do not fit y (the rule is used)
        kw = dict(rms_eps=1e-5, swiglu=True, sumsq=given)
        close(kernels.matmul(y, w2, **kw), hl.matmul_ref(y, w2, **kw), dtype)
    own = hl.matmul_ref(y, w2, rms_eps=1e-5, swiglu=True)
    assert not torch.allclose(kernels.matmul(y, w2, **kw).float(), own.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_silu_add(dtype):
    """A draft head's residual block in one kernel (silu_add): r + silu(z) for w stacking r's and z's weights,
    each with its bias; against independent PyTorch (F.linear, F.silu), and the block with no res projection
    (ResBlock.stacked: the identity for r) gives x + silu(z) exactly where z matches."""
    M, N, K = 21, 40, 96
    x = torch.randn(M, K, dtype=dtype)
    w, b = torch.randn(2 * N, K, dtype=dtype) / K ** 0.5, torch.randn(2 * N, dtype=dtype)
    y = kernels.matmul(x, w, b, silu_add=True)
    lin = F.linear(x, w, b)
    want = lin[:, :N] + F.silu(lin[:, N:])
    assert y.shape == (M, N) and y.dtype == dtype
    for ref in (want, hl.matmul_ref(x, w, b, silu_add=True)):
        if dtype == torch.float32:
            close(y, ref, dtype)
        else:
            torch.testing.assert_close(y.float(), ref.float(), rtol=0.05, atol=0.05 * ref.float().abs().max().item())
    block = hl.ResBlock(N, N).to(dtype)
    torch.nn.init.normal_(block.w.weight, std=0.2), torch.nn.init.normal_(block.w.bias)
    h = torch.randn(M, N, dtype=dtype)
    with torch.no_grad():
        sw, sb = block.stacked()
        assert sw.shape == (2 * N, N) and torch.equal(sw[:N], torch.eye(N, dtype=dtype)) and not sb[:N].any()
        got = kernels.matmul(h, sw, sb, silu_add=True)
        z = kernels.matmul(h, block.w.weight, block.w.bias)
        torch.testing.assert_close(got.float(), hl.silu_add_ref(h, z).float(), rtol=0.02, atol=0.02)
    with pytest.raises(ValueError, match="no other fusion"):
        kernels.matmul(x, w, b, silu_add=True, residual=y)


def test_dependent_launch_stays_off_where_it_cannot_run(monkeypatch):
    """kernels.PDL asks for programmatic dependent launch; CPU tensors (the interpreter) never get it, and the
    kernels compute the same there."""
    x, w = torch.randn(5, 32), torch.randn(24, 32)
    want = kernels.matmul(x, w)
    monkeypatch.setattr(kernels, "PDL", True)
    assert kernels._pdl(x) == dict(PDL=False)
    assert torch.equal(kernels.matmul(x, w), want)


def test_matmul_fused_mistakes():
    x, w = torch.randn(3, 16), torch.randn(5, 16)
    with pytest.raises(ValueError, match="even"):
        kernels.matmul(x, w, swiglu=True)
    with pytest.raises(ValueError, match="residual"):
        kernels.matmul(x, w, residual=torch.randn(3, 4))


def test_attention_bad_heads():
    q = torch.randn(1, 2, 5, 16)
    kc = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="multiple"):
        kernels.tree_attention(q, kc, kc, torch.zeros(1, dtype=torch.int32), None)


# ----------------------------------------------------------------------------------------------------------
# kv_compact, accept_greedy


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_compact(dtype):
    L, B, S, Hkv, D = 2, 4, 20, 2, 24
    k_all = torch.randn(L, B, S, Hkv, D, dtype=dtype)
    v_all = torch.randn(L, B, S, Hkv, D, dtype=dtype)
    lens = torch.tensor([0, 3, 14, 7], dtype=torch.int32)
    path = torch.stack([
        torch.tensor([0, 2, 5, 3]),  # overlapping: j=1 reads slot 2, which j=2 writes
        torch.tensor([0, 1, 2, 3]),  # no-op
        torch.tensor([0, 5, 4, 3]),  # a reversal
        torch.tensor([0, 3, 2, 3]),  # accepted 2 then the j tail
    ])
    k_ref, v_ref = k_all.clone(), v_all.clone()
    kernels.kv_compact(k_all, v_all, lens, path)
    hl.kv_compact_ref(k_ref, v_ref, lens, path)
    assert torch.equal(k_all, k_ref) and torch.equal(v_all, v_ref)  # a pure copy: bit for bit, everywhere


def test_kv_compact_random_paths_and_row_view():
    L, B, S, Hkv, D, T, P = 3, 3, 16, 3, 8, 7, 5
    k_all = torch.randn(L, B + 1, S, Hkv, D)
    v_all = torch.randn(L, B + 1, S, Hkv, D)
    for _ in range(3):
        lens = torch.randint(0, S - T + 1, (B,), dtype=torch.int32)
        path = torch.randint(0, T, (B, P))
        k_ref, v_ref = k_all.clone(), v_all.clone()
        kernels.kv_compact(k_all[:, 1:], v_all[:, 1:], lens, path)  # rows 1..B of the cache: a strided view
        hl.kv_compact_ref(k_ref[:, 1:], v_ref[:, 1:], lens, path)
        assert torch.equal(k_all, k_ref) and torch.equal(v_all, v_ref)


@pytest.mark.parametrize("T,vocab", [(2, 2), (9, 2), (20, 3), (33, 4)])
@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per-row"])
def test_accept_greedy(T, vocab, per_row):
    B = 6
    # retrieve [P, D1] shared, or a table per row [B, P, D1] (column-major, to exercise the strides)
    retrieve = random_trees(B, T)[1].mT.contiguous().mT if per_row else random_tree(T)[1]
    tokens = torch.randint(0, vocab, (B, T))  # a small vocabulary: many matches and ties between paths
    pred = torch.randint(0, vocab, (B, T))
    n, path, out = kernels.accept_greedy(tokens, pred, retrieve)
    ref = hl.accept_greedy_ref(tokens, pred, retrieve)
    assert n.dtype == torch.int64 and path.dtype == torch.int64 and out.dtype == torch.int64
    assert all(map(torch.equal, (n, path, out), ref))
    if per_row:  # row b is row b alone with its own [P, D1] table; so is longest_path (typical/exact acceptance)
        ok = torch.rand(B, retrieve.shape[1], retrieve.shape[2] - 1) < 0.6  # [B, P, depth]
        lp = hl.longest_path(ok, retrieve)
        for b in range(B):
            one = slice(b, b + 1)
            assert all(torch.equal(x[one], y) for x, y in zip(ref, hl.accept_greedy_ref(tokens[one], pred[one], retrieve[b])))
            assert all(torch.equal(x[one], y) for x, y in zip(lp, hl.longest_path(ok[one], retrieve[b])))


def test_accept_greedy_full_path_and_ties():
    """A row whose best path is accepted to the end, and a row where two paths tie (the first must win); the
    shared table also as an expanded [B, P, D1] view (batch stride 0), with the same results."""
    mask, retrieve, parent = random_tree(12)
    T = 12
    tokens = torch.randint(0, 5, (3, T))
    pred = torch.full((3, T), -7)  # matches nothing
    leaf_path = retrieve[-1][retrieve[-1] >= 0]
    for a, c in zip(leaf_path[:-1], leaf_path[1:]):  # row 0: base model agrees along the last path
        pred[0, a] = tokens[0, c]
    tokens[1] = 1  # row 1: every node is token 1, and so is every prediction: all paths accepted to the full
    pred[1] = 1
    n, path, out = kernels.accept_greedy(tokens, pred, retrieve)
    n_ref, path_ref, out_ref = hl.accept_greedy_ref(tokens, pred, retrieve)
    assert torch.equal(n, n_ref) and torch.equal(path, path_ref) and torch.equal(out, out_ref)
    wide = retrieve.expand(3, -1, -1)
    assert all(map(torch.equal, kernels.accept_greedy(tokens, pred, wide), (n, path, out)))
    assert all(map(torch.equal, hl.accept_greedy_ref(tokens, pred, wide), (n, path, out)))
    assert n[0] >= len(leaf_path) and n[2] == 1 and torch.equal(path[2], torch.arange(retrieve.shape[1]))


# ----------------------------------------------------------------------------------------------------------
# lm_topk


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,V,D", [(1, 37, 24), (5, 300, 70), (19, 300, 24), (5, 37, 70)])
@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_lm_topk(dtype, N, V, D, k, has_bias):
    x = torch.randn(N, 3, D, dtype=dtype)[:, 1]  # a strided view, as a head's features slice would be
    if N == 19:
        x = torch.randn(2, 20, D + 6, dtype=dtype)[:, :19, 3:D + 3].transpose(0, 1)  # [19, 2, D], leading dims
    w = torch.randn(V, D, dtype=dtype)
    bias = torch.randn(V, dtype=dtype) if has_bias else None
    values, indices = kernels.lm_topk(x, w, k, bias)
    ref_v, ref_i = hl.lm_topk_ref(x, w, k, bias)
    assert values.shape == ref_v.shape == (*x.shape[:-1], k) and indices.shape == ref_i.shape
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    # every position written and sane (torch.empty outputs): in range, distinct per row, largest first
    assert torch.isfinite(values).all() and ((indices >= 0) & (indices < V)).all()
    assert (indices.sort(-1).values.diff(dim=-1) > 0).all() and (values.diff(dim=-1) <= 0).all()
    if dtype == torch.float32:
        assert torch.equal(indices, ref_i)
        torch.testing.assert_close(values, ref_v, rtol=1e-5, atol=1e-5)
    else:
        # bf16 logits tie more often (and round differently here): the chosen tokens' reference logits must
        # be the reference's top k
        logits = torch.nn.functional.linear(x, w, bias).float()
        close(values, ref_v, dtype)
        close(logits.gather(-1, indices), ref_v, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [37, 300])
def test_lm_topk_negative_logits(dtype, V):
    """Every logit negative: the zero-padded columns past V (last chunk) must still never win."""
    x = torch.rand(4, 24, dtype=dtype)
    w = -torch.rand(V, 24, dtype=dtype)
    values, indices = kernels.lm_topk(x, w, 10)
    ref_v, ref_i = hl.lm_topk_ref(x, w, 10)
    assert ((indices >= 0) & (indices < V)).all()
    close(values, ref_v, dtype)
    if dtype == torch.float32:
        assert torch.equal(indices, ref_i)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lm_topk_draft_vocab(dtype):
    """With vocab (token id of each row of w) the indices come back as token ids."""
    V, D = 150, 40
    x, w = torch.randn(6, D, dtype=dtype), torch.randn(V, D, dtype=dtype)
    vocab = torch.randperm(5000)[:V]
    values, ids = kernels.lm_topk(x, w, 5, None, vocab)
    _, rows = kernels.lm_topk(x, w, 5)
    ref_v, ref_ids = hl.lm_topk_ref(x, w, 5, None, vocab)
    assert torch.equal(ids, vocab[rows]) and ids.dtype == torch.int64
    close(values, ref_v, dtype)
    if dtype == torch.float32:
        assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("vocab", [False, True])
def test_lm_topk_into_the_tree(vocab):
    """into=(tokens, node_of): the merge kernel also writes each (row, parent, rank)'s id into its tree node,
    as the reference's scatter does; the other nodes keep their tokens (a tree level of a Tree)."""
    B, V, D = 3, 90, 24
    tree = hl.Tree([[0], [1], [2], [0, 0], [0, 1], [2, 0], [0, 0, 0], [0, 1, 0], [0, 1, 1]])
    for lv in tree.levels:
        P, k = lv["node_of"].shape
        x, w = torch.randn(B, P, D), torch.randn(V, D)
        ids = torch.randperm(5000)[:V] if vocab else None
        tokens = torch.randint(5000, 6000, (B, tree.size))
        want = tokens.clone()
        v_ref, i_ref = hl.lm_topk_ref(x, w, k, None, ids, into=(want, lv["node_of"]))
        got = tokens.clone()
        values, indices = kernels.lm_topk(x, w, k, None, ids, into=(got, lv["node_of"]))
        assert torch.equal(indices, i_ref) and torch.equal(got, want)
        assert torch.equal(want[:, lv["nodes"]], i_ref[:, :, :].reshape(B, -1)[:, (lv["node_of"] >= 0).flatten()])
        others = torch.ones(tree.size, dtype=torch.bool)
        others[lv["nodes"]] = False
        assert torch.equal(got[:, others], tokens[:, others])  # nothing else written
    with pytest.raises(ValueError, match="do not fit"):
        kernels.lm_topk(torch.randn(B, 2, D), torch.randn(V, D), 2, into=(tokens, torch.zeros(3, 2, dtype=torch.long)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["negative", "bias-vocab"])
def test_lm_topk_lse(dtype, case):
    """lse=True also gives the log-sum-exp over all V logits (as lm_topk rounds them), merged from per-chunk
    partials: the columns past V in the last chunk, and the merge's padding past the 3 chunks, must not count
    (every logit negative in "negative": each would add exp(0)); large logits must not overflow (|logits| ~100
    in "bias-vocab", with a bias and a draft vocabulary); values and indices stay those of lse=False."""
    D, V = 24, 70 if case == "negative" else 100  # 3 or 4 chunks of the interpreter's 32, the last one partial
    x = torch.randn(2, 3, D, dtype=dtype)  # leading dims: lse [2, 3]
    w = torch.randn(V, D, dtype=dtype)
    bias = vocab = None
    if case == "negative":
        x, w = x.abs() + 0.5, -w.abs()
    else:
        x, bias, vocab = x * 8, torch.randn(V, dtype=dtype), torch.randperm(5000)[:V]
    values, indices, lse = kernels.lm_topk(x, w, 3, bias, vocab, lse=True)
    ref_v, ref_i, ref_lse = hl.lm_topk_ref(x, w, 3, bias, vocab, lse=True)
    logits = torch.nn.functional.linear(x, w, bias).float()
    assert torch.equal(ref_lse, torch.logsumexp(logits, -1)) and (case != "negative" or (logits < 0).all())
    assert torch.equal(ref_v, hl.lm_topk_ref(x, w, 3, bias, vocab)[0])
    assert lse.shape == (2, 3) and lse.dtype == torch.float32 and (values <= lse[..., None]).all()
    close(lse, ref_lse, dtype)
    close(values, ref_v, dtype)
    v2, i2 = kernels.lm_topk(x, w, 3, bias, vocab)
    assert torch.equal(values, v2) and torch.equal(indices, i2)
    if dtype == torch.float32:
        assert torch.equal(indices, ref_i)


def test_lm_topk_chunk_ties():
    """Equal logits across chunks and within one (repeated rows of w): the first index of a tie goes first, and
    one chunk can hold several of the row's k best."""
    V, D = 200, 16
    x = torch.randint(1, 5, (3, D)).float()  # small integers: the tied logits are exact, in any sum order
    w = torch.randn(V, D) * 0.1
    w[[5, 77, 150]] = 1.0  # the three best, equal, in different chunks (of the interpreter's 32-wide tiles)
    w[40:44] = 0.5  # the next four, equal, in one chunk
    values, indices = kernels.lm_topk(x, w, 8)
    ref_v, ref_i = hl.lm_topk_ref(x, w, 8)
    torch.testing.assert_close(values, ref_v, rtol=1e-5, atol=1e-5)
    assert (indices[:, :7] == torch.tensor([5, 77, 150, 40, 41, 42, 43])).all()
    assert torch.equal(indices[:, 7], ref_i[:, 7])
    # k=1 (greedy verification) picks as argmax does: the first of the tied best, in any chunk
    assert kernels.lm_topk(x, w, 1)[1][:, 0].tolist() == [5, 5, 5] == hl.lm_topk_ref(x, w, 1)[1][:, 0].tolist()
    w[[5, 77]] = 0.9
    assert kernels.lm_topk(x, w, 1)[1][:, 0].tolist() == [150] * 3 == torch.nn.functional.linear(x, w).argmax(-1).tolist()


# ----------------------------------------------------------------------------------------------------------
# dispatch in hydra_lite, and the kernels inside the model


def test_dispatch_falls_back_to_refs_on_cpu(monkeypatch):
    class Boom:
        def __getattr__(self, name):
            raise AssertionError(f"kernels.{name} called for CPU tensors")

    monkeypatch.setattr(hl, "_kernels", Boom())
    assert not hl._triton(torch.zeros(1))
    x, w = torch.randn(2, 8), torch.randn(8)
    torch.testing.assert_close(hl.rms_norm(x, w, 1e-5), hl.rms_norm_ref(x, w, 1e-5))
    torch.testing.assert_close(hl.swiglu(x), hl.swiglu_ref(x))
    q, kc, vc, lens = attn_inputs(1, 2, 2, 1, 8, 6, torch.float32)
    torch.testing.assert_close(hl.attention(q, kc, vc, lens), hl.attention_ref(q, kc, vc, lens))
    n, p, _ = hl.greedy_path(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long),
                             torch.tensor([[0, 1], [0, 2]]))
    assert n.tolist() == [2]
    assert hl.greedy_path(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long),
                          torch.tensor([[[0, 1], [0, 2]]]))[0].tolist() == [1]  # a retrieve table per row
    assert len(hl.lm_topk(x, torch.randn(5, 8), 2, lse=True)) == 3
    hl.kv_compact(torch.zeros(1, 1, 4, 1, 2), torch.zeros(1, 1, 4, 1, 2), lens, p)


def tiny_model(dtype=torch.float32):
    cfg = hl.Config(dim=48, n_layers=2, n_heads=6, n_kv_heads=2, hidden_dim=40, vocab_size=50, max_seq_len=64)
    model = hl.Llama(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.to(dtype).eval()


def test_model_tree_step_with_kernels(monkeypatch):
    """Prefill, a tree verification pass, acceptance and compaction through the model, kernels vs references:
    the kernels at their real call sites (fused-projection views, per-layer cache views)."""
    model = tiny_model()
    mask, retrieve, parent = random_tree(7)
    depth = torch.tensor([0] + [0] * 6)
    for i in range(1, 7):
        depth[i] = depth[parent[i]] + 1
    prompt = torch.randint(0, 50, (2, 5))
    tree_tokens = torch.randint(0, 50, (2, 7))
    rows = hl.TreeRows(torch.tensor(parent).expand(2, -1), depth.expand(2, -1), mask.expand(2, -1, -1),
                       retrieve.expand(2, -1, -1))
    results = []
    with torch.no_grad():
        for use_kernels in (False, True):
            monkeypatch.setattr(hl, "_triton", lambda x: use_kernels)
            cache = model.new_cache(2, 24)
            h0 = model(prompt, cache)
            cache.lens += 5
            pos = cache.lens[:, None].long() + depth[None]
            hidden = model(tree_tokens, cache, pos, rows)
            pred = hl.lm_topk(hidden, model.output_weight, 1)[1][..., 0]  # as greedy verification does
            n, path, out = hl.greedy_path(tree_tokens, pred, retrieve)
            hl.kv_compact(cache.k, cache.v, cache.lens, path)
            results.append((h0, hidden, n, path, out, cache.k.clone(), cache.v.clone()))
            assert torch.equal(pred, model.logits(hidden).argmax(-1))
    (h0, hid, n, path, out, k, v), (h0_k, hid_k, n_k, path_k, out_k, k_k, v_k) = results
    close(h0_k, h0, torch.float32)
    torch.testing.assert_close(hid_k, hid, rtol=1e-4, atol=1e-4)
    assert torch.equal(n_k, n) and torch.equal(path_k, path) and torch.equal(out_k, out)
    torch.testing.assert_close(k_k, k, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v_k, v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fused", [False, True], ids=["layers", "fused-layers-and-merge"])
def test_model_tree_pass_is_decoding_bit_for_bit(monkeypatch, fused):
    """Through the whole model with the batch-invariant kernels (matmul, path_attention): the hidden states of a
    tree pass at the nodes of a path equal, bit for bit, decoding that path's tokens one at a time (ragged rows).
    Also with the layers fused (hl.FUSED: qkv_rope, the fused matmuls) and path_attention's merge in the kernel.
    (The CPU reference path does not promise this: F.linear's CPU kernels may block a 1-row and a 6-row product
    differently, and the reference attention reduces a tree's keys in another order than decoding's.)"""
    monkeypatch.setattr(hl, "EXACT", True)
    monkeypatch.setattr(hl, "FUSED", fused)
    monkeypatch.setattr(kernels, "PATH_MERGE_IN_KERNEL", fused)
    monkeypatch.setattr(kernels, "PATH_SPLIT_LEN", 32)  # several splits
    model = tiny_model()
    tree = hl.Tree([[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    lens = torch.tensor([37, 6], dtype=torch.int32)  # row 0: the tree past a split boundary
    tokens = torch.randint(0, 50, (2, tree.size))
    with torch.no_grad():
        tree_cache, ar_cache = model.new_cache(2, 48), model.new_cache(2, 64)
        model(torch.randint(0, 50, (2, 37)), tree_cache)  # the prompts (through the references: quicker here)
        ar_cache.k[:, :, :48], ar_cache.v[:, :, :48] = tree_cache.k, tree_cache.v
        tree_cache.lens.copy_(lens)
        ar_cache.lens.copy_(lens)
        monkeypatch.setattr(hl, "_triton", lambda x: True)
        rows = tree.rows(2)
        hidden = model(tokens, tree_cache, tree_cache.lens[:, None].long() + rows.node_depth, rows)
        for d, node in enumerate([0, 1, 3, 5]):  # the deepest path
            h = model(tokens[:, node:node + 1], ar_cache)
            ar_cache.lens += 1
            assert torch.equal(h[:, 0], hidden[:, node]), d


@pytest.mark.parametrize("fused_heads", [False, True], ids=["blocks", "fused-blocks"])
@pytest.mark.parametrize("grounded", [False, True], ids=["medusa", "hydra"])
def test_draft_with_kernels(monkeypatch, grounded, fused_heads):
    """Drafting a tree (heads' blocks through silu_add, or each through one matmul with hl.FUSED_HEADS;
    proposals through lm_topk over a draft vocabulary, written into the tree by its merge): kernels give the
    same tokens as the references."""
    monkeypatch.setattr(hl, "EXACT", True)
    monkeypatch.setattr(hl, "FUSED_HEADS", fused_heads)
    model = tiny_model()
    c = model.cfg
    hc = hl.HeadsConfig(n_heads=3, n_layers=2, dim=c.dim, vocab_size=c.vocab_size, grounded=grounded, prefix=False,
                        lm_head="base", draft_vocab=30)
    heads = hl.DraftHeads(hc, c)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    heads.vocab.copy_(torch.randperm(c.vocab_size)[:30])
    h, root = torch.randn(2, c.dim), torch.randint(0, c.vocab_size, (2,))
    for tree in (hl.Tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1]]), hl.DynamicTree(8, 3, 3, 3)):
        out = []
        with torch.no_grad():
            for use_kernels in (False, True):
                monkeypatch.setattr(hl, "_triton", lambda x: use_kernels)
                out.append(hl.draft([hl.HeadDrafts(heads, model)], tree, hl.DraftInput(root, h)))
            monkeypatch.setattr(hl, "FUSED_HEADS", False)  # the oracle: blocks as two ops, references
            monkeypatch.setattr(hl, "_triton", lambda x: False)
            plain = hl.draft([hl.HeadDrafts(heads, model)], tree, hl.DraftInput(root, h))[0]
            monkeypatch.setattr(hl, "FUSED_HEADS", fused_heads)
        assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][0], plain), type(tree)  # the tokens
        assert all(torch.equal(a, b) for a, b in zip(vars(out[0][1]).values(), vars(out[1][1]).values()) if a is not None)
        assert torch.isin(out[1][0][:, 1:], heads.vocab).all()  # drafted tokens come from the draft vocabulary


@pytest.mark.parametrize("use_kernels", [False, True], ids=["ref", "kernels"])
def test_batched_prefill_matches_rows_alone(monkeypatch, use_kernels):
    """The prefill runs all rows in one right-padded forward: each row's logits, draft state (through the
    Hydra++ layer) and caches match that row prefilled alone, and the padding's cache slots are never counted."""
    monkeypatch.setattr(hl, "_triton", lambda x: use_kernels)
    model = tiny_model()
    c = model.cfg
    hc = hl.HeadsConfig(n_heads=2, n_layers=1, dim=c.dim, vocab_size=c.vocab_size, grounded=True, prefix=True)
    heads = hl.DraftHeads(hc, c)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    heads.eval()
    prompts = [torch.randint(0, c.vocab_size, (n,)).tolist() for n in (7, 2, 12)]

    def prefill(rows):
        gen = hl.Generator(model, heads=heads, cuda_graphs=False)
        ws = gen._workspace(len(rows), 32, "spec", hl.SamplingParams())
        with torch.no_grad():
            logits, h = gen._prefill(ws, rows)
        return ws, logits, h

    gen, logits, h = prefill(prompts)
    assert gen.cache.lens.tolist() == gen.prefix_cache.lens.tolist() == [7, 2, 12]
    for b, p in enumerate(prompts):
        alone, logits1, h1 = prefill([p])
        torch.testing.assert_close(logits[b], logits1[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(h[b], h1[0], rtol=1e-4, atol=1e-4)
        for cache, cache1 in ((gen.cache, alone.cache), (gen.prefix_cache, alone.prefix_cache)):
            torch.testing.assert_close(cache.k[:, b, :len(p)], cache1.k[:, 0, :len(p)], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(cache.v[:, b, :len(p)], cache1.v[:, 0, :len(p)], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("early", [False, True], ids=["weights-after-wait", "weights-before-wait"])
def test_launch_floor_chain_counts_its_links(early):
    """scripts/launch_floor.py (issue 14's floor under a step of dependent kernels): each link of its chain adds 1
    and the sum of its program's slice of that link's weights to what the link before wrote (random lengths,
    grids, inputs and weights)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    import launch_floor
    import triton

    g = torch.Generator().manual_seed(zlib.crc32(b"launch_floor"))
    launches, grid, n, per = (int(torch.randint(lo, hi, (), generator=g)) for lo, hi in ((2, 8), (1, 5), (7, 90), (1, 9)))
    bufs = [torch.randn(n, generator=g), torch.zeros(n)]
    w = torch.randn(launches, grid * per, generator=g).to(torch.bfloat16)
    want = bufs[0].clone()
    program = torch.arange(n) // triton.next_power_of_2(triton.cdiv(n, grid))  # (each element's program)
    for i in range(launches):
        want += 1 + w[i].float().reshape(grid, per).sum(1)[program]
    out = launch_floor.chain(bufs, w, launches, grid, False, early)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)


def test_prefill_padding_blocks_are_skipped():
    """live (a prefill's real tokens per row): matmul, qkv_rope and causal tree_attention give the live tokens
    the same bits as without it, and skip what is only padding: its cache slots keep what they held (64-row
    blocks on the interpreter: row 1's tail and all of row 2 here)."""
    B, T, K, Hq, Hkv, D, S = 3, 40, 48, 6, 2, 16, 64
    live = torch.tensor([T, 24, 0], dtype=torch.int32)
    x = torch.randn(B, T, K)
    w, w13 = torch.randn(2 * K, K) / K ** 0.5, torch.randn(4 * K, K) / K ** 0.5
    res = torch.randn(B, T, 2 * K)
    for kw in (dict(), dict(rms_eps=1e-5, swiglu=True), dict(residual=res, sumsq_out=True)):
        wk = w13 if kw.get("swiglu") else w
        full, part = kernels.matmul(x, wk, **kw), kernels.matmul(x, wk, live=live, **kw)
        full, part = (full[0], part[0]) if kw.get("sumsq_out") else (full, part)
        for b in range(B):
            assert torch.equal(part[b, :live[b]], full[b, :live[b]]), (kw, b)
    wqkv = torch.randn((Hq + 2 * Hkv) * D, K) / K ** 0.5
    cos, sin = hl.rope_tables(hl.Config(dim=Hq * D, n_layers=1, n_heads=Hq, n_kv_heads=Hkv, hidden_dim=8,
                                        vocab_size=8, head_dim=D), 128, "cpu")
    lens = torch.tensor([3, 0, 10], dtype=torch.int32)
    pos = lens[:, None].long() + torch.arange(T)
    caches = [(torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)) for _ in range(2)]
    before = [(k.clone(), v.clone()) for k, v in caches]
    q_full = kernels.qkv_rope(x, wqkv, 1e-5, cos, sin, pos, *caches[0], lens, Hq)
    q_part = kernels.qkv_rope(x, wqkv, 1e-5, cos, sin, pos, *caches[1], lens, Hq, live=live)
    for b in range(B):
        n, lo = int(live[b]), int(lens[b])
        assert torch.equal(q_part[b, :n], q_full[b, :n])
        for c in range(2):  # the live tokens' keys and values, as without live
            assert torch.equal(caches[1][c][b, lo:lo + n], caches[0][c][b, lo:lo + n])
    for c in range(2):  # skipped blocks write nothing
        assert torch.equal(caches[1][c][2], before[1][c][2])
        assert torch.equal(caches[1][c][1, lens[1] + 64 - T:lens[1] + T], before[1][c][1, lens[1] + 64 - T:lens[1] + T])
    out_full = kernels.tree_attention(q_full, *caches[0], lens, None)
    out_part = kernels.tree_attention(q_full, *caches[0], lens, None, live=live)
    for b in range(B):
        assert torch.equal(out_part[b, :live[b]], out_full[b, :live[b]])
    with pytest.raises(ValueError, match="live"):
        kernels.matmul(x, w, live=live.long())


def test_model_prefill_skipping_padding(monkeypatch):
    """The model with live (the fused layers through the kernels, on the interpreter): the live tokens' hidden
    states and cache entries are those computed without it, bit for bit, and a block of padding only (row 1's
    tail, row 2) writes nothing into the cache."""
    from test_runtime import tiny_model

    monkeypatch.setattr(hl, "_kernels_for", lambda x: True)  # (the GPU's path, interpreted)
    model = tiny_model(21, n_heads=4, n_kv_heads=2)
    B, T = 3, 40
    tokens = torch.randint(0, 97, (B, T))
    live = torch.tensor([T, 24, 0], dtype=torch.int32)
    runs = []
    with torch.inference_mode():
        assert hl._fused(torch.zeros(1))
        for lv in (None, live):
            cache = model.new_cache(B, 64)
            runs.append((model(tokens, cache, live=lv), cache.k.clone(), cache.v.clone()))
    (h0, k0, v0), (h1, k1, v1) = runs
    for b in range(B):
        n = int(live[b])
        assert torch.equal(h1[b, :n], h0[b, :n]) and torch.equal(k1[:, b, :n], k0[:, b, :n])
        assert torch.equal(v1[:, b, :n], v0[:, b, :n])
    assert not k1[:, 2].any() and not v1[:, 2].any() and k0[:, 2, :T].any()
