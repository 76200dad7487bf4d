"""hydra-lite: a small Llama inference runtime with Hydra speculative decoding.

One file you can vendor. Plain PyTorch everywhere; with kernels.py beside it and a CUDA GPU, the hot paths run
as Triton kernels and each decoding step is replayed as a CUDA graph.

    python hydra_lite.py --prompt "Why is the sky blue?"                 # default model + heads
    python hydra_lite.py --checkpoint DIR --heads HEADS_DIR --mode hydra --prompt "..."

Hydra (Ankner et al. 2024, arXiv 2402.05109): draft heads on the base model's last hidden state propose a tree
of continuations, head k conditioned on the tokens drafted before it; the base model checks the whole tree in
one forward pass with a tree attention mask and keeps the longest path it agrees with.

The file reads top-down: the config; the reference ops (the CPU path, and the oracles of kernels.py) and their
dispatch; the model (projections, decoder layer, KV cache, loading); tokenizer and chat templates; sampling;
draft heads and trees; drafting, verification and acceptance; the Generator; the command line.
"""
import argparse
import heapq
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_kernels():
    """kernels.py beside this file (or in its package), else None: the Triton kernels are optional, and without
    them (or without a GPU) the reference ops below run. A `kernels` found first on the path may be another
    package of that name (Hugging Face's, which transformers >= 5.25 installs): then ours is loaded from its file,
    under a name of its own."""
    try:
        from . import kernels as mod  # vendored inside a package
        return mod
    except ImportError:
        pass
    try:
        import kernels as mod
        if hasattr(mod, "path_attention"):
            return mod
    except ImportError:
        pass
    path = os.path.join(HERE, "kernels.py")
    if not os.path.exists(path):
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("hydra_lite_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ImportError:  # (no Triton)
        return None
    sys.modules[spec.name] = mod
    return mod


_kernels = _load_kernels()
DEFAULT_CHECKPOINT = os.path.join(HERE, "checkpoints", "smollm2-135m-instruct")
DEFAULT_HEADS = os.path.join(HERE, "heads", "smollm2-135m-hydra++")


class HydraLiteError(Exception):
    """Bad input from the user: a missing file, a wrong shape, an impossible setting."""


# What the CLI reports in one line: the user's mistakes, and inputs a kernel cannot take (a model's shape, a knob).
USER_ERRORS = (HydraLiteError,) + ((_kernels.KernelInputError,) if _kernels is not None else ())


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    vocab_size: int
    head_dim: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    bos_id: Optional[int] = 1
    eos_ids: list = field(default_factory=lambda: [2])
    add_bos: bool = True
    chat_template: str = "none"
    default_system: Optional[str] = None
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size", "max_seq_len"):
            check_int(f"config {name}", getattr(self, name), 1)
        check_int("config head_dim", self.head_dim, 0)
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise HydraLiteError(f"config {name} must be a positive number, not {value!r}")
        if not isinstance(self.eos_ids, list) or not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in self.eos_ids):
            raise HydraLiteError(f"config eos_ids must be a list of token ids below {self.vocab_size}, not {self.eos_ids!r}")
        self.head_dim = self.head_dim or self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise HydraLiteError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise HydraLiteError(f"head_dim={self.head_dim} is odd: rotate-half RoPE needs an even head_dim")

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise HydraLiteError("config.json must hold a JSON object")
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        missing = [k for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size") if k not in d]
        if missing:
            raise HydraLiteError(f"config is missing {missing}")
        return cls(**known)


def check_temperature(what, value):
    """A sampling temperature: 0 (greedy) or a positive finite number."""
    if not 0 <= value < math.inf:  # (NaN fails it too)
        raise HydraLiteError(f"{what} must be 0 (greedy) or positive, not {value}")
    return value


def check_int(what, value, lowest, highest=None):
    """value must be an int in [lowest, highest]; else a HydraLiteError that says so."""
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest or (highest is not None and value > highest):
        bound = f"at least {lowest}" if highest is None else f"between {lowest} and {highest}"
        raise HydraLiteError(f"{what} must be an integer {bound}, not {value!r}")
    return value


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise HydraLiteError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise HydraLiteError(f"{path} is not valid JSON: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Reference ops. Plain PyTorch: the CPU path, and the oracle that tests hold kernels.py's Triton kernels to.
# Shapes: activations [B, T, ...]; a KV cache layer [B, S, n_kv_heads, head_dim]; lens[b] = tokens of row b
# already in the cache. New tokens are written at slots lens[b] .. lens[b]+T-1 and lens is left unchanged.


def rms_norm_ref(x, w, eps, residual=None):
    """RMSNorm(x [+ residual]); with a residual also returns the sum (the next residual stream)."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w
    return y if residual is None else (y, x)


def swiglu_ref(gate_up):
    """silu(gate) * up, for the fused [..., 2*hidden] output of w13."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_rotate(x, cos, sin):
    """Rotate-half RoPE. x [B, T, H, D]; cos, sin [B, T, D/2] float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def rope_cache_write_ref(q, k, v, cos_table, sin_table, pos, k_cache, v_cache, lens):
    """Rotate q and k by their positions pos [B, T]; write k and v into the cache at slots lens[b] + t.
    Returns rotated q. cos_table, sin_table: [max_pos, D/2] float32."""
    cos, sin = cos_table[pos], sin_table[pos]
    q, k = rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)
    B, T = pos.shape
    slots = lens[:, None].long() + torch.arange(T, device=q.device)
    rows = torch.arange(B, device=q.device)[:, None].expand(B, T)
    k_cache[rows, slots] = k.to(k_cache.dtype)
    v_cache[rows, slots] = v.to(v_cache.dtype)
    return q


def qkv_rope_ref(x, w, rms_eps, cos_table, sin_table, pos, k_cache, v_cache, lens, n_heads, sumsq=None, live=None):
    """A decoder layer's attention input in one op: q, k, v = RMSNorm(x) @ w.T (the norm's weight folded into w:
    fold_norm; eps rms_eps; sumsq: see matmul_ref), split into heads; then rope_cache_write_ref. x [B, T, dim] ->
    rotated q [B, T, n_heads, D]. live: see matmul_ref."""
    B, T, _ = x.shape
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    q, k, v = matmul_ref(x, w, rms_eps=rms_eps, sumsq=sumsq).split([n_heads * D, Hkv * D, Hkv * D], -1)
    return rope_cache_write_ref(q.view(B, T, n_heads, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D), cos_table,
                                sin_table, pos, k_cache, v_cache, lens)


def attention_ref(q, k_cache, v_cache, lens, mask=None):
    """Attention of T new tokens over their row's cache: every cached slot < lens[b] is visible; among the new
    tokens (slots lens[b] ..) query i sees key j where mask[i, j] (mask [T, T] bool, one tree for all rows), or
    mask[b, i, j] (mask [B, T, T] bool: a tree per row; an expanded view will do); None = causal.
    q [B, T, Hq, D] -> [B, T, Hq, D]. Covers prefill, decoding (T=1) and tree verification."""
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    out = torch.empty_like(q)
    for b in range(B):  # rows have different lengths
        n = int(lens[b]) + T
        k = k_cache[b, :n].float().repeat_interleave(Hq // Hkv, dim=1)  # [n, Hq, D]
        v = v_cache[b, :n].float().repeat_interleave(Hq // Hkv, dim=1)
        scores = torch.einsum("thd,shd->hts", q[b].float(), k) / math.sqrt(D)
        visible = torch.ones(T, n, dtype=torch.bool, device=q.device)
        visible[:, n - T:] = mask if mask.dim() == 2 else mask[b]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[b] = torch.einsum("hts,shd->thd", scores.softmax(-1), v).to(q.dtype)
    return out


def path_attention_ref(q, k_cache, v_cache, lens, path=None, depth=None):
    """Attention of each new token over the cached slots < lens[b], then the tree slots lens[b] + path[b, t, j]
    for j = 0 .. depth[b, t] (its ancestors from the root, then itself). path [B, T, D1], depth [B, T]; None: one
    token per row, decoding. (kernels.path_attention computes it batch-invariantly; this is its oracle.)"""
    if path is None:
        return attention_ref(q, k_cache, v_cache, lens)
    B, T = depth.shape
    j = torch.arange(path.shape[-1], device=q.device)
    on_path = (j <= depth[..., None]) & (path >= 0)  # [B, T, D1]
    mask = torch.zeros(B, T, T, dtype=torch.bool, device=q.device)
    mask.scatter_(2, torch.where(on_path, path, 0), True)  # (padding points at the root, on every path)
    return attention_ref(q, k_cache, v_cache, lens, mask)


def fold_norm(w, norm_w):
    """w [N, K] with RMSNorm's weight [K] folded into its columns: RMSNorm(x) @ w.T == rms_scale(x) * (x @
    fold_norm(w, norm_w).T), so a fused matmul takes x as it is and scales each result row once."""
    return (w.float() * norm_w.float()).to(w.dtype)


def matmul_ref(x, w, bias=None, rms_eps=None, residual=None, swiglu=False, sumsq=None, sumsq_out=False, silu_add=False,
               live=None):
    """x @ w.T (+ bias): every projection and the output layer (kernels.matmul: the batch-invariant kernel).
    Optionally fused with its neighbours in a decoder layer: rms_eps: RMSNorm of x first, its weight folded into
    w (fold_norm), its 1/RMS applied to the product in float32 (from sumsq [..., P] when given: the sum of
    squares of each row of x in P parts); swiglu: w stacks gate and up and the result is silu(gate) * up;
    residual: added to the result. sumsq_out: returns (y, y's rows' sums of squares [..., P'] (here P' = 1)).
    live: x [B, T, ...] is a prefill and live (int32 [B]) its rows' real tokens: the kernel may skip blocks of
    padding (their rows' results are unspecified); here every row is computed.
    silu_add: w (and bias) stack r and z, and the result is r + silu(z) (a draft head's residual block)."""
    if silu_add:
        y = F.linear(x, w, bias)
        return silu_add_ref(*y.split(w.shape[0] // 2, -1))
    if rms_eps is None:
        y = F.linear(x, w, bias)
    else:
        xf = x.float()
        ss = xf.pow(2).sum(-1, keepdim=True) if sumsq is None else sumsq.sum(-1, keepdim=True)
        y = F.linear(xf, w.float()) * torch.rsqrt(ss / x.shape[-1] + rms_eps)
        y = (y if bias is None else y + bias.float()).to(x.dtype)
    if swiglu:
        y = swiglu_ref(y)
    y = y if residual is None else y + residual
    return (y, y.float().pow(2).sum(-1, keepdim=True)) if sumsq_out else y


def kv_compact_ref(k_all, v_all, lens, path):
    """After verification, move the accepted tree tokens' keys/values to the front of the tree's slots:
    slot lens[b] + path[b, j] -> slot lens[b] + j, in every layer. k_all, v_all [L, B, S, Hkv, D];
    path [B, P] node indices (entries past the accepted length are j itself: a no-op copy)."""
    B, P = path.shape
    rows = torch.arange(B, device=path.device)[:, None].expand(B, P)
    src = lens[:, None].long() + path.long()
    dst = lens[:, None].long() + torch.arange(P, device=path.device)
    for cache in (k_all, v_all):
        cache[:, rows, dst] = cache[:, rows, src]  # the gather copies first, so overlapping moves are safe


def accept_greedy_ref(tree_tokens, base_pred, retrieve):
    """Greedy verification. tree_tokens, base_pred [B, T]: the drafted token at each tree node and the base
    model's argmax after it. retrieve [P, depth+1]: node indices of each root-to-leaf path, -1 padded; or
    [B, P, depth+1], a table per row (row b's tree: retrieve[b]). Returns n_accept [B] (tokens accepted, root
    included, >= 1), path [B, depth+1] (the accepted nodes, then j for the unused tail so a KV compaction over
    it is a no-op) and step_output's row [B, depth+3]."""
    idx = retrieve.clamp(min=0)
    match = take_nodes(tree_tokens, idx[..., 1:]) == take_nodes(base_pred, idx[..., :-1])  # [B, P, depth]
    n_accept, path = longest_path(match, retrieve)
    next_token = base_pred.gather(1, last_accepted(path, n_accept))[:, 0]
    return n_accept, path, step_output(tree_tokens, n_accept, path, next_token)


def last_accepted(path, n_accept):
    """[B, 1]: the tree node of each row's last accepted token."""
    return path.gather(1, (n_accept - 1)[:, None])


def step_output(tree_tokens, n_accept, path, next_token):
    """One row per sequence for the host: the tokens along the path (valid up to n_accept), n_accept, and
    next_token [B], the base model's token after the last accepted one (the next root). [B, depth+3]"""
    return torch.cat([tree_tokens.gather(1, path), n_accept[:, None], next_token[:, None]], dim=1)


def lm_topk_ref(x, w, k, bias=None, vocab=None, lse=False, into=None):
    """Draft proposals: the k largest of x @ w.T (+ bias) per row, largest first. x [..., D], w [V, D].
    Returns values (float32) and indices (int64), each [..., k]; with vocab [V] (the token id of each row of
    w), the indices are token ids. With lse=True also the log-sum-exp [...] (float32, natural log) of all V
    logits of each row (those values are of), so values - lse are the top k's log-probabilities.
    into=(tokens [B, T], node_of [P, k]): x is [B, P, D] (or [B, D] with P = 1), and the ids are also written
    into the tree: tokens[b, node_of[p, r]] = indices[b, p, r] where node_of[p, r] >= 0 (the tree's node that
    parent p's rank r fills)."""
    logits = F.linear(x, w, bias).float()
    if k == 1:  # greedy verification: the first of equal maxima, as argmax (and greedy decoding) picks
        indices = logits.argmax(-1, keepdim=True)
        values = logits.gather(-1, indices)
    else:
        values, indices = logits.topk(k, dim=-1)
    indices = indices if vocab is None else vocab[indices]
    if into is not None:
        tokens, node_of = into
        fills = node_of.flatten() >= 0
        # (where no node is filled, node 0 gets its own token again: static shapes, no host read)
        ids = torch.where(fills, indices.reshape(tokens.shape[0], -1), tokens[:, :1])
        tokens.scatter_(1, node_of.flatten().clamp(min=0).expand(tokens.shape[0], -1), ids)
    return (values, indices, torch.logsumexp(logits, -1)) if lse else (values, indices)


def head_input_ref(h, tokens, path, embed_w):
    """Grounded heads' inputs at one depth: h [B, dim], tokens [B, nodes], path [P, L] (node ids from the root
    to each parent) or [B, P, L] (row b's own: path[b]) -> concat(h, embed(tokens on the path)) [B, P, (L+1)*dim]."""
    B, P = h.shape[0], path.shape[-2]
    emb = F.embedding(take_nodes(tokens, path), embed_w).flatten(2)  # [B, P, L*dim]
    return torch.cat([h[:, None, :].expand(B, P, -1), emb.to(h.dtype)], dim=-1)


def silu_add_ref(res, z):
    return res + F.silu(z)


def take_nodes(x, nodes):
    """x [B, T] at tree node indices: nodes [P, L] shared by all rows, or [B, P, L] one table per row -> [B, P, L]."""
    if nodes.dim() == 2:
        return x[:, nodes]
    return x.gather(1, nodes.reshape(nodes.shape[0], -1)).view(nodes.shape)


def longest_path(ok, retrieve):
    """ok [B, P, depth]: whether each path's token at depth d+1 is accepted; retrieve [P, depth+1] or
    [B, P, depth+1] (per row). Returns (n_accept, path) for the first path with the longest accepted prefix;
    padding (-1) in retrieve never counts."""
    idx = retrieve.clamp(min=0)
    ok = ok & (retrieve[..., 1:] >= 0)
    accepted = ok.int().cumprod(dim=-1).sum(dim=-1)  # [B, P]
    best = accepted.argmax(dim=-1)  # first longest path
    n_accept = accepted.gather(1, best[:, None])[:, 0] + 1
    j = torch.arange(retrieve.shape[-1], device=retrieve.device)
    best_path = idx[best] if retrieve.dim() == 2 else idx[torch.arange(len(best), device=best.device), best]
    path = torch.where(j[None] < n_accept[:, None], best_path, j[None])
    return n_accept, path


def causal_attention_ref(q, k, v, cos, sin):
    """Attention of a whole sequence over itself, without a cache: RoPE (cos, sin [B, T, D/2]) then causal
    attention. q [B, T, Hq, D], k and v [B, T, Hkv, D]. Differentiable: training runs the Hydra++ layer
    through it."""
    rep = q.shape[2] // k.shape[2]
    q, k = rope_rotate(q, cos, sin).transpose(1, 2), rope_rotate(k, cos, sin).transpose(1, 2)
    k, v = k.repeat_interleave(rep, 1), v.transpose(1, 2).repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


# Dispatch: Triton on CUDA tensors when kernels.py is importable, else the references above. The kernels have
# no backward, so with grad enabled (training) the references run on the GPU too.
USE_TRITON = os.environ.get("HYDRA_LITE_TRITON", "1") != "0"
# Batch-invariant kernels (the default): every projection, the output layer and the attention of decoding and
# verification compute a token's values in the same order whatever the batch or the tree, so that greedy
# speculative decoding gives greedy decoding's output bit for bit, in bf16 too. HYDRA_LITE_EXACT=0: cuBLAS
# and the tiled attention kernels instead (outputs may part from plain decoding at near-ties).
EXACT = os.environ.get("HYDRA_LITE_EXACT", "1") != "0"
# Decoder layers as four fused matmuls (norm -> qkv -> RoPE -> cache; out + residual; norm -> gate/up -> SwiGLU;
# down + residual) and the attention, instead of ten kernels, wherever the batch-invariant kernels run (elsewhere
# the ops run one by one). On SmolLM2 (H200) 10% faster steps, 8-12% more tokens/s; HYDRA_LITE_FUSED=0: off.
# Their rounding differs from the unfused layers' (the norm's weight is folded into the projection), so their
# greedy text may part from the unfused layers' at near-ties; speculative == AR holds within each.
FUSED = os.environ.get("HYDRA_LITE_FUSED", "1") != "0"
# Draft heads' residual blocks as one matmul each, the silu and the residual add in its epilogue (linear(...,
# silu_add=True)), instead of a cuBLAS GEMM and a silu_add kernel: two launches fewer per drafting depth.
# HYDRA_LITE_FUSED_HEADS=1; off until timed on a GPU. Drafts only: the output stays the base model's either way.
FUSED_HEADS = os.environ.get("HYDRA_LITE_FUSED_HEADS", "0") == "1"
# A batched prefill pads every row to the longest prompt (on the held-out mix, 3.45x the real tokens at batch 8:
# BENCHMARKS.md run 24). With PREFILL_SKIP, the fused layers' kernels skip blocks of padding only (the live
# tokens' bits are unchanged: GPU test). Run 25 (H200, 60 held-out prompts): batch 8 +8% tokens/s speculative,
# +5% AR, every output == AR; batch 1 the same. HYDRA_LITE_PREFILL_SKIP=0 computes the padding too.
PREFILL_SKIP = os.environ.get("HYDRA_LITE_PREFILL_SKIP", "1") != "0"


def _kernels_for(x):
    return USE_TRITON and _kernels is not None and x.is_cuda


def _triton(x):
    return _kernels_for(x) and not torch.is_grad_enabled()


def _fused(x):
    """Whether the decoder layers over x run fused (FUSED: the batch-invariant kernels, inference)."""
    return FUSED and EXACT and _triton(x)


def rms_norm(x, w, eps, residual=None):
    return (_kernels.rms_norm if _triton(x) else rms_norm_ref)(x, w, eps, residual)


def swiglu(gate_up):
    return (_kernels.swiglu if _triton(gate_up) else swiglu_ref)(gate_up)


def rope_cache_write(q, k, v, cos_table, sin_table, pos, k_cache, v_cache, lens):
    fn = _kernels.rope_cache_write if _triton(q) else rope_cache_write_ref
    return fn(q, k, v, cos_table, sin_table, pos, k_cache, v_cache, lens)


def attention(q, k_cache, v_cache, lens, tree=None, live=None):
    """tree: the TreeRows that the new tokens are (verification), or None: causal (prefill, decoding). live: a
    prefill's real tokens per row (the padding's outputs may be skipped)."""
    if not _triton(q):
        return attention_ref(q, k_cache, v_cache, lens, None if tree is None else tree.mask)
    if EXACT and (tree is not None or q.shape[1] == 1):
        paths = () if tree is None else (tree.node_path, tree.node_depth)
        return _kernels.path_attention(q, k_cache, v_cache, lens, *paths)
    if EXACT:  # a prefill: tiles of tokens are fine (per-token rows), a split count that depends on the grid is not
        return _kernels.tree_attention(q, k_cache, v_cache, lens, None, num_splits=1, live=live)
    if q.shape[1] == 1:
        return _kernels.decode_attention(q, k_cache, v_cache, lens)
    return _kernels.tree_attention(q, k_cache, v_cache, lens, None if tree is None else tree.mask)


def linear(x, w, bias=None, rms_eps=None, residual=None, swiglu=False, sumsq=None, sumsq_out=False, silu_add=False,
           live=None):
    """x @ w.T (+ bias), optionally with a decoder layer's neighbours folded in (see matmul_ref): one kernel where
    it runs the batch-invariant matmul, else the ops one after another."""
    fn = _kernels.matmul if EXACT and _triton(x) else matmul_ref
    return fn(x, w, bias, rms_eps, residual, swiglu, sumsq, sumsq_out, silu_add, live)


def qkv_rope(x, w, rms_eps, cos_table, sin_table, pos, k_cache, v_cache, lens, n_heads, sumsq=None, live=None):
    fn = _kernels.qkv_rope if EXACT and _triton(x) else qkv_rope_ref
    return fn(x, w, rms_eps, cos_table, sin_table, pos, k_cache, v_cache, lens, n_heads, sumsq, live)


def kv_compact(k_all, v_all, lens, path):
    (_kernels.kv_compact if _triton(k_all) else kv_compact_ref)(k_all, v_all, lens, path)


def lm_topk(x, w, k, bias=None, vocab=None, lse=False, into=None):
    return (_kernels.lm_topk if _triton(x) else lm_topk_ref)(x, w, k, bias, vocab, lse, into)


def silu_add(res, z):
    return (_kernels.silu_add if _triton(z) else silu_add_ref)(res, z)


def head_input(h, tokens, path, embed_w):
    return (_kernels.head_input if _triton(h) else head_input_ref)(h, tokens, path, embed_w)


def greedy_path(tree_tokens, base_pred, retrieve):
    """Greedy verification's longest agreeing path: see accept_greedy_ref (retrieve [P, D1] or per row [B, P, D1])."""
    return (_kernels.accept_greedy if _triton(tree_tokens) else accept_greedy_ref)(tree_tokens, base_pred, retrieve)


# ----------------------------------------------------------------------------------------------------------
# Model


def rope_tables(cfg, max_pos, device):
    """cos/sin [max_pos, head_dim/2] in float32, with Llama-3 frequency scaling when configured."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    rs = cfg.rope_scaling
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq  # blend between the two regimes
        inv_freq = torch.where(wavelen > old_len / lo, inv_freq / factor,
                               torch.where(wavelen < old_len / hi, inv_freq, scaled))
    elif rs:
        raise HydraLiteError(f"unsupported rope_scaling {rs}")
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return freqs.cos().float().to(device), freqs.sin().float().to(device)


class Projection(nn.Module):
    """y = x @ weight.T (+ bias): every linear layer of the model and of the heads. A bias, or another weight
    format, is a change here."""

    def __init__(self, in_dim, out_dim, bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm(x [+ residual]) with a learned scale; with a residual it also returns the sum, the next residual
    stream (one kernel for the add and the norm)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, residual=None):
        return rms_norm(x, self.weight, self.eps, residual)


@dataclass
class KVCache:
    """Preallocated keys/values of n layers, k and v [n_layers, batch, max_len, n_kv_heads, head_dim]; lens[b],
    the number of valid slots of row b (slots past it hold scratch, e.g. rejected tree tokens); rope, the
    (cos, sin) tables of positions 0 .. max_len-1."""
    k: torch.Tensor
    v: torch.Tensor
    lens: torch.Tensor
    rope: tuple

    @property
    def max_len(self):
        return self.k.shape[2]

    def layer(self, i):
        """What one decoder layer reads and writes: (k_cache, v_cache, lens)."""
        return self.k[i], self.v[i], self.lens

    def first(self, batch):
        """A cache over this one's first `batch` rows: the same memory."""
        return KVCache(self.k[:, :batch], self.v[:, :batch], self.lens[:batch], self.rope)


def new_cache(cfg, n_layers, batch, max_len, device, dtype, rope=None):
    """An empty cache for n_layers layers shaped like cfg's; rope: tables to share (built for max_len if None)."""
    shape = (n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    rope = rope if rope is not None else rope_tables(cfg, max(max_len, 1), device)
    return KVCache(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(batch, dtype=torch.int32, device=device), rope)


def _tensor_key(t):
    """Identifies a tensor's current values for inference caches: storage, in-place version, dtype. (Tensors
    made under inference_mode keep no version counter; they count as never changed.)"""
    return t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype


class Block(nn.Module):
    """One Llama decoder layer with fused q/k/v and gate/up projections."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.wqkv = Projection(cfg.dim, qkv)
        self.wo = Projection(cfg.n_heads * cfg.head_dim, cfg.dim)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w13 = Projection(cfg.dim, 2 * cfg.hidden_dim)
        self.w2 = Projection(cfg.hidden_dim, cfg.dim)
        self._folded = (None, None)  # (the weights' keys, folded_weights())

    def forward(self, x, residual, rope, pos, kv=None, tree=None):
        """x: this layer's input before its norm, residual: the stream to add it to (None for the first layer).
        kv: (k_cache, v_cache, lens) of this layer, or None: causal attention over x alone (training). tree: the
        TreeRows that x's tokens are (verification), None: causal.
        Returns the attention+MLP output and the new residual, so each add fuses with the next norm."""
        h, residual = (self.attn_norm(x), x) if residual is None else self.attn_norm(x, residual)
        a = self.attend(self.wqkv(h), rope, pos, kv, tree)
        h, residual = self.ffn_norm(self.wo(a), residual)
        return self.w2(swiglu(self.w13(h))), residual

    def forward_fused(self, s, sumsq, rope, pos, kv=None, tree=None, live=None):
        """forward with the norms, SwiGLU and residual adds inside the matmuls. s: the residual stream (the sum
        so far), sumsq: the partial sums of squares of its rows that the matmul which wrote it left (None: the
        first matmul sums them). live: a prefill's real tokens per row (blocks of padding only may be skipped:
        their rows' results are unspecified). Returns the new stream and its sums of squares."""
        wqkv, w13 = self.folded_weights()
        eps = self.attn_norm.eps
        if kv is None:
            a = self.attend(linear(s, wqkv, rms_eps=eps, sumsq=sumsq), rope, pos, kv, tree)
        else:  # the projection, RoPE and the cache write in one kernel
            k_cache, v_cache, lens = kv
            q = qkv_rope(s, wqkv, eps, rope[0], rope[1], pos, k_cache, v_cache, lens, self.cfg.n_heads, sumsq, live)
            a = attention(q, k_cache, v_cache, lens, tree, live).reshape(*s.shape[:2], -1)
        s, sumsq = linear(a, self.wo.weight, residual=s, sumsq_out=True, live=live)
        h = linear(s, w13, rms_eps=self.ffn_norm.eps, swiglu=True, sumsq=sumsq, live=live)
        return linear(h, self.w2.weight, residual=s, sumsq_out=True, live=live)

    def folded_weights(self):
        """wqkv and w13 with their norms' weights folded in (fold_norm), for forward_fused: made on first use and
        kept until one of the four weights changes."""
        parts = (self.wqkv.weight, self.attn_norm.weight, self.w13.weight, self.ffn_norm.weight)
        key = tuple(_tensor_key(t) for t in parts)
        if self._folded[0] != key:
            self._folded = (key, (fold_norm(parts[0], parts[1]), fold_norm(parts[2], parts[3])))
        return self._folded[1]

    def attend(self, qkv, rope, pos, kv, tree):
        """Attention of the tokens whose q/k/v projections are qkv [B, T, ...]: over the cache (written first)
        when kv is given, else causal over these tokens. Returns [B, T, n_heads * head_dim]."""
        c = self.cfg
        B, T, _ = qkv.shape
        q, k, v = qkv.split([c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1)
        q = q.view(B, T, c.n_heads, c.head_dim)
        k = k.view(B, T, c.n_kv_heads, c.head_dim)
        v = v.view(B, T, c.n_kv_heads, c.head_dim)
        if kv is None:
            return causal_attention_ref(q, k, v, rope[0][pos], rope[1][pos]).reshape(B, T, -1)
        k_cache, v_cache, lens = kv
        q = rope_cache_write(q, k, v, rope[0], rope[1], pos, k_cache, v_cache, lens)
        return attention(q, k_cache, v_cache, lens, tree).reshape(B, T, -1)


def run_decoder(layers, x, rope, pos, kv_of, tree, norm_w, live=None):
    """x [B, T, dim] through decoder layers (layer i's (k_cache, v_cache, lens): kv_of(i); None: causal over x,
    no cache) and the norm after them (weight norm_w). Where _fused(x), the fused layers: each of their matmuls
    that writes the residual stream leaves its rows' sums of squares for the next norm (and live, a prefill's
    real tokens per row, lets them skip padding)."""
    eps = layers[0].cfg.norm_eps
    if _fused(x):
        sumsq = None
        for i, layer in enumerate(layers):
            x, sumsq = layer.forward_fused(x, sumsq, rope, pos, kv_of(i), tree, live)
        return rms_norm(x, norm_w, eps)
    residual = None
    for i, layer in enumerate(layers):
        x, residual = layer(x, residual, rope, pos, kv_of(i), tree)
    return rms_norm(x, norm_w, eps, residual)[0]


class Llama(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.Parameter(torch.ones(cfg.dim))
        self.lm_head = None if cfg.tie_embeddings else Projection(cfg.dim, cfg.vocab_size)

    @property
    def output_weight(self):
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self, batch, max_len=None):
        p = self.embed.weight
        return new_cache(self.cfg, self.cfg.n_layers, batch, max_len or self.cfg.max_seq_len, p.device, p.dtype)

    def forward(self, tokens, cache, pos=None, tree=None, live=None):
        """tokens [B, T] -> last hidden states [B, T, dim] after the final norm. Writes the tokens' keys/values
        at slots lens[b] + t; the caller advances cache.lens (or compacts, for a tree). pos [B, T]: RoPE
        positions (default lens[b] + t); tree: the TreeRows the tokens are, which new tokens see which (default
        causal); live: int32 [B], a prefill's real tokens per row (the rest is padding, whose hidden states and
        cache slots may be left unwritten)."""
        B, T = tokens.shape
        if pos is None:
            pos = cache.lens[:, None].long() + torch.arange(T, device=tokens.device)
        return run_decoder(self.layers, self.embed(tokens), cache.rope, pos, cache.layer, tree, self.norm, live)

    def logits(self, h):
        return linear(h, self.output_weight)

    @torch.no_grad()
    def forward_logits(self, tokens):
        """Full-sequence logits without a persistent cache (for tests and scoring)."""
        cache = self.new_cache(tokens.shape[0], tokens.shape[1])
        return self.logits(self(tokens, cache)).float()


# Tensor names in checkpoint files (FORMAT.md) keep the names of the first format; here a projection holds its
# weight and bias together. file_name maps a parameter's name here to its name in the files, for both models
# and heads: the first matching suffix is replaced.
_FILE_SUFFIXES = ((".w.weight", ".w"), (".w.bias", ".b"), (".res.weight", ".res_w"), (".res.bias", ".res_b"),
                  (".lm.weight", ".lm_w"), (".lm.bias", ".lm_b"), ("prefix_norm", "prefix.norm"), (".weight", ""))


def file_name(param_name):
    for suffix, in_file in _FILE_SUFFIXES:
        if param_name.endswith(suffix):
            return param_name[:-len(suffix)] + in_file
    return param_name


def load_safetensors(paths):
    from safetensors.torch import load_file

    state = {}
    for p in paths:
        try:
            state.update(load_file(p))
        except Exception as e:  # (SafetensorError, OSError, ...: a damaged or truncated file)
            why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise HydraLiteError(f"{p} cannot be read as safetensors ({why}); convert it again") from None
    return state


def check_files(directory, meta):
    """The files a checkpoint or heads directory lists in its JSON ("files": name -> {"bytes": n}) are there,
    with their sizes (a copy cut short, a file from another model)."""
    for name, info in (meta.get("files") or {}).items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise HydraLiteError(f"{path} is missing; convert the checkpoint again")
        if isinstance(info, dict) and "bytes" in info and os.path.getsize(path) != info["bytes"]:
            raise HydraLiteError(f"{path} has {os.path.getsize(path)} bytes, not the {info['bytes']} its checkpoint "
                                 f"lists; convert it again")


def shard_files(directory, stem):
    """stem.safetensors, or stem-00001-of-0000N.safetensors shards."""
    single = os.path.join(directory, stem + ".safetensors")
    if os.path.exists(single):
        return [single]
    shards = sorted(f for f in os.listdir(directory) if f.startswith(stem + "-") and f.endswith(".safetensors"))
    if not shards:
        raise HydraLiteError(f"no {stem}.safetensors in {directory}")
    return [os.path.join(directory, f) for f in shards]


def load_state(module, state, what, convert=lambda t: t):
    """Strict load of the file tensors `state` (file names) into module, each through convert; an error names
    the tensor."""
    expected = {k: (file_name(k), t) for k, t in module.state_dict().items()}
    for in_file, t in expected.values():
        if in_file not in state:
            raise HydraLiteError(f"{what}: missing tensor {in_file}")
        if tuple(state[in_file].shape) != tuple(t.shape):
            raise HydraLiteError(f"{what}: tensor {in_file} has shape {tuple(state[in_file].shape)}, expected {tuple(t.shape)}")
    extra = sorted(set(state) - {in_file for in_file, _ in expected.values()})
    if extra:
        raise HydraLiteError(f"{what}: unexpected tensors {extra[:5]}")
    module.load_state_dict({name: convert(state[in_file]) for name, (in_file, _) in expected.items()})


def load_model(path, device="cpu", dtype=None):
    """Load a runtime checkpoint directory (see FORMAT.md; make one with convert.py)."""
    if not os.path.isdir(path):
        raise HydraLiteError(f"checkpoint {path} not found; make one with: python convert.py smollm2  (or convert.py HF_DIR)")
    meta = read_json(os.path.join(path, "config.json"))
    cfg = Config.from_dict(meta)
    check_files(path, meta)
    dtype = dtype or getattr(torch, cfg.dtype)
    with torch.device("meta"):
        model = Llama(cfg)
    model = model.to_empty(device="cpu")
    load_state(model, load_safetensors(shard_files(path, "model")), path, lambda t: t.to(dtype))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer and chat templates (no jinja: the common template families are written out here)

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")


class Tokenizer:
    """Text <-> token ids with the checkpoint's tokenizer.json (Hugging Face tokenizers) or tokenizer.model
    (sentencepiece), and the chat template its config names."""

    def __init__(self, path, cfg: Config):
        self.cfg = cfg
        self.hf_tokenizer = self.sentencepiece = None  # exactly one is set
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            from tokenizers import Tokenizer as HFTokenizer

            self.hf_tokenizer = HFTokenizer.from_file(os.path.join(path, "tokenizer.json"))
        elif os.path.exists(os.path.join(path, "tokenizer.model")):
            import sentencepiece

            self.sentencepiece = sentencepiece.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
        else:
            raise HydraLiteError(f"no tokenizer.json or tokenizer.model in {path}")

    def encode(self, text, bos=None, special=False):
        """text -> ids (with BOS per the config, or as bos says). Control tokens written in the text (such as
        "<|im_end|>") stay text unless special=True: user text cannot open a new chat turn."""
        if self.hf_tokenizer:
            self.hf_tokenizer.encode_special_tokens = not special
            ids = self.hf_tokenizer.encode(text, add_special_tokens=False).ids
        else:  # (sentencepiece never reads control tokens from text)
            ids = self.sentencepiece.encode(text)
        bos = self.cfg.add_bos if bos is None else bos
        return ([self.cfg.bos_id] if bos and self.cfg.bos_id is not None else []) + ids

    def encode_parts(self, parts, bos=None):
        """[(text, is_template), ...] -> ids: control tokens parsed in the template's text only, a message's text
        kept as text; BOS (per bos) once, first."""
        ids = []
        for i, (text, template) in enumerate(p for p in parts if p[0]):
            ids += self.encode(text, bos=bos if i == 0 else False, special=template)
        return ids

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.hf_tokenizer:
            return self.hf_tokenizer.decode(ids, skip_special_tokens=True)
        return self.sentencepiece.decode(ids)

    def encode_chat(self, messages, add_generation_prompt=True):
        """messages: [{"role": "system"|"user"|"assistant", "content": str}] -> token ids."""
        family, system = self.cfg.chat_template, self.cfg.default_system
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        turns = ([("system", system)] if system else []) + [(m["role"], m["content"]) for m in messages]
        if family == "chatml":  # (text, is_template): control tokens only from the template
            parts = [p for role, content in turns
                     for p in ((f"<|im_start|>{role}\n", True), (content, False), ("<|im_end|>\n", True))]
            return self.encode_parts(parts + [("<|im_start|>assistant\n" if add_generation_prompt else "", True)])
        if family == "llama3":
            header = "<|start_header_id|>{}<|end_header_id|>\n\n"
            parts = [("<|begin_of_text|>", True)] + [
                p for role, content in turns
                for p in ((header.format(role), True), (content.strip(), False), ("<|eot_id|>", True))]
            end = "<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else ""
            return self.encode_parts(parts + [(end, True)], bos=False)
        if family == "llama2":  # BOS/EOS around each exchange, as ids so sentencepiece models work too
            ids, sys_text = [], f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
            for i in range(0, len(messages), 2):
                user = (sys_text if i == 0 else "") + messages[i]["content"]
                ids += self.encode(f"[INST] {user.strip()} [/INST]", bos=True)
                if i + 1 < len(messages):
                    ids += self.encode(" " + messages[i + 1]["content"].strip(), bos=False) + self.cfg.eos_ids[:1]
            return ids
        if family == "vicuna":
            ids = self.encode((system or VICUNA_SYSTEM) + " ", bos=True)
            for m in messages:
                if m["role"] == "user":
                    ids += self.encode(f"USER: {m['content']} ", bos=False)
                else:
                    ids += self.encode(f"ASSISTANT: {m['content']}", bos=False) + self.cfg.eos_ids[:1]
            return ids + (self.encode("ASSISTANT:", bos=False) if add_generation_prompt else [])
        return self.encode("\n".join(m["content"] for m in messages))


    def encode_next_turn(self, content):
        """The tokens that follow a generated answer for one more user message: the end of the assistant's turn,
        the user's turn, the generation prompt (chatml and llama3; None for other templates, which re-encode the
        whole conversation)."""
        if self.cfg.chat_template == "chatml":
            return self.encode_parts([("<|im_end|>\n<|im_start|>user\n", True), (content, False),
                                      ("<|im_end|>\n<|im_start|>assistant\n", True)], bos=False)
        if self.cfg.chat_template == "llama3":
            header = "<|start_header_id|>{}<|end_header_id|>\n\n"
            return self.encode_parts([("<|eot_id|>" + header.format("user"), True), (content.strip(), False),
                                      ("<|eot_id|>" + header.format("assistant"), True)], bos=False)
        return None


class TextStream:
    """Turns a growing token list into printable text increments (holds back split UTF-8 characters)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0

    def push(self, ids):
        self.ids += list(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new


# ----------------------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    # --acceptance typical only (Medusa/Hydra's typical acceptance): a drafted token is accepted when the base
    # model gives it probability above min(typical_threshold, typical_alpha * exp(-entropy))
    typical_threshold: float = 0.09
    typical_alpha: float = 0.3


def sampling_logits(logits, sp: SamplingParams):
    """The logits [..., V] that sampling draws from (float32): scaled by the temperature, top-k and top-p
    applied. Speculative sampling verifies against the same distribution."""
    logits = logits.float() / sp.temperature
    if sp.top_k > 0:
        kth = logits.topk(min(sp.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sp.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > sp.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def draw(probs, generator=None):
    """One token per row of probs [..., V] (need not sum to 1). An exponential race (= a multinomial draw)
    with no host sync, so it can run inside a CUDA graph."""
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(-1)


def sample(logits, sp: SamplingParams, generator=None):
    """logits [B, V] -> tokens [B]."""
    if sp.temperature <= 0:
        return logits.argmax(-1)
    return draw(sampling_logits(logits, sp).softmax(-1), generator)


# ----------------------------------------------------------------------------------------------------------
# Draft heads (Medusa, Hydra, Hydra++)


class ResBlock(nn.Module):
    """y = res(x) + silu(w(x)); res is the identity, or a projection when x is wider (grounded heads)."""

    def __init__(self, dim, in_dim):
        super().__init__()
        self.w = Projection(in_dim, dim, bias=True)
        self.res = Projection(in_dim, dim, bias=True) if in_dim != dim else None
        self._fused = (None, None)  # (key, (weight, bias)): both projections stacked, for inference

    def forward(self, x):
        if torch.is_grad_enabled():  # training: the parameters as they are
            return silu_add(x if self.res is None else self.res(x), self.w(x))
        if FUSED_HEADS:  # one kernel: r + silu(z) in the matmul's epilogue
            return linear(x, *self.stacked(), silu_add=True)
        if self.res is None:
            return silu_add(x, self.w(x))
        y = F.linear(x, *self.stacked())  # one GEMM instead of two
        dim = self.w.weight.shape[0]
        return silu_add(y[..., :dim], y[..., dim:])

    def stacked(self):
        """(weight, bias) of res and w stacked ([2 dim, in], [2 dim]), for inference, cached until they change. With
        no res projection (x already dim wide) its part is the identity: x @ I.T gives x exactly (one product of
        1.0 per output, the rest zeros), so r + silu(z) stays x + silu(z)."""
        w, b, res = self.w.weight, self.w.bias, self.res
        key = tuple(_tensor_key(p) for p in (w, b) + (() if res is None else (res.weight, res.bias)))  # rebuilt if changed
        if self._fused[0] != key:
            res_w, res_b = (torch.eye(w.shape[0], dtype=w.dtype, device=w.device), torch.zeros_like(b)) if res is None \
                else (res.weight, res.bias)
            self._fused = (key, (torch.cat([res_w, w]), torch.cat([res_b, b])))
        return self._fused[1]


class Head(nn.Module):
    def __init__(self, dim, in_dim, n_layers, vocab_size, own_lm, lm_bias):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(dim, in_dim if j == 0 else dim) for j in range(n_layers))
        self.lm = Projection(dim, vocab_size, bias=lm_bias) if own_lm else None  # None: the base model's

    def features(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x, base_lm_w):
        return F.linear(self.features(x), *self.output_weights(base_lm_w))

    def output_weights(self, base_lm_w):
        """(weight, bias) of this head's output projection."""
        return (base_lm_w, None) if self.lm is None else (self.lm.weight, self.lm.bias)


@dataclass
class HeadsConfig:
    n_heads: int
    n_layers: int
    dim: int
    vocab_size: int
    grounded: bool
    prefix: bool
    lm_head: str = "own"
    lm_bias: bool = False
    kind: str = ""
    source: str = ""
    draft_vocab: int = 0  # > 0: heads propose only these many tokens (ids in the "vocab" tensor); 0: all

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise HydraLiteError("heads.json must hold a JSON object")
        missing = [k for k in ("n_heads", "n_layers", "dim", "vocab_size", "grounded", "prefix") if k not in d]
        if missing:
            raise HydraLiteError(f"heads.json is missing {missing}")
        hc = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        for name in ("n_heads", "n_layers", "dim", "vocab_size"):
            check_int(f"heads.json {name}", getattr(hc, name), 1)
        check_int("heads.json draft_vocab", hc.draft_vocab, 0, hc.vocab_size)
        return hc


class DraftHeads(nn.Module):
    """Head k predicts the token k+2 places after its hidden state h. Medusa: head k sees h. Hydra (grounded):
    head k sees concat(h, embed(t_0..t_k)), t_0 the base model's token and t_1..t_k the drafted ones.
    Hydra++ (prefix): h first goes through one extra decoder layer with its own KV cache."""

    def __init__(self, hc: HeadsConfig, base_cfg: Config):
        super().__init__()
        self.hc = hc
        if hc.dim != base_cfg.dim or hc.vocab_size != base_cfg.vocab_size:
            raise HydraLiteError(f"heads are for dim={hc.dim}, vocab={hc.vocab_size}; "
                                 f"base has dim={base_cfg.dim}, vocab={base_cfg.vocab_size}")
        if hc.lm_bias and hc.lm_head != "own":
            raise HydraLiteError("heads with lm_bias need their own output projection (lm_head: own)")
        self.heads = nn.ModuleList(
            Head(hc.dim, (k + 2) * hc.dim if hc.grounded else hc.dim, hc.n_layers, hc.vocab_size, hc.lm_head == "own", hc.lm_bias)
            for k in range(hc.n_heads))
        if hc.prefix:
            self.prefix = Block(base_cfg)
            self.prefix_norm = nn.Parameter(torch.ones(hc.dim))
        else:
            self.prefix = None
        # A draft vocabulary (the tokens the base model actually writes) makes each head's output projection
        # and top-k several times cheaper; the verifier still sees the full vocabulary.
        self.register_buffer("vocab", torch.zeros(hc.draft_vocab, dtype=torch.long) if hc.draft_vocab else None)
        self._cut = {}
        self.tree_choices = None  # the tree these heads were fitted with (load_heads reads tree.json), if any
        self.context_tree = None  # the tree to use beside context drafts (tree_context.json), if it differs
        self.rank_acc = None  # [head][rank]: how often that rank is right on held-out answers (train.json), if known

    def proposal_weights(self, d, base_lm_w, cached=True):
        """Head d's output projection (weight, bias), cut to the draft vocabulary when there is one. The cut is
        cached for inference; cached=False (training) cuts afresh, so gradients flow through it."""
        w, b = self.heads[d].output_weights(base_lm_w)
        if self.vocab is None:
            return w, b
        if not cached:
            return w[self.vocab], None if b is None else b[self.vocab]
        slot = (w.data_ptr(), None if b is None else b.data_ptr())  # heads on the base lm share one
        key = tuple(None if t is None else _tensor_key(t) for t in (w, b))  # rebuilt if the values changed
        if self._cut.get(slot, (None,))[0] != key:
            self._cut[slot] = (key, (w[self.vocab].contiguous(), None if b is None else b[self.vocab].contiguous()))
        return self._cut[slot][1]

    def propose(self, d, x, base_lm_w, k, into=None):
        """Head d's k best tokens (ids in the full vocabulary) after inputs x [..., in_dim] -> [..., k]; into: also
        written into the tree's tokens (see lm_topk_ref)."""
        w, b = self.proposal_weights(d, base_lm_w)
        return lm_topk(self.heads[d].features(x), w, k, b, self.vocab, into=into)[1]

    def propose_scored(self, d, x, base_lm_w, k):
        """Head d's k best tokens after x, with their log-probabilities (over the draft vocabulary): ([..., k],
        [..., k]), best first."""
        w, b = self.proposal_weights(d, base_lm_w)
        values, ids, lse = lm_topk(self.heads[d].features(x), w, k, b, self.vocab, lse=True)
        return values - lse[..., None], ids

    def run_prefix(self, h, rope, cache=None, pos=None):
        """Hydra++: the extra decoder layer over base hidden states h [B, T, dim]. With a cache it writes the
        cache like the base model (the caller advances cache.lens); without one it is causal over h alone
        (training, differentiable)."""
        B, T, _ = h.shape
        if pos is None:
            start = cache.lens[:, None].long() if cache is not None else torch.zeros(B, 1, dtype=torch.long, device=h.device)
            pos = start + torch.arange(T, device=h.device)
        kv = cache.layer(0) if cache is not None else None
        return run_decoder([self.prefix], h, rope, pos, lambda i: kv, None, self.prefix_norm)


def load_heads(path, base: Llama):
    if not os.path.isdir(path):
        raise HydraLiteError(f"heads {path} not found (train some with train_heads.py, or convert with convert.py --heads)")
    meta = read_json(os.path.join(path, "heads.json"))
    hc = HeadsConfig.from_dict(meta)
    check_files(path, meta)
    with torch.device("meta"):
        heads = DraftHeads(hc, base.cfg)
    p = base.embed.weight
    heads = heads.to_empty(device="cpu")
    load_state(heads, load_safetensors(shard_files(path, "heads")), path,
               lambda t: t.to(p.dtype) if t.is_floating_point() else t.long())
    if heads.vocab is not None and (heads.vocab.min() < 0 or heads.vocab.max() >= base.cfg.vocab_size):
        raise HydraLiteError(f"heads {path}: draft vocabulary has ids outside the base vocabulary of {base.cfg.vocab_size}")
    heads = heads.to(device=p.device, dtype=p.dtype).eval().requires_grad_(False)
    tree_path, train_path = os.path.join(path, "tree.json"), os.path.join(path, "train.json")
    heads.tree_choices = read_json(tree_path) if os.path.exists(tree_path) else None
    context_path = os.path.join(path, "tree_context.json")
    heads.context_tree = read_json(context_path) if os.path.exists(context_path) else None
    heads.rank_acc = read_json(train_path).get("held_out_rank_acc") if os.path.exists(train_path) else None
    return heads


def save_heads(heads: DraftHeads, path, base_cfg: Optional[Config] = None, extra=None, shard_mb=15):
    """Write heads in the runtime format (FORMAT.md), in shards of at most shard_mb MB, with extra JSON files
    ({name: object}, e.g. tree.json), all or nothing: into a fresh directory beside path that replaces it once
    complete. base_cfg: the model they were trained for (its shape goes into heads.json, "base")."""
    from safetensors.torch import save_file

    state = {file_name(k): v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    shards, size = [{}], 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > shard_mb * 1e6:
            shards.append({})
            size = 0
        shards[-1][k], size = v, size + nbytes
    meta = {"format": "hydra-lite-heads/1", **heads.hc.__dict__}
    if base_cfg is not None:
        meta["base"] = {k: getattr(base_cfg, k) for k in BASE_SHAPE}

    def write(directory):
        for i, shard in enumerate(shards):
            name = "heads.safetensors" if len(shards) == 1 else f"heads-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(directory, name))
        for name, obj in {"heads.json": meta, **(extra or {})}.items():
            with open(os.path.join(directory, name), "w") as f:
                json.dump(obj, f, indent=1)

    write_dir_atomically(path, write)


BASE_SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")  # heads.json "base"


def write_dir_atomically(path, write):
    """write(directory) fills a fresh directory beside path, which then takes path's place: the old directory
    stays whole until the new one is complete, and none of its files survive into the new one."""
    import shutil
    import tempfile

    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-{os.getpid()}-", dir=os.path.dirname(path))
    try:
        write(tmp)
        if os.path.isdir(path):
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomically(path, obj):
    """A JSON file written whole or not at all (a temp file beside it, renamed over it)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------
# Trees. Tree choices: each entry is a path of top-k ranks from the root (the base model's own next token);
# [0, 1] is "head 0's best token, then head 1's second best after it".


def grow_tree(child_chances, size):
    """The `size` paths with the highest chance of being accepted, grown best-first from the root.
    child_chances(path) lists the chance that each rank (index) is right at the next depth, given that the path
    is; [] where the path cannot grow. A path's chance is the product along it and never grows with depth, so
    growing from the best frontier node first finds the best tree. Returns (paths sorted by depth, then ranks;
    the expected acceptance length: 1 + the sum of the chances)."""
    frontier = [(-p, [r], p) for r, p in enumerate(child_chances([]))]
    heapq.heapify(frontier)
    chosen, expected = [], 1.0
    while frontier and len(chosen) < size:
        _, path, p = heapq.heappop(frontier)
        chosen.append(path)
        expected += p
        for r, q in enumerate(child_chances(path)):
            heapq.heappush(frontier, (-p * q, path + [r], p * q))
    return sorted(chosen, key=lambda c: (len(c), c)), expected


def build_tree(rank_acc, size=63):
    """The best tree of `size` paths when rank_acc[d][r], how often head d's rank-r token is the right one when
    the path before it is right, holds independently of the path."""
    return grow_tree(lambda path: rank_acc[len(path)] if len(path) < len(rank_acc) else [], size)[0]


def assumed_rank_chance(r):
    """For heads with unknown accuracies: how often their rank-r token is right, at any depth."""
    return 0.75 / (r + 1)


def default_tree(size=63, depth=4, top=10):
    """A tree for heads with unknown accuracies (assumed_rank_chance)."""
    return build_tree([[assumed_rank_chance(r) for r in range(top)] for _ in range(depth)], size)


MAX_TREE_NODES, MAX_TREE_RANK, MAX_CONTEXT_DRAFTS = 512, 64, 64


def check_tree_choices(choices):
    """Tree choices as given by a user (JSON): a list of paths, each a non-empty list of ranks 0 .. MAX_TREE_RANK-1,
    at most MAX_TREE_NODES of them. Returns them as lists; a HydraLiteError says what is wrong."""
    example = "give a list of rank paths such as [[0],[1],[0,0]]"
    if not isinstance(choices, list) or not all(isinstance(c, list) and c for c in choices):
        raise HydraLiteError(f"tree choices must be a list of non-empty lists of ranks, not {str(choices)[:60]}; {example}")
    if len(choices) > MAX_TREE_NODES:
        raise HydraLiteError(f"tree has {len(choices)} choices; at most {MAX_TREE_NODES}")
    for c in choices:
        if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < MAX_TREE_RANK for r in c):
            raise HydraLiteError(f"tree choice {c}: ranks are integers from 0 to {MAX_TREE_RANK - 1}; {example}")
    return [list(c) for c in choices]


class Tree:
    """Static buffers for a tree of draft tokens. Node 0 is the root (the base model's own next token); nodes
    1 .. len(choices) are the heads' choices, sorted by depth, then ranks; with context=K, the last K nodes are
    a chain under the root, filled from the context (ContextDrafts)."""

    def __init__(self, choices, device="cpu", context=0):
        choices = sorted(check_tree_choices(choices), key=lambda p: (len(p), p))
        check_int("context drafts", context, 0, MAX_CONTEXT_DRAFTS)
        if not choices and not context:
            raise HydraLiteError("tree needs at least one choice")
        index = {(): 0}
        for i, c in enumerate(choices):
            if tuple(c[:-1]) not in index:
                raise HydraLiteError(f"tree choice {c} has no parent {c[:-1]} in the tree")
            if tuple(c) in index:
                raise HydraLiteError(f"tree choice {c} appears twice")
            index[tuple(c)] = i + 1
        first = len(choices) + 1  # the context chain's first node
        chain_parents = ([0] + list(range(first, first + context - 1)))[:context]  # the root, then each the last
        parent = [0] + [index[tuple(c[:-1])] for c in choices] + chain_parents
        depth = [0] + [len(c) for c in choices] + list(range(1, context + 1))
        self.choices, self.context, self.size, self.depth = choices, context, len(parent), max(depth)
        self.context_nodes = torch.arange(first, self.size, device=device)
        chains = [ancestry(parent, i) for i in range(self.size)]  # each node's path from the root
        mask = torch.zeros(self.size, self.size, dtype=torch.bool)
        node_path = torch.zeros(self.size, self.depth + 1, dtype=torch.long)
        for i, chain in enumerate(chains):
            mask[i, chain] = True  # a node sees itself and its ancestors
            node_path[i, :len(chain)] = torch.tensor(chain)
        leaves = [chains[i] for i in range(self.size) if i not in parent[1:]] or [[0]]
        retrieve = torch.full((len(leaves), self.depth + 1), -1, dtype=torch.long)
        for p, nodes in enumerate(leaves):
            retrieve[p, :len(nodes)] = torch.tensor(nodes)
        self.levels = head_levels(choices, parent, node_path, device)
        # Sampling (accept_exact): each node's earlier siblings (they are tried first) and each node's children.
        earlier = torch.zeros(self.size, self.size, dtype=torch.bool)
        children = torch.zeros(self.size, self.size, dtype=torch.bool)
        for j in range(1, self.size):
            children[parent[j], j] = True
            for i in range(1, j):
                earlier[j, i] = parent[i] == parent[j]  # nodes are sorted by (depth, ranks): i ranks before j
        self.earlier_siblings, self.children = earlier.to(device), children.to(device)
        self.node_path = node_path.to(device)
        self.mask, self.retrieve = mask.to(device), retrieve.to(device)
        self.parent = torch.tensor(parent, device=device)
        self.node_depth = torch.tensor(depth, device=device)

    def rows(self, batch):
        """This tree for every row of a batch: views, no copies."""
        return TreeRows(self.parent.expand(batch, -1), self.node_depth.expand(batch, -1),
                        self.mask.expand(batch, -1, -1), self.retrieve.expand(batch, -1, -1),
                        self.earlier_siblings.expand(batch, -1, -1), self.children.expand(batch, -1, -1),
                        self.node_path.expand(batch, -1, -1))


@dataclass
class TreeRows:
    """The tree verified at one step, row by row (a static Tree's views, or a DynamicTree's own per step): each
    node's parent and depth [B, T] (the root is its own parent), the attention mask [B, T, T] (a node sees
    itself and its ancestors) and paths [B, P, depth+1] (node indices from the root, -1 padded), among which
    acceptance picks the longest agreeing one. For sampling (accept_exact): earlier_siblings [B, T, T] ([b, j, i]:
    node i has node j's parent and is tried before it) and children [B, T, T] ([b, i, j]: j is a child of i),
    derived from the parents unless given."""
    parent: torch.Tensor
    node_depth: torch.Tensor
    mask: torch.Tensor
    retrieve: torch.Tensor
    given_earlier: Optional[torch.Tensor] = None
    given_children: Optional[torch.Tensor] = None
    given_path: Optional[torch.Tensor] = None

    def rows(self, batch):
        return self

    @property
    def node_path(self):
        """[B, T, D1]: each node's path, its tree indices from the root to itself (padded past its depth)."""
        if self.given_path is None:  # (trees made by hand in tests: walk up from every node)
            cols = [torch.arange(self.parent.shape[1], device=self.parent.device).expand_as(self.parent)]
            for _ in range(int(self.node_depth.max())):
                cols.append(self.parent.gather(1, cols[-1]))
            up = torch.stack(cols, -1)  # [B, T, depth+1]: the node, its parent, ... (the root repeats)
            j = (self.node_depth[..., None] - torch.arange(up.shape[-1], device=up.device)).clamp(min=0)
            self.given_path = up.gather(2, j)
        return self.given_path

    @property
    def earlier_siblings(self):
        if self.given_earlier is None:  # siblings are tried in node order (a dynamic tree's are in score order)
            T = self.parent.shape[1]
            j = torch.arange(T, device=self.parent.device)
            before = (j[None, :] < j[:, None]) & (j[None, :] > 0)  # [j, i]: i before j, not the root
            self.given_earlier = (self.parent[:, :, None] == self.parent[:, None, :]) & before
        return self.given_earlier

    @property
    def children(self):
        if self.given_children is None:
            T = self.parent.shape[1]
            j = torch.arange(T, device=self.parent.device)
            self.given_children = (self.parent[:, None, :] == j[None, :, None]) & (j > 0)
        return self.given_children


def ancestry(parent, i):
    """The nodes from the root to node i."""
    chain = [i]
    while chain[-1] != 0:
        chain.append(parent[chain[-1]])
    return chain[::-1]


def head_levels(choices, parent, node_path, device):
    """Per depth d >= 1 of the heads' choices (node i is choice i-1): the nodes there and the rank each takes,
    node_of [parent slot, rank] (the node that a parent's rank fills, -1: none; parents: the depth d-1 nodes
    that have children), and each parent's path from the root (the tokens grounded heads read)."""
    levels = []
    for d in range(1, max((len(c) for c in choices), default=0) + 1):
        nodes = [i + 1 for i, c in enumerate(choices) if len(c) == d]
        parents = sorted({parent[i] for i in nodes})
        ranks = [choices[i - 1][-1] for i in nodes]
        node_of = torch.full((len(parents), max(ranks) + 1), -1, dtype=torch.long)  # [parent slot, rank] -> node
        for i, r in zip(nodes, ranks):
            node_of[parents.index(parent[i]), r] = i
        levels.append(dict(
            nodes=torch.tensor(nodes, device=device), parents=torch.tensor(parents, device=device),
            rank=torch.tensor(ranks, device=device), node_of=node_of.to(device), k=max(ranks) + 1,
            path=node_path[parents, :d].to(device)))
    return levels


class DynamicTree:
    """A draft tree grown anew at every step, per row (as EAGLE-2 grows its trees): the root's `top` best
    children; then, depth by depth, the `width` candidates of the last depth with the highest cumulative draft
    log-probability each get their `top` best children (HeadDrafts.grow); of all the candidates, the `nodes`
    most likely are verified. A context chain of `context` tokens hangs under the root, as in Tree. Node order:
    0 the root, 1 .. nodes the chosen candidates (parents before children, siblings in score order), then the
    chain. Static shapes throughout: it runs inside a CUDA graph."""

    def __init__(self, nodes, depth, width, top, device="cpu", context=0):
        check_int("dynamic tree nodes", nodes, 1, MAX_TREE_NODES)
        check_int("dynamic tree depth", depth, 1)
        check_int("dynamic tree width", width, 1, MAX_TREE_RANK)
        check_int("dynamic tree top", top, 1, MAX_TREE_RANK)
        check_int("context drafts", context, 0, MAX_CONTEXT_DRAFTS)
        self.widths = [1]  # frontier nodes expanded at each depth: the root, then the best `width` (or all)
        for _ in range(1, depth):
            self.widths.append(min(width, self.widths[-1] * top))
        self.candidates = top * sum(self.widths)  # the root's children, then width * top per later depth
        if nodes > self.candidates:
            raise HydraLiteError(f"dynamic tree of {nodes} nodes from only {self.candidates} candidates")
        self.nodes, self.top, self.context = nodes, top, context
        self.size, self.depth = 1 + nodes + context, max(depth, context)
        self.context_nodes = torch.arange(1 + nodes, self.size, device=device)
        # each candidate's depth (index 0: the root), in the order grow() makes them
        self.cand_depth = torch.tensor([0] + [d + 1 for d, w in enumerate(self.widths) for _ in range(w * top)],
                                       device=device)
        self.chain = Tree([], device, context) if context else None  # the chain's own structure, nodes 1 ..
        self._templates = {}  # batch size -> the step buffers' starting values

    def rows(self, batch):
        """Per-row buffers for one step: the root and the context chain set, the heads' nodes for grow() to fill
        (copies of a template made once per batch size: a few copies per step, not a kernel per chain node)."""
        if batch not in self._templates:
            self._templates[batch] = self._template(batch)
        parent, depth, mask, retrieve = (t.clone() for t in self._templates[batch])
        return TreeRows(parent, depth, mask, retrieve, given_path=retrieve)  # (row t of retrieve is node t's path)

    def _template(self, batch):
        T, D1, dev = self.size, self.depth + 1, self.context_nodes.device
        parent = torch.zeros(batch, T, dtype=torch.long, device=dev)
        depth = torch.zeros(batch, T, dtype=torch.long, device=dev)
        retrieve = torch.full((batch, T, D1), -1, dtype=torch.long, device=dev)
        retrieve[:, 0, 0] = 0
        if self.chain is not None:
            first = 1 + self.nodes  # the chain's node i (1 ..) is node first + i - 1 here
            shift = lambda x: torch.where(x > 0, x + first - 1, x)
            parent[:, first:] = shift(self.chain.parent[1:])
            depth[:, first:] = self.chain.node_depth[1:]
            chain_paths = self.chain.retrieve[0]  # one path: the root, then the chain
            for i in range(self.context):
                retrieve[:, first + i, :i + 2] = shift(chain_paths[:i + 2])
        mask = torch.zeros(batch, T, T, dtype=torch.bool, device=dev)
        mask.scatter_(2, retrieve.clamp(min=0), True)  # (-1 padding lands on the root, which all nodes see)
        return parent, depth, mask, retrieve


# ----------------------------------------------------------------------------------------------------------
# Drafting: where a tree's tokens come from. A draft source fills the tree nodes it owns; draft() runs them all.


@dataclass
class DraftInput:
    """What draft sources read at one step."""
    root: torch.Tensor  # [B] the base model's next token: node 0 of the tree
    h: torch.Tensor  # [B, dim] the hidden state after which root comes (Hydra++: the extra layer's output)
    history: Optional[torch.Tensor] = None  # [B, S] each row's tokens so far (prompt, answer), the root at lens[b]
    lens: Optional[torch.Tensor] = None  # [B] the root's position in history


class HeadDrafts:
    """Tokens from draft heads. Medusa: a node takes its rank of its depth's head, which reads h alone. Hydra:
    depth by depth, each head conditioned on its path's tokens."""

    def __init__(self, heads: DraftHeads, base: Llama):
        self.heads, self.base = heads, base

    def fill(self, tokens, rows, tree, inp: DraftInput):
        if isinstance(tree, DynamicTree):
            return self.grow(tokens, rows, tree, inp)
        lm_w = self.base.output_weight
        for d, lv in enumerate(tree.levels):  # each depth's proposals go straight into its nodes
            if not self.heads.hc.grounded:  # Medusa: one set of proposals, from h alone, for every parent
                tokens[:, lv["nodes"]] = self.heads.propose(d, inp.h, lm_w, lv["k"])[:, lv["rank"]]
                continue
            x = head_input(inp.h, tokens, lv["path"], self.base.embed.weight)  # [B, n_par, (d+2)*dim]: h, root .. parent
            self.heads.propose(d, x, lm_w, lv["k"], into=(tokens, lv["node_of"]))

    def grow(self, tokens, rows, tree, inp: DraftInput):
        """A DynamicTree's head nodes, per row: candidates depth by depth (a table per row: index 0 the root, then
        each depth's in order; a candidate's chain is its table indices from the root, -1 padded), then the
        tree.nodes most likely of them, written into tokens and rows."""
        B, D1, top = inp.root.shape[0], len(tree.widths) + 1, tree.top
        dev, lm_w = inp.root.device, self.base.output_weight
        table = inp.root[:, None]  # [B, 1 + candidates so far]: their tokens
        score = torch.zeros(B, 1, device=dev)  # cumulative draft log-probability
        parent = torch.zeros(B, 1, dtype=torch.long, device=dev)
        chain = torch.full((B, 1, D1), -1, dtype=torch.long, device=dev)
        chain[:, :, 0] = 0
        start = 0  # the last depth's first table index
        for d, width in enumerate(tree.widths):
            front = score[:, start:].topk(width, dim=1).indices + start  # [B, W]: the best of the last depth
            front_chain = chain.gather(1, front[:, :, None].expand(B, width, D1))
            if self.heads.hc.grounded:  # head d reads h and the tokens from the root to the frontier node
                x = head_input(inp.h, table, front_chain[:, :, :d + 1], self.base.embed.weight)
                logp, ids = self.heads.propose_scored(d, x, lm_w, top)  # [B, W, top]
            else:  # Medusa: the same proposals after every frontier node
                logp, ids = (t[:, None].expand(B, width, top) for t in self.heads.propose_scored(d, inp.h, lm_w, top))
            new = table.shape[1] + torch.arange(width * top, device=dev).view(1, width, top)
            child_chain = front_chain[:, :, None, :].repeat(1, 1, top, 1)
            child_chain[..., d + 1] = new
            start = table.shape[1]
            table = torch.cat([table, ids.flatten(1)], 1)
            score = torch.cat([score, (score.gather(1, front)[:, :, None] + logp).flatten(1)], 1)
            parent = torch.cat([parent, front[:, :, None].expand(B, width, top).flatten(1)], 1)
            chain = torch.cat([chain, child_chain.flatten(1, 2)], 1)
        # A child's score is at most its parent's; the depth penalty breaks ties, so every chosen node's parent
        # is chosen too (and comes first: table order is depth order).
        key = (score - 1e-4 * tree.cand_depth)[:, 1:]
        chosen = (key.topk(tree.nodes, dim=1).indices + 1).sort(dim=1).values  # [B, N] table indices
        node = torch.full_like(table, -1)
        node[:, 0] = 0
        node.scatter_(1, chosen, torch.arange(1, tree.nodes + 1, device=dev).expand(B, -1))
        heads = slice(1, 1 + tree.nodes)
        tokens[:, heads] = table.gather(1, chosen)
        rows.parent[:, heads] = node.gather(1, parent.gather(1, chosen))
        rows.node_depth[:, heads] = tree.cand_depth[chosen]
        paths = chain.gather(1, chosen[:, :, None].expand(B, tree.nodes, D1))
        paths = torch.where(paths >= 0, node.gather(1, paths.clamp(min=0).flatten(1)).view(paths.shape), -1)
        rows.retrieve[:, heads, :D1] = paths
        rows.mask[:, heads].scatter_(2, paths.clamp(min=0), True)


# Tokens the prompt lookup matches at most: of two earlier occurrences, the longer match wins, so a longer reach
# tells apart repeats that agree on their last few tokens. Replayed on greedy answers to 48 training-split
# prompts (scripts/context_replay.py, CPU), the chain alone takes 2.845 tokens a step at 4, 2.868 at 8 (code
# edits 3.74 -> 3.93, RAG 4.07 -> 4.13), 2.869 at 12; the kernel's cost hardly depends on it.
# (HYDRA_LITE_CONTEXT_NGRAM=4: the previous reach, to time against on a GPU.)
CONTEXT_NGRAM = int(os.environ.get("HYDRA_LITE_CONTEXT_NGRAM", "8"))


def context_match(history, lens, k, ngram=CONTEXT_NGRAM):
    return (_kernels.context_match if _triton(history) else context_match_ref)(history, lens, k, ngram)


def context_match_ref(history, lens, k, ngram=CONTEXT_NGRAM):
    """Prompt lookup: where the text's last tokens (up to `ngram` of them, ending with the root at lens[b]) last
    occurred before, in the prompt or the answer, and the k tokens that followed there. history [B, S] holds each
    row's tokens, the root at lens[b] (later slots are scratch). Picks the longest match, the latest among
    equals. Returns the k tokens [B, k] and the match length [B] (0: no earlier occurrence of even the root;
    the tokens are then the root repeated). A continuation that runs into the root wraps around to the match
    (a repeating text repeats). Static shapes and no host reads: runs inside a CUDA graph."""
    B, S = history.shape
    end = lens.long()[:, None]  # [B, 1]
    j = torch.arange(S, device=history.device)[None]  # [1, S]: where a match ends
    run = torch.ones(B, S, dtype=torch.bool, device=history.device)
    length = torch.zeros(B, S, dtype=torch.long, device=history.device)
    for i in range(ngram):  # the match grows backwards token by token while it holds
        earlier = F.pad(history, (i, 0), value=-1)[:, :S]  # earlier[b, j] = history[b, j - i]
        last = history.gather(1, (end - i).clamp(min=0))  # the text's i-th last token
        run = run & (earlier == last) & (end - i >= 0)
        length += run
    key = torch.where(j < end, length * S + j, -1)  # a match ends before the root; the longest, then the latest
    best = key.argmax(-1, keepdim=True)
    found = length.gather(1, best) * (key.gather(1, best) >= 0)  # [B, 1] its length, 0: none
    best = torch.where(found > 0, best, end - 1)  # none: the "continuation" is the root itself, repeated
    pos = best + 1 + torch.arange(k, device=history.device)[None] % (end - best)
    return history.gather(1, pos), found[:, 0]


class ContextDrafts:
    """Tokens from the context (prompt lookup): the tree's context chain continues the latest earlier occurrence
    of the text's last tokens, in the prompt or in what was generated. Copying pays in summaries, answers from
    passages and code edits; where nothing is copied, the chain is rejected like any wrong draft."""

    def __init__(self, ngram=CONTEXT_NGRAM):
        self.ngram = ngram

    def fill(self, tokens, rows, tree, inp: DraftInput):
        if tree.context:
            tokens[:, tree.context_nodes] = context_match(inp.history, inp.lens, tree.context, self.ngram)[0]


def record_accepted(history, lens, acc):
    """Write a step's accepted tokens and the next root into each row's history at lens[b] .. (lens: before the
    step). Slots past the new root get scratch, which later steps overwrite."""
    start = lens[:, None].long()
    history.scatter_(1, start + torch.arange(acc.tokens.shape[1], device=history.device), acc.tokens)
    history.scatter_(1, start + acc.n[:, None], acc.next_token[:, None])


def draft(sources, tree, inp: DraftInput):
    """Fill the tree (a Tree or a DynamicTree): returns tokens [B, size] (node 0 the root, the other nodes from
    the draft sources) and the tree's TreeRows. Every source has one contract: fill(tokens, rows, tree, inp)
    writes the nodes it owns (and, in a DynamicTree, their structure in rows)."""
    tokens = inp.root[:, None].repeat(1, tree.size)
    rows = tree.rows(tokens.shape[0])
    for source in sources:
        source.fill(tokens, rows, tree, inp)
    return tokens, rows


# ----------------------------------------------------------------------------------------------------------
# Verification and acceptance. Every rule takes what the verification pass saw (Verified), the sampling
# settings and a random generator, and returns an Accepted; ACCEPTANCE_RULES names the rules for sampling.


@dataclass
class Verified:
    """One verification pass: the tree (TreeRows, or a Tree shared by all rows), its tokens [B, T], and the base
    model's view at every node (its last hidden states [B, T, dim] and output projection; or, for tests, its
    logits [B, T, V] as given)."""
    tree: Union[Tree, TreeRows]
    tokens: torch.Tensor
    hidden: Optional[torch.Tensor] = None
    output_weight: Optional[torch.Tensor] = None
    given_logits: Optional[torch.Tensor] = None

    def logits(self):
        return self.given_logits if self.given_logits is not None else linear(self.hidden, self.output_weight)

    def argmax(self):
        """The base model's greedy token after every node [B, T]: the argmax of the same logits that greedy decoding
        takes its argmax of (EXACT); else without the [B, T, V] logits in memory."""
        if self.given_logits is not None or EXACT:
            return self.logits().argmax(-1)
        return lm_topk(self.hidden, self.output_weight, 1)[1][..., 0]


@dataclass
class Accepted:
    """n [B]: tokens accepted (root included, >= 1); path [B, depth+1]: their tree nodes, then j for the unused
    tail (so a KV compaction over it is a no-op); row [B, depth+3]: what the host reads, in one copy: the tokens
    along the path (valid up to n), n, and the next token (the base model's own after the last accepted one,
    the next tree's root)."""
    n: torch.Tensor
    path: torch.Tensor
    row: torch.Tensor

    @classmethod
    def of(cls, tokens, n, path, next_token):
        return cls(n, path, step_output(tokens, n, path, next_token))

    @property
    def tokens(self):
        return self.row[:, :-2]

    @property
    def next_token(self):
        return self.row[:, -1]


def accept_greedy(v: Verified, sp: SamplingParams = None, generator=None):
    """Greedy decoding: the longest path whose tokens are the base model's argmax after their parents (what every
    rule reduces to at temperature 0)."""
    return Accepted(*greedy_path(v.tokens, v.argmax(), v.tree.rows(v.tokens.shape[0]).retrieve))


def accept_typical(v: Verified, sp: SamplingParams, generator=None):
    """Typical acceptance (Medusa/Hydra, for sampling): a drafted token is accepted when the base model gives
    it probability above min(threshold, alpha * exp(-entropy)) after its parent, at this temperature. Not
    lossless like greedy verification, but keeps sampled text close to the base model's at far higher
    acceptance than exact rejection sampling. The next token is sampled from the base model after the path."""
    logits = v.logits()
    B, T, V = logits.shape
    tree = v.tree.rows(B)
    probs = F.softmax(logits.float() / sp.temperature, dim=-1)
    entropy = -(probs * torch.log(probs + 1e-10)).sum(-1)  # [B, T]
    limit = torch.minimum(torch.full_like(entropy, sp.typical_threshold), sp.typical_alpha * torch.exp(-entropy))
    p_node = probs.view(B, T * V).gather(1, tree.parent * V + v.tokens)  # each node's prob after its parent
    ok_node = p_node > limit.gather(1, tree.parent)
    n, path = longest_path(take_nodes(ok_node, tree.retrieve[..., 1:].clamp(min=0)), tree.retrieve)
    after = logits.gather(1, last_accepted(path, n)[:, :, None].expand(B, 1, V))[:, 0]
    return Accepted.of(v.tokens, n, path, sample(after, sp, generator))


def drop_repeats(p_node, tokens, tree: TreeRows):
    """A token drafted twice under one parent (a context draft that a head also proposed) is tried once: the
    later copy gets p = 0, so it is never accepted and its mass is not counted twice among the tried."""
    repeat = ((tokens[:, :, None] == tokens[:, None, :]) & tree.earlier_siblings).any(-1)
    return p_node.masked_fill(repeat, 0.0)


def accept_exact(v: Verified, sp: SamplingParams, generator=None):
    """Lossless verification for sampling: the tokens come out distributed exactly as sampling from the base
    model one token at a time (same temperature, top-k, top-p). At each accepted node, its children (distinct
    tokens, in rank order) are tried in turn: child c is accepted with probability p(c) / (1 - p(children
    tried before)), and the first accepted one is taken; when all are rejected, the next token is drawn from p
    without them. (Speculative sampling with deterministic drafts: each token comes out with probability
    exactly p.)"""
    tokens, logits = v.tokens, v.logits()
    B, T, V = logits.shape
    tree = v.tree.rows(B)
    probs = sampling_logits(logits, sp).softmax(-1)  # [B, T, V]: p after each node
    p_node = probs.view(B, T * V).gather(1, tree.parent * V + tokens)  # each node's p after its parent
    p_node = drop_repeats(p_node, tokens, tree)
    earlier = tree.earlier_siblings.to(probs.dtype)  # [B, T, T]: [b, j, i] = i is tried before j
    tried = (earlier @ p_node[:, :, None])[:, :, 0]  # the probability of the siblings tried before each node
    u = torch.rand(B, T, device=probs.device, generator=generator)
    accept = u * (1 - tried) < p_node
    taken = accept & ((earlier @ accept.to(probs.dtype)[:, :, None])[:, :, 0] == 0)  # each node's first accepted child
    n, path = longest_path(take_nodes(taken, tree.retrieve[..., 1:].clamp(min=0)), tree.retrieve)
    last = last_accepted(path, n)  # [B, 1]: its children were all rejected
    p_last = probs.gather(1, last[:, :, None].expand(B, 1, V))[:, 0]  # [B, V]
    its_children = tree.children.gather(1, last[:, :, None].expand(B, 1, T))[:, 0]  # [B, T]
    rejected = torch.zeros_like(p_last).scatter_add_(1, tokens, its_children.to(p_last.dtype))
    residual = p_last.masked_fill(rejected > 0, 0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_last)  # (rounding left it no mass)
    return Accepted.of(tokens, n, path, draw(residual, generator))


# Acceptance rules for sampled speculative decoding, by name (the CLIs' --acceptance). Greedy decoding always
# verifies with accept_greedy, which both rules become at temperature 0.
ACCEPTANCE_RULES = {
    "exact": accept_exact,  # lossless: the base model's own distribution
    "typical": accept_typical,  # more tokens per step, not the same distribution
}


# ----------------------------------------------------------------------------------------------------------
# Generation


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    row_accepted: list = field(default_factory=list)  # per row: tokens gained, and steps it was active in
    row_active: list = field(default_factory=list)
    step_times: list = field(default_factory=list)  # when the host read each step (perf_counter s): token latency
    cut_short: list = field(default_factory=list)  # rows stopped before their budget, EOS or stop: no room left
    batches: list = field(default_factory=list)  # the batch sizes the steps ran at, in order (see SHRINK)

    @property
    def tokens_per_s(self):
        return self.new_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def accepted(self):
        """Tokens gained by active rows over all steps."""
        return sum(self.row_accepted)

    @property
    def row_steps(self):
        """Active rows summed over steps."""
        return sum(self.row_active)

    @property
    def mean_accept(self):
        """Mean acceptance length: tokens a sequence gains per base-model step (1.0 for plain decoding)."""
        return self.accepted / self.row_steps if self.row_steps else 0.0


def sync(device):
    """Wait for the device's queued work (for wall-clock timing)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepGraph:
    """Replays fn(*static_inputs) as a CUDA graph; plain call elsewhere. Inputs are copied into static buffers."""

    def __init__(self, fn, example_inputs, use_graph, pool=None):
        self.fn, self.graph = fn, None
        if not use_graph:
            return
        self.inputs = [x.clone() for x in example_inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (Triton compiles, cuBLAS picks kernels) outside the capture
            fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # (graphs that never run at once may share a pool; "relaxed": the host side of pinned buffers that other
        # workspaces free during a capture is not the captured stream's business)
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="relaxed"):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs):
        if self.graph is None:
            return self.fn(*inputs)
        for buf, x in zip(self.inputs, inputs):
            buf.copy_(x)
        self.graph.replay()
        return self.outputs


class GraphKey(NamedTuple):
    """What a Workspace is built for; a generate() call with the same key reuses it."""
    batch: int
    max_len: int  # cache slots per row
    mode: str  # "ar" or "spec"
    sampling: Optional[SamplingParams]  # spec only: its step samples inside the graph (AR samples outside)
    acceptance: Optional[str]  # spec only: the ACCEPTANCE_RULES name used when sampling


@dataclass
class Workspace:
    """The caches and the captured decoding step for one GraphKey."""
    key: GraphKey
    cache: KVCache
    prefix_cache: Optional[KVCache]  # Hydra++'s extra layer
    rows: torch.Tensor  # [B, 1] row indices (made once: not a kernel in every step)
    tree: Union[Tree, DynamicTree, None] = None  # spec only: the tree verified at this batch size
    history: Optional[torch.Tensor] = None  # context drafts only: [B, max_len] each row's tokens (see DraftInput)
    step: Optional[StepGraph] = None
    host: list = field(default_factory=list)  # two pinned buffers that step outputs take turns in
    prefills: dict = field(default_factory=dict)  # prompt-length bucket -> its captured prefill (StepGraph)
    calls: int = 0  # generate() calls it served (a Conversation checks its cache is still its own)
    smaller: dict = field(default_factory=dict)  # batch -> a workspace over this one's first rows (SHRINK)


# A speculative batch shrinks as its rows finish: once the rows still going fit a smaller batch size (a power of
# two), they move to the front of the caches and the steps go on over those rows only, with that batch size's
# captured step and tree (a larger tree: see TREE_NODES_BESIDE_CHAIN_BY_BATCH). Rows finish at very different
# steps (acceptance differs by prompt: on the held-out mix at batch 8 only 58% of row-steps were of rows still
# going, run 26), and a verification's cost grows with the batch. The rows' tokens are the same bits either way
# (the batch-invariant kernels). HYDRA_LITE_SHRINK=0: the batch keeps its size to the end.
SHRINK = os.environ.get("HYDRA_LITE_SHRINK", "1") != "0"


def shrink_sizes(batch):
    """The smaller batch sizes a speculative batch of this size may shrink to: the powers of two below it."""
    return [1 << i for i in range(max(batch - 1, 0).bit_length())] if SHRINK else []


def move_rows(ws, rows, n):
    """Copy workspace rows `rows` (ascending) to its first len(rows) rows: the first n slots of their caches,
    the Hydra++ layer's, their lengths and token history. (Each row moves to a place at or before its own, in
    order, so no row is overwritten before it has moved.)"""
    caches = [c for c in (ws.cache, ws.prefix_cache) if c is not None]
    for i, r in enumerate(rows):
        if i == r:
            continue
        for c in caches:
            c.k[:, i, :n] = c.k[:, r, :n]
            c.v[:, i, :n] = c.v[:, r, :n]
            c.lens[i] = c.lens[r]
        if ws.history is not None:
            ws.history[i] = ws.history[r]


def carry_over(old, new, n):
    """Copy the first n slots of every row (keys/values, the Hydra++ layer's, the token history) from one
    workspace to another (a conversation that outgrew its cache)."""
    pairs = [(old.cache.k, new.cache.k), (old.cache.v, new.cache.v)]
    if old.prefix_cache is not None and new.prefix_cache is not None:
        pairs += [(old.prefix_cache.k, new.prefix_cache.k), (old.prefix_cache.v, new.prefix_cache.v)]
    for src, dst in pairs:
        dst[:, :, :n] = src[:, :, :n]
    if old.history is not None and new.history is not None:
        new.history[:, :n] = old.history[:, :n]


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during generate(): what was generated so far (outputs, stats), for the caller to show."""

    def __init__(self, outputs, stats):
        super().__init__("generation interrupted")
        self.outputs, self.stats = outputs, stats


MAX_WORKSPACES = 24  # workspaces a Generator keeps (its KV caches and captured graphs)
PREFILL_GRAPH_TOKENS = 4096  # captured prefills: up to this many padded tokens (batch x bucket); a longer prefill
# runs as chunks of that size, one after another, so that it too replays captured graphs (launches dominate a
# small model's prefill: batch 8 x 1,024 tokens took 13.5 ms eagerly, run 12)


def prefill_chunk(batch, T):
    """New tokens per row in each chunk of a prefill of T tokens per row that would pad to more than
    PREFILL_GRAPH_TOKENS in one piece (a power of two, at least 16), or 0: one piece."""
    if batch * max(16, 1 << (T - 1).bit_length()) <= PREFILL_GRAPH_TOKENS:
        return 0
    chunk = 1 << max(PREFILL_GRAPH_TOKENS // batch, 1).bit_length() - 1
    return chunk if 16 <= chunk < T else 0


def cache_bucket(slots, context):
    """Cache slots for a call needing `slots`: the next power of two (at least 256), at most the context."""
    return min(context, max(256, 1 << (slots - 1).bit_length()))


class Output:
    """One generate() call's results as they arrive: each row's new tokens, which rows are done, the stats, and
    the text streamed to on_text."""

    def __init__(self, prompts, max_new_tokens, eos, stop, tokenizer, on_text):
        B = len(prompts)
        self.tokens, self.done = [[] for _ in range(B)], [False] * B
        self.stats = Stats(prompt_tokens=sum(map(len, prompts)), row_accepted=[0] * B, row_active=[0] * B)
        self.max_new_tokens, self.eos, self.stop, self.tokenizer, self.on_text = max_new_tokens, eos, stop, tokenizer, on_text
        self.streams = [TextStream(tokenizer) for _ in range(B)] if on_text and tokenizer else None
        self._live = (None, None)  # (the live rows, their mask on the device)

    def emit(self, b, ids):
        """Append row b's new tokens, up to the first that ends it (an EOS, a stop string, the length limit)."""
        for t in ids:
            if self.done[b]:
                return
            if t in self.eos:
                self.done[b] = True
                return
            self.tokens[b].append(t)
            self.stats.new_tokens += 1
            if self.stop and any(x in self.tokenizer.decode(self.tokens[b][-16:]) for x in self.stop):
                self.done[b] = True
            if self.streams:
                text = self.streams[b].push([t])
                if text:
                    self.on_text(b, text)
            if len(self.tokens[b]) >= self.max_new_tokens:
                self.done[b] = True

    def active(self, order):
        """[(workspace row, prompt)] of the prompts not done; order: each workspace row's prompt (None: a row
        that holds none, after the batch shrank)."""
        return [(i, b) for i, b in enumerate(order) if b is not None and not self.done[b]]

    def live_mask(self, device, order):
        """live[i] = 0 freezes workspace row i's cache (its prompt is done, or it holds none). Made anew only
        when that changes; sent from pinned memory, so it need not wait for the step in flight."""
        rows = (len(order), tuple(self.active(order)))
        if self._live[0] != rows:
            live = torch.zeros(len(order), dtype=torch.int32)
            live[[i for i, _ in rows[1]]] = 1
            if torch.device(device).type == "cuda":
                live = live.pin_memory().to(device, non_blocking=True)
            self._live = (rows, live)
        return self._live[1]

    def take_step(self, mode, rows, lens, order):
        """Emit one step's tokens (rows: the host copy of its output, a row per workspace row) and count them;
        lens: the host's copy of each prompt's cache length."""
        active = self.active(order)
        for i, b in active:
            if mode == "ar":
                n = 1
                self.emit(b, rows[i])
            else:  # the tree's root was emitted last step; emit the rest and the next root
                n = rows[i][-2]
                self.emit(b, rows[i][1:n] + [rows[i][-1]])
            lens[b] += n  # a live row's cache grew by its accepted tokens
            self.stats.row_accepted[b] += n
            self.stats.row_active[b] += 1
        if active:
            self.stats.steps += 1
            self.stats.step_times.append(time.perf_counter())


# Head-tree nodes by batch size (up to that batch): a verification pass costs more per node as the batch grows,
# so larger batches verify smaller trees (the heads' most likely paths). Measured on an H200 with SmolLM2-135M
# and context drafts (BENCHMARKS.md, run 12, "tree size by batch"): at batch 8, 16 nodes 2.24x over AR, 8 nodes
# 2.19x, 32 nodes 2.11x; at batch 32, 16 nodes 1.72x, 8 or 32 nodes 1.61-1.62x.
TREE_NODES_BY_BATCH = ((2, 63), (4, 48), (32, 16), (1 << 30, 8))
# Beside a context chain (the default with heads) the chain takes the long accepts, and the head tree's deep,
# unlikely nodes cost more than they add: H200, SmolLM2, 60 held-out prompts against AR in the same run
# (BENCHMARKS.md, run 24): batch 1 with a 24-token chain, 32 head nodes 5068 tokens/s (4.25x), 24 5054, 16 4951,
# 48 4639, 63 4553; batch 2 with 16, 32 nodes 5652 against 5436 (16) and 5463 (63); batch 8 with 10, 8 nodes
# 11097, 16 10929, 32 10464.
TREE_NODES_BESIDE_CHAIN_BY_BATCH = ((4, 32), (32, 16), (1 << 30, 8))
# On the CPU a verification pass costs about in proportion to its nodes (no launch overhead hides them): an
# 8-node head tree with the context chain pays at batch 1 (1.56x AR decoding, the 64-node tree 0.93x), and the
# command line decodes batches plainly there (BENCHMARKS.md, run 11, "On the CPU").
CPU_TREE_NODES_BY_BATCH = ((1 << 30, 8),)
# Context-chain tokens by batch size (up to that batch), with heads. Measured on an H200 with SmolLM2 against AR
# in the same run (BENCHMARKS.md): batch 1, 180 held-out prompts, a 24-token chain 4677 tokens/s against 4461 with
# 16 (run 23; acceptance 7.17 vs 6.61) and 4050 with 10 (run 22); 32 tokens lose to 24 (4575 vs 4706 on 90
# prompts). Batch 2, 180 prompts: 16 tokens 5734 vs 5359 with 10 (run 23, every output == AR). Batch 4 about even
# with 16 or 10 (7889 vs 7988, 45 prompts) and batch 8 loses with 16 (11093 vs 11377; run 22). On the CPU a node
# costs in proportion (no launch overhead hides it): 10 there.
CONTEXT_DRAFTS_BY_BATCH = ((1, 24), (2, 16), (1 << 30, 10))
CPU_CONTEXT_DRAFTS_BY_BATCH = ((1 << 30, 10),)


def dynamic_spread(nodes):
    """A dynamic tree's width and top (frontier nodes expanded per depth, children each) for `nodes` nodes:
    about their square root, plus 3 (10 for 63 nodes, 6 for 16), so the candidates outnumber the nodes a few
    times over."""
    return min(10, math.isqrt(max(nodes - 1, 1)) + 3)


def prune_tree(choices, size, rank_acc=None):
    """The `size` most likely paths of a tree (a subtree: every parent kept before its children), a path's
    chance taken as the product of rank_acc[d][r] along it (heads' held-out accuracies; without them,
    assumed_rank_chance)."""
    if len(choices) <= size:
        return choices
    chance = lambda path: math.prod(rank_acc[d][r] if rank_acc else assumed_rank_chance(r) for d, r in enumerate(path))
    kept = sorted(choices, key=lambda p: (-chance(p), len(p), p))[:size]
    return sorted(kept, key=lambda p: (len(p), p))


class Generator:
    """Batched generation with one model, and optionally drafts for speculative decoding: draft heads and/or
    context drafts (prompt lookup, a chain of `context_drafts` tokens under the tree's root). Caches and CUDA
    graphs are built per GraphKey and reused across calls."""

    def __init__(self, model: Llama, tokenizer=None, heads: Optional[DraftHeads] = None, tree_choices=None,
                 cuda_graphs=True, acceptance="exact", context_drafts=None, tree_nodes_by_batch=None,
                 dynamic=False):
        """tree_choices: the heads' static tree (default: the one they ship, else default_tree()); dynamic=True
        grows a DynamicTree per step instead, as deep as that tree, of as many nodes. tree_nodes_by_batch: head-tree
        nodes by batch size, ((up to batch, nodes), ...) (default: TREE_NODES_BY_BATCH, or
        TREE_NODES_BESIDE_CHAIN_BY_BATCH at batch sizes with a context chain)."""
        self.model, self.tokenizer, self.heads = model, tokenizer, heads
        self.dynamic = dynamic and heads is not None
        self.device = model.embed.weight.device
        # Graph capture needs the Triton path: the reference attention reads lengths on the host.
        self.use_graphs = cuda_graphs and self.device.type == "cuda" and USE_TRITON and _kernels is not None
        if acceptance not in ACCEPTANCE_RULES:
            raise HydraLiteError(f"acceptance is one of {', '.join(map(repr, ACCEPTANCE_RULES))}, not {acceptance!r}")
        if context_drafts is None:  # by batch with heads; without, Generator(model) stays plain decoding
            by_batch = CONTEXT_DRAFTS_BY_BATCH if self.device.type == "cuda" else CPU_CONTEXT_DRAFTS_BY_BATCH
            self.context_by_batch = by_batch if heads is not None else ((1 << 30, 0),)
        else:
            self.context_by_batch = ((1 << 30, context_drafts),)
        context_drafts = max(n for _, n in self.context_by_batch)  # (the longest chain: 0, none at any batch)
        self.acceptance, self.context_drafts, self.tree_nodes_by_batch = acceptance, context_drafts, tree_nodes_by_batch
        self.tree_choices, self.drafts, self._trees = [], [], {}
        if heads is not None:
            if tree_choices is None:  # heads may ship the tree fitted to their accuracies, and a shallower one
                # for beside context drafts (whose chain takes the long accepts: deep head levels cost more than
                # they add there, BENCHMARKS.md runs 16-17)
                shipped = heads.context_tree if context_drafts and heads.context_tree else heads.tree_choices
                tree_choices = shipped or default_tree(depth=min(4, heads.hc.n_heads))
            self.tree_choices = [list(c) for c in tree_choices]
            depth = max(map(len, self.tree_choices), default=0)
            if depth > heads.hc.n_heads:
                raise HydraLiteError(f"tree is {depth} deep but there are only {heads.hc.n_heads} heads")
            self.drafts.append(HeadDrafts(heads, model))
        if context_drafts:
            self.drafts.append(ContextDrafts())
        self.tree = self.tree_for(1) if self.drafts else None  # (a batch of one verifies the whole tree)
        self.workspaces = {}  # GraphKey -> Workspace, the most recently used last
        self._prefill_pool = None  # the captured prefills' memory (one pool for all)

    def describe(self, batch=1):
        """What decodes a batch of this size, in words: "ar", or the heads' kind and tree, and context drafts."""
        if self.tree is None:
            return "ar"
        tree, parts = self.tree_for(batch), []
        if self.heads is not None:
            kind = ("hydra" if self.heads.hc.grounded else "medusa") + ("++" if self.heads.hc.prefix else "")
            parts.append(f"{kind}, {tree.size - tree.context - 1}-node {'dynamic ' if self.dynamic else ''}tree")
        if tree.context:
            parts.append(f"context drafts {tree.context}")
        return " + ".join(parts)

    def tree_for(self, batch):
        """The tree verified at this batch size: the heads' tree cut to its nodes for this batch (see __init__),
        and the context chain (CONTEXT_DRAFTS_BY_BATCH)."""
        if batch not in self._trees:
            context = next(n for b, n in self.context_by_batch if batch <= b)
            by_batch = self.tree_nodes_by_batch or (TREE_NODES_BESIDE_CHAIN_BY_BATCH if context else TREE_NODES_BY_BATCH)
            nodes = next(n for b, n in by_batch if batch <= b)
            rank_acc = self.heads.rank_acc if self.heads is not None else None
            choices = prune_tree(self.tree_choices, nodes, rank_acc)
            if self.dynamic:
                depth, spread = max(map(len, choices)), dynamic_spread(len(choices))
                self._trees[batch] = DynamicTree(len(choices), depth, spread, spread, self.device, context)
            else:
                self._trees[batch] = Tree(choices, self.device, context=context)
        return self._trees[batch]

    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens=256, sampling=None, mode=None, on_text=None, stop_at_eos=True, stop=()):
        """prompts: list of token-id lists. mode: "ar", or "spec" (needs drafts: heads or context drafts; the
        default when there are any). on_text(row, text) is called with each new piece of text (needs a
        tokenizer). stop: strings that end a row once its text contains one (kept in the output; needs a
        tokenizer). Returns (list of generated id lists, Stats)."""
        return self._generate(prompts, max_new_tokens, sampling, mode, on_text, stop_at_eos, stop)

    @torch.inference_mode()
    def _generate(self, prompts, max_new_tokens, sampling, mode, on_text, stop_at_eos, stop, cached=0, previous=None):
        """generate(); cached > 0 (one prompt): its first `cached` tokens are already in the `previous` workspace's
        cache (a Conversation's earlier turns), and only the rest is prefilled."""
        sampling = sampling or SamplingParams()
        mode = self._check_call(prompts, mode, stop)
        B, spec = len(prompts), mode == "spec"
        smaller = shrink_sizes(B) if spec else []
        room, overshoot = self._room([self.tree_for(B)] if spec else [])
        # The cache is sized for the trees of the batch sizes it may shrink to (larger) too, unless the context
        # caps it: then the batch stays whole.
        room_all, overshoot_all = self._room([self.tree_for(b) for b in [B] + smaller] if spec else [])
        max_len = self._max_len(prompts, max_new_tokens, room + overshoot, room_all + overshoot_all)
        shrink = bool(smaller) and max(map(len, prompts)) + max_new_tokens + room_all + overshoot_all <= max_len
        ws = self._workspace(B, max_len, mode, sampling)
        if cached and previous is not ws:
            carry_over(previous, ws, cached)
        ws.calls += 1
        out = Output(prompts, max_new_tokens, set(self.model.cfg.eos_ids) if stop_at_eos else set(), stop,
                     self.tokenizer, on_text)
        t0 = time.perf_counter()
        logits, h = self._prefill(ws, prompts, cached)
        token = sample(logits, sampling)
        if ws.history is not None:  # the first root
            ws.history.scatter_(1, ws.cache.lens[:, None].long(), token[:, None])
        sync(self.device)
        out.stats.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            for b, t in enumerate(token.tolist()):
                out.emit(b, [t])
            self._decode(ws, out, token, h, [len(p) for p in prompts], room_all if shrink else room, sampling, shrink)
        except KeyboardInterrupt:
            sync(self.device)
            out.stats.decode_s = time.perf_counter() - t0
            raise GenerationInterrupted(out.tokens, out.stats) from None
        sync(self.device)
        out.stats.decode_s = time.perf_counter() - t0
        return out.tokens, out.stats

    def _check_call(self, prompts, mode, stop):
        mode = mode or ("spec" if self.drafts else "ar")
        if mode == "spec" and not self.drafts:
            raise HydraLiteError("speculative decoding needs drafts: draft heads (--heads) or context drafts")
        if stop and self.tokenizer is None:
            raise HydraLiteError("stop strings need a tokenizer")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise HydraLiteError("every prompt needs at least one token")
        return mode

    @staticmethod
    def _room(trees):
        """(room, overshoot) for decoding with these trees: cache slots past the rows' lengths that a step in
        flight and a tree take, and how far a row's last step may go past its budget (its tree's depth: that
        row's length still counts in the room check while the others go on, so the cache holds it too, else they
        stop short of their budget: run 22's row cut short by its batch partner)."""
        return 2 * (max((t.size for t in trees), default=1) + 1), max((t.depth for t in trees), default=0)

    def _max_len(self, prompts, max_new_tokens, room, sized_room=0):
        """Cache slots per row: room for the longest prompt, its new tokens and the steps in flight (sized_room,
        where more), rounded up to a power of two (at least 256, at most the context), so that calls share a few
        workspaces."""
        longest, context = max(len(p) for p in prompts), self.model.cfg.max_seq_len
        if longest + room > context:
            raise HydraLiteError(f"prompt of {longest} tokens does not fit the context of {context}")
        return cache_bucket(longest + max_new_tokens + max(room, sized_room), context)

    @property
    def workspace(self):
        """The workspace of the last call (None before the first)."""
        return next(reversed(self.workspaces.values()), None)

    def _workspace(self, batch, max_len, mode, sampling):
        """The workspace for this call's GraphKey: kept from an earlier call or warmup(), else built (the least
        recently used one goes when there are MAX_WORKSPACES)."""
        spec = mode == "spec"
        key = GraphKey(batch, max_len, mode, sampling if spec else None, self.acceptance if spec else None)
        ws = self.workspaces.pop(key, None) or self._build_workspace(key)
        self.workspaces[key] = ws  # the most recently used last
        while len(self.workspaces) > MAX_WORKSPACES:
            self.workspaces.pop(next(iter(self.workspaces)))
        return ws

    def warmup(self, batch_sizes=(1,), sampling=None, modes=None, progress=None):
        """Build the workspaces (caches, captured steps, compiled kernels) that calls of these batch sizes can
        need, every cache size up to the context (a speculative one with the steps of the smaller sizes it may
        shrink to), so that no call pays for a capture; modes: the default mode's
        (spec with drafts, else ar) unless named. progress(text): told before each. Returns the seconds it took."""
        t0, context = time.perf_counter(), self.model.cfg.max_seq_len
        sizes = sorted({cache_bucket(n, context) for n in (256 << i for i in range(16)) if n // 2 < context})
        modes = modes or ["spec" if self.drafts else "ar"]
        if len(batch_sizes) * len(modes) * len(sizes) > MAX_WORKSPACES:
            raise HydraLiteError(f"warm-up of {len(batch_sizes) * len(modes) * len(sizes)} workspaces: more than the "
                                 f"{MAX_WORKSPACES} a Generator keeps; warm fewer batch sizes")
        todo = [(b, m, n) for b in batch_sizes for m in modes for n in sizes]
        for i, (b, mode, n) in enumerate(todo):
            if progress:
                progress(f"warm-up {i + 1}/{len(todo)}: batch {b}, {mode}, {n} slots")
            with torch.inference_mode():
                self._warm_prefills(self._workspace(b, n, mode, sampling or SamplingParams()))
        return time.perf_counter() - t0

    def _warm_prefills(self, ws):
        """Capture the workspace's prefill for every length bucket a call can use (none without CUDA graphs)."""
        T = 16
        while (bucket := self._prefill_bucket(ws, T, 0)) is not None:
            if bucket not in ws.prefills:
                self._prefill(ws, [[0] * bucket] * ws.key.batch)
            T = bucket * 2
        for kv in (ws.cache, ws.prefix_cache):  # (scratch: the next call's prefill sets the lengths)
            if kv is not None:
                kv.lens.zero_()

    def _build_workspace(self, key, within=None):
        """The caches and captured step for a GraphKey; within: a workspace whose first key.batch rows this one
        works on (SHRINK: the same memory), else its own. A speculative one also gets those over its first
        rows for each of shrink_sizes()."""
        B, c, dtype, spec = key.batch, self.model.cfg, self.model.embed.weight.dtype, key.mode == "spec"
        if within is not None:
            cache = within.cache.first(B)
            prefix_cache = None if within.prefix_cache is None else within.prefix_cache.first(B)
            history = None if within.history is None else within.history[:B]
        else:
            cache = self.model.new_cache(B, key.max_len)
            prefix_cache = history = None
            if spec and self.heads is not None and self.heads.prefix is not None:
                prefix_cache = new_cache(c, 1, B, key.max_len, self.device, dtype, rope=cache.rope)
            if spec and self.context_drafts:
                history = torch.zeros(B, key.max_len, dtype=torch.long, device=self.device)
        ws = Workspace(key, cache, prefix_cache, torch.arange(B, device=self.device)[:, None],
                       self.tree_for(B) if spec else None, history)
        zeros = torch.zeros(B, dtype=torch.long, device=self.device)
        live = torch.ones(B, dtype=torch.int32, device=self.device)
        if key.mode == "ar":
            ws.step = StepGraph(lambda tokens, live: self._ar_step(ws, tokens, live), [zeros, live], self.use_graphs)
        else:
            sp = key.sampling
            accept = ACCEPTANCE_RULES[key.acceptance] if sp.temperature > 0 else accept_greedy
            h = torch.zeros(B, c.dim, device=self.device, dtype=dtype)
            ws.step = StepGraph(lambda root, h, live: self._spec_step(ws, sp, accept, root, h, live), [zeros, h, live],
                                self.use_graphs)
        for kv in (cache, prefix_cache):  # graph warm-up wrote scratch
            if kv is not None:
                kv.lens.zero_()
        if self.device.type == "cuda":  # the step outputs' pinned host buffers (allocating them costs a first call ms)
            width = 1 if key.mode == "ar" else ws.tree.depth + 3
            ws.host[:] = [torch.empty((B, width), dtype=torch.long, pin_memory=True) for _ in range(2)]
        if spec and within is None:  # (each over the first rows of this one's memory, as are those below it)
            ws.smaller = {b: self._build_workspace(key._replace(batch=b), ws) for b in shrink_sizes(B)}
            for w in ws.smaller.values():
                w.smaller = {b: x for b, x in ws.smaller.items() if b < w.key.batch}
        return ws

    def _prefill(self, ws, prompts, cached=0):
        """Fill each row's cache with its prompt (after the `cached` tokens already there), all rows in one forward
        (right-padded: a row's padding writes keys/values past its length, which nothing reads and later tokens
        overwrite). On the GPU the new tokens are padded to a length bucket whose prefill is captured once (a
        CUDA graph per workspace and bucket: a replay, not ~300 kernel launches from Python). Returns the base
        logits after the prompt [B, V] and the hidden state the draft heads start from [B, dim] (Hydra++: the
        prefix layer's output)."""
        T = max(map(len, prompts)) - cached
        chunk = prefill_chunk(ws.key.batch, T)
        if chunk:
            return self._prefill_chunks(ws, prompts, cached, chunk)
        bucket = self._prefill_bucket(ws, T, cached)
        width = bucket or T
        ids = torch.tensor([(p[cached:] + [0] * width)[:width] for p in prompts], device=self.device)
        start = torch.full((len(prompts),), cached, dtype=torch.int32, device=self.device)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=self.device)
        if not bucket:
            return self._prefill_step(ws, ids, start, lens)
        if bucket not in ws.prefills:  # (all prefills share one memory pool: their outputs are read at once)
            if self.use_graphs and self._prefill_pool is None:
                self._prefill_pool = torch.cuda.graph_pool_handle()
            ws.prefills[bucket] = StepGraph(lambda *x: self._prefill_step(ws, *x), [ids, start, lens], self.use_graphs,
                                            self._prefill_pool)
        return ws.prefills[bucket](ids, start, lens)

    def _prefill_chunks(self, ws, prompts, cached, chunk):
        """_prefill in chunks of `chunk` new tokens per row. A row whose prompt ends in an earlier chunk pads the
        later ones (scratch slots past its length); each row's logits and hidden state come from the chunk that
        holds its last prompt token (copied out: the next chunk replays the same graph, over its outputs)."""
        ends = torch.tensor([len(p) - 1 for p in prompts], device=self.device)[:, None]
        logits = h = None
        for start in range(cached, max(map(len, prompts)), chunk):
            part_logits, part_h = self._prefill(ws, [p[:start + chunk] for p in prompts], start)
            here = (ends >= start) & (ends < start + chunk)
            logits = part_logits.clone() if logits is None else torch.where(here, part_logits, logits)
            h = part_h.clone() if h is None else torch.where(here, part_h, h)
        return logits, h

    def _prefill_bucket(self, ws, T, cached):
        """The padded length of a captured prefill of T new tokens (a power of two, at least 16), or None: eager
        (no CUDA graphs, or a prefill too large to be launch-bound: over PREFILL_GRAPH_TOKENS padded tokens)."""
        bucket = max(16, 1 << (T - 1).bit_length())
        if not self.use_graphs or ws.key.batch * bucket > PREFILL_GRAPH_TOKENS or cached + bucket > ws.key.max_len:
            return None
        return bucket

    def _prefill_step(self, ws, ids, start, lens):
        """The prefill proper (captured per bucket on the GPU): ids [B, T] after start[b] cached tokens."""
        B, T = ids.shape
        # Each row's last prompt position among the new tokens (0 for a row that ended in an earlier chunk).
        last = (ws.rows[:, 0], (lens - 1 - start).clamp(min=0).long())
        ws.cache.lens.copy_(start)
        live = (lens - start).clamp(0, T).int() if PREFILL_SKIP else None
        h = self.model(ids, ws.cache, live=live)
        ws.cache.lens.copy_(lens)
        if ws.history is not None:  # (padding lands in scratch slots past the row's length)
            slots = (start[:, None].long() + torch.arange(T, device=ids.device)).clamp(max=ws.history.shape[1] - 1)
            ws.history.scatter_(1, slots, ids)
        logits = self.model.logits(h[last])
        if ws.prefix_cache is not None:
            ws.prefix_cache.lens.copy_(start)
            h = self.heads.run_prefix(h, ws.cache.rope, ws.prefix_cache)
            ws.prefix_cache.lens.copy_(lens)
        return logits, h[last]

    def _decode(self, ws, out, token, h, lens, room, sampling, shrink=False):
        """Decoding steps until every row is done or out of room. One step stays in flight: step i+1 is queued
        on the GPU (its inputs are step i's outputs, still on the device) before the host reads step i's
        tokens, so the host's work (reading, emitting, stop checks) overlaps the GPU's. The host learns that a
        row is done one step late: that row's next step is wasted, and its cache may grow by one more step,
        which the room allows for. lens: the host's copy of each row's cache length. shrink: the batch may
        shrink as its rows finish (_shrink_batch)."""
        pending, order = None, list(range(ws.key.batch))  # order: each workspace row's prompt
        out.stats.batches.append(ws.key.batch)
        while True:
            step = None
            if shrink and pending is not None and self._smaller(ws, out, order) is not None:  # (in flight: read first)
                out.take_step(ws.key.mode, self._read(pending), lens, order)
                pending = None
                ws, token, h, order = self._shrink_batch(ws, out, order, token, h, lens)
                out.stats.batches.append(ws.key.batch)
            if not all(out.done) and max(lens) + room <= ws.key.max_len:
                live = out.live_mask(self.device, order)
                if ws.key.mode == "ar":
                    token = sample(ws.step(token, live), sampling)
                    step = self._to_host(ws, token[:, None])
                else:
                    packed, h = ws.step(token, h, live)
                    token = packed[:, -1]
                    step = self._to_host(ws, packed)
            if pending is not None:
                out.take_step(ws.key.mode, self._read(pending), lens, order)
            if step is None:  # (rows not done here ran out of cache: the model's context)
                out.stats.cut_short = [b for b, done in enumerate(out.done) if not done]
                return
            pending = step

    @staticmethod
    def _smaller(ws, out, order):
        """The smallest of ws.smaller that holds the rows still going, if any."""
        n = len(out.active(order))
        return next((ws.smaller[b] for b in sorted(ws.smaller) if b >= n), None) if n else None

    def _shrink_batch(self, ws, out, order, token, h, lens):
        """Move the rows still going to the front and go on with the smallest workspace over them (see SHRINK):
        returns its (ws, token, h, order). No step may be in flight."""
        smaller = self._smaller(ws, out, order)
        if smaller is None:
            return ws, token, h, order
        rows = [i for i, _ in out.active(order)]
        move_rows(ws, rows, max(lens[order[i]] for i in rows))
        keep = torch.tensor(rows + [0] * (smaller.key.batch - len(rows)), device=token.device)
        order = [order[i] for i in rows] + [None] * (smaller.key.batch - len(rows))
        return smaller, token[keep], h[keep], order

    # -- one step of each mode (captured as a CUDA graph on GPU). live[b] = 0 freezes a finished row's cache,
    # so rows that stopped early never run out of room while the others go on.
    def _ar_step(self, ws, tokens, live):
        h = self.model(tokens[:, None], ws.cache)
        ws.cache.lens += live
        return self.model.logits(h[:, 0])

    def _spec_step(self, ws, sp, accept, root, h, live):
        """Draft a tree after root, verify it in one forward pass, accept what the base model agrees with,
        compact the cache. Returns the Accepted row [B, depth+3] (the host reads it in one transfer) and the
        hidden state the next tree is drafted from."""
        tree, cache = ws.tree, ws.cache
        tokens, rows = draft(self.drafts, tree, DraftInput(root, h, ws.history, cache.lens))
        pos = cache.lens[:, None].long() + rows.node_depth
        hidden = self.model(tokens, cache, pos, rows)  # [B, T, dim]
        acc = accept(Verified(rows, tokens, hidden, self.model.output_weight), sp)
        grow = acc.n.to(torch.int32) * live
        next_h = self._next_draft_state(ws, hidden, acc, grow)
        if ws.history is not None:
            record_accepted(ws.history, cache.lens, acc)
        kv_compact(cache.k, cache.v, cache.lens, acc.path)
        cache.lens += grow
        return acc.row, next_h

    def _next_draft_state(self, ws, hidden, acc, grow):
        """The hidden state after the last accepted token: the base model's (Hydra++: the extra layer's, which
        runs over the accepted hidden states in order and keeps its own cache)."""
        rows = ws.rows
        if ws.prefix_cache is None:
            return hidden[rows, last_accepted(acc.path, acc.n)][:, 0]
        h_pre = self.heads.run_prefix(hidden[rows, acc.path], ws.cache.rope, ws.prefix_cache)
        ws.prefix_cache.lens += grow
        return h_pre[rows, (acc.n - 1)[:, None]][:, 0]

    @staticmethod
    def _to_host(ws, x):
        """Start copying a step's (small) output to the host without waiting; _read waits. Two pinned buffers
        take turns: one step's is being read while the next one's fills."""
        if x.device.type != "cuda":
            return x.clone(), None
        if not ws.host or ws.host[0].shape != x.shape:
            ws.host[:] = [torch.empty(x.shape, dtype=x.dtype, pin_memory=True) for _ in range(2)]
        ws.host.reverse()
        buf = ws.host[0]
        buf.copy_(x, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buf, event

    @staticmethod
    def _read(pending):
        buf, event = pending
        if event is not None:
            event.synchronize()
        return buf.tolist()


class Conversation:
    """A multi-turn chat on one Generator (batch 1) that keeps its KV cache between turns: each turn prefills only
    its own new tokens. The Generator should serve only this conversation while it goes on; if another call
    used the cache in between, the next turn prefills the whole conversation again."""

    def __init__(self, gen: Generator, system=None):
        if gen.tokenizer is None:
            raise HydraLiteError("a conversation needs a Generator with a tokenizer")
        self.gen, self.system = gen, system
        self.reset()

    def reset(self):
        self.messages, self.ids, self.cached, self.ws, self.ws_calls = [], [], 0, None, None

    def say(self, text, max_new_tokens=256, sampling=None, on_text=None, stop=()):
        """The answer to one more user message: (answer text, Stats). Ctrl-C raises GenerationInterrupted; the
        part answered so far stays in the conversation."""
        tok, user = self.gen.tokenizer, {"role": "user", "content": text}
        follow = tok.encode_next_turn(text) if self.ids else None
        if follow is None:  # a first turn, or a template without turn-by-turn encoding: the whole conversation
            system = [{"role": "system", "content": self.system}] if self.system else []
            prompt, cached = tok.encode_chat(system + self.messages + [user]), 0
        else:
            prompt = self.ids + follow
            cached = self.cached if self.ws is not None and self.ws.calls == self.ws_calls else 0
        try:
            outs, stats = self.gen._generate([prompt], max_new_tokens, sampling, None, on_text, True, stop, cached, self.ws)
        except GenerationInterrupted as e:
            self._record(prompt, user, e.outputs[0])
            raise
        self._record(prompt, user, outs[0])
        return tok.decode(outs[0]), stats

    def _record(self, prompt, user, answer):
        """The conversation so far, as text and as the tokens in the cache: all but the answer's last token, whose
        keys the last step may not have written (the next turn prefills it again)."""
        self.messages += [user, {"role": "assistant", "content": self.gen.tokenizer.decode(answer)}]
        self.ids = prompt + answer
        self.cached, self.ws = len(self.ids) - 1, self.gen.workspace
        self.ws_calls = self.ws.calls


# ----------------------------------------------------------------------------------------------------------
# Command line


class ArgParser(argparse.ArgumentParser):
    """argparse, with a mistake reported as one line (argparse prints its usage first) and exit code 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) or action.help is None else super()._get_help_string(action)


def main(argv=None):
    ap = ArgParser(description="Llama inference with Hydra speculative decoding", formatter_class=HelpWithDefaults)
    ap.add_argument("--prompt", action="append", help="prompt (repeat for a batch); without one, in a terminal: a chat")
    ap.add_argument("--chat", action="store_true", help="a multi-turn chat, one turn per line of input (a terminal or "
                                                        "a pipe); /reset starts over, /quit ends")
    ap.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="runtime checkpoint dir (convert.py makes one)")
    ap.add_argument("--heads", default=None, help="draft heads dir (default: the shipped SmolLM2 Hydra++ heads, when "
                                                  "they were trained for the checkpoint's model)")
    ap.add_argument("--mode", choices=["ar", "medusa", "hydra"], default=None,
                    help="ar: plain decoding; medusa/hydra: speculative with the given heads (default: hydra when heads load)")
    ap.add_argument("--tree", default=None, help="the heads' tree: 'dynamic' (grown per step from the heads' "
                                                 "confidences), or static tree choices as JSON (list of rank paths) "
                                                 "or a .json file (default: the heads' own static tree)")
    ap.add_argument("--context-drafts", type=int, default=None, metavar="K",
                    help="drafts from the context: a chain of K tokens that continues the latest earlier occurrence "
                         "of the text's last tokens (default with heads, by batch on a GPU: 24 at batch 1, 16 at 2, else 10; "
                         "0: off)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate per prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0: off")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest top set reaching this")
    ap.add_argument("--acceptance", choices=list(ACCEPTANCE_RULES), default="exact",
                    help="sampled speculative decoding: exact (the base model's own distribution) or typical "
                         "(Medusa/Hydra's typical acceptance: more tokens per step, not the same distribution)")
    ap.add_argument("--stop", action="append", default=[], help="stop once the answer contains this text (repeatable)")
    ap.add_argument("--raw", action="store_true", help="no chat template: the prompt is plain text (control tokens in it "
                                                       "are parsed as control tokens)")
    ap.add_argument("--system", default=None, help="system prompt for the chat template")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="weights and activations (None: bfloat16 on a GPU, float32 on the CPU)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="run each step eagerly (debugging)")
    ap.add_argument("--fast-kernels", action="store_true", help="GPU: cuBLAS and the tiled attention instead of the "
                    "batch-invariant kernels: ~20%% more tokens/s, but greedy output may part from plain decoding's at "
                    "near-ties in bf16 (as HYDRA_LITE_EXACT=0)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    args = ap.parse_args(argv)
    args.chat = args.chat or (not args.prompt and sys.stdin.isatty())  # no prompt in a terminal: chat
    try:
        return _run_cli(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except GenerationInterrupted as e:  # Ctrl-C: what was generated so far, and its stats
        print_stats("interrupted", e.stats, args)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, and keep the exit flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def check_cli_args(args):
    """Everything about the arguments that can be checked before the model loads."""
    if args.chat and args.prompt:
        raise HydraLiteError("--chat reads its turns from the input; leave out --prompt")
    if not args.chat and not args.prompt:
        raise HydraLiteError("give a --prompt, or --chat to read turns from the input")
    for p in (args.prompt or []) + args.stop + [args.system or ""]:
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise HydraLiteError("a --prompt, --stop or --system is not valid UTF-8 text") from None
    check_int("--max-new-tokens", args.max_new_tokens, 1)
    check_int("--top-k", args.top_k, 0)
    check_temperature("--temperature", args.temperature)
    if not 0 < args.top_p <= 1:
        raise HydraLiteError(f"--top-p must be in (0, 1], not {args.top_p}")
    if args.context_drafts is not None:
        check_int("--context-drafts", args.context_drafts, 0, MAX_CONTEXT_DRAFTS)
    check_device(args.device)
    return parse_tree_arg(args.tree) if args.tree and args.tree != "dynamic" else None


def check_device(device):
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise HydraLiteError(f"--device {device!r} is not a device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HydraLiteError("--device cuda, but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise HydraLiteError(f"--device {device!r}: this runtime runs on cpu or cuda")


def parse_tree_arg(text):
    """--tree: JSON, or a .json file holding it; checked as Tree checks it (every path's parent there too)."""
    if text.endswith(".json"):
        text = read_json(text)
    else:
        try:
            text = json.loads(text)
        except json.JSONDecodeError as e:
            raise HydraLiteError(f"--tree is not valid JSON ({e}); give 'dynamic' or a list of rank paths such as "
                                 f"[[0],[1],[0,0]]") from None
    return Tree(text).choices


def default_heads_for(cfg):
    """The shipped heads' directory when they were trained for this model (their heads.json names its shape)."""
    if not os.path.isdir(DEFAULT_HEADS):
        return None
    meta = read_json(os.path.join(DEFAULT_HEADS, "heads.json"))
    base = meta.get("base") or {"dim": meta.get("dim"), "vocab_size": meta.get("vocab_size")}
    return DEFAULT_HEADS if all(getattr(cfg, k, None) == v for k, v in base.items()) else None


def _run_cli(args):
    global EXACT
    tree = check_cli_args(args)
    torch.manual_seed(args.seed)
    EXACT = EXACT and not args.fast_kernels  # (the process's one model: the kernels are chosen before it runs)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model = load_model(args.checkpoint, args.device, dtype)
    tok = Tokenizer(args.checkpoint, model.cfg)
    heads = None
    if args.mode != "ar":
        heads_path = args.heads or default_heads_for(model.cfg)
        if heads_path:
            heads = load_heads(heads_path, model)
        elif args.mode in ("medusa", "hydra"):
            raise HydraLiteError(f"--mode {args.mode} needs --heads")
    if heads is not None and args.mode == "medusa" and heads.hc.grounded:
        raise HydraLiteError("--mode medusa needs Medusa heads; these are Hydra heads")
    if heads is not None and args.mode == "hydra" and not heads.hc.grounded:
        raise HydraLiteError("--mode hydra needs Hydra heads; these are Medusa heads")
    on_cpu = torch.device(args.device).type == "cpu"  # (a small tree there, and batches decoded plainly)
    sizes = dict(tree_nodes_by_batch=CPU_TREE_NODES_BY_BATCH) if on_cpu and tree is None else {}
    gen = Generator(model, tok, heads, tree, cuda_graphs=not args.no_cuda_graphs, acceptance=args.acceptance,
                    context_drafts=0 if args.mode == "ar" else args.context_drafts, dynamic=args.tree == "dynamic",
                    **sizes)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    if args.chat:
        return chat(gen, args, sampling)
    mode = "ar" if on_cpu and len(args.prompt) > 1 and args.mode is None else None
    if args.raw or model.cfg.chat_template == "none":
        prompts = [tok.encode(p, special=args.raw) for p in args.prompt]
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [tok.encode_chat(system + [{"role": "user", "content": p}]) for p in args.prompt]
    single = len(prompts) == 1
    outs, stats = gen.generate(prompts, args.max_new_tokens, sampling, mode=mode, stop=args.stop,
                               on_text=(lambda b, t: print(t, end="", flush=True)) if single else None)
    if not single:
        for i, ids in enumerate(outs):
            print(f"--- [{i}] {tok.decode(ids)}")
    print_stats("ar (on the CPU a batch decodes fastest plainly)" if mode == "ar" else gen.describe(len(prompts)), stats, args)
    return 0


def chat(gen, args, sampling):
    """Turns from the input, a line each; the answer streams, then its stats. The cache is kept between turns
    (only a new turn is prefilled). Ctrl-C stops an answer, not the chat; /reset, /quit."""
    conv, interactive = Conversation(gen, args.system), sys.stdin.isatty()
    if interactive:
        print("chat: type a message; /reset starts over, /quit ends; Ctrl-C stops an answer", file=sys.stderr)
    while True:
        try:
            text = input("> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):
            break
        except UnicodeDecodeError:
            print("error: that line is not valid UTF-8 text", file=sys.stderr)
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            conv.reset()
            continue
        if text:
            try:
                _, stats = conv.say(text, args.max_new_tokens, sampling, lambda b, t: print(t, end="", flush=True), args.stop)
                print_stats(gen.describe(1), stats, args)
            except GenerationInterrupted as e:
                print_stats("interrupted", e.stats, args)
            print(flush=True)
    return 0


def print_stats(mode, stats, args):
    print(f"\n[{mode}] {stats.prompt_tokens} prompt tokens, {stats.new_tokens} new tokens in {stats.decode_s:.2f}s: "
          f"{stats.tokens_per_s:.1f} tokens/s, {stats.steps} steps, mean acceptance length {stats.mean_accept:.2f} "
          f"(prefill {stats.prefill_s * 1000:.0f} ms, {args.device})", file=sys.stderr)
    if len(stats.batches) > 1:
        print(f"[the batch shrank as its answers ended: {' -> '.join(map(str, stats.batches))}]", file=sys.stderr)
    if stats.cut_short:
        rows = ", ".join(str(b + 1) for b in stats.cut_short)
        print(f"[answer {rows} stopped short of --max-new-tokens: the model's context is full]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
