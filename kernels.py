"""Triton kernels for hydra_lite.py: the hot paths of a Llama forward pass and of Hydra tree verification.

Each wrapper has the signature and semantics of its reference in hydra_lite.py ("Reference ops"), which is the
oracle the tests hold it to. Every wrapper is CUDA-graph safe: it never reads a device value on the host, grid
sizes and buffer shapes come from static shapes only.

    python benchmark.py check      # on a GPU: compare every kernel to its reference, then time both

Notes on the Triton interpreter (TRITON_INTERPRET=1, how the tests run these kernels on CPU tensors): it keeps
bfloat16 as raw uint16, so arithmetic (tl.dot included) on bf16 values is wrong there. The kernels therefore
convert to fp32 before any arithmetic, and the attention kernel takes an UPCAST flag that makes its matmuls fp32
(set for CPU tensors, fp32 inputs and mixed dtypes; on the GPU, bf16/fp16 inputs go to the tensor cores as they
are, fp32 ones use exact "ieee" products, not tf32).
"""
import math
import os

import torch
import triton
import triton.language as tl


class KernelInputError(ValueError):
    """Inputs a kernel cannot take (a shape or layout it does not support)."""


def _require(ok, message):
    if not ok:
        raise KernelInputError(message)


def _pow2(n, lo=1):
    return max(triton.next_power_of_2(n), lo)


def _rows(x, dim):
    """x [..., dim] -> a 2D view [rows, dim] with unit stride along dim (copies only if it has to)."""
    x2 = x.reshape(-1, dim)
    return x2 if x2.stride(1) == 1 else x2.contiguous()


# Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the kernel before it
# in the stream finishes, and waits (griddepcontrol.wait) for that kernel's results before it touches memory; each
# kernel lets the next one launch once all its programs have started. It hides the launch gap between the ~180
# kernels of a SmolLM2 step: 8-9% faster AR steps and batch-1 verification on an H200 (run 16), the same bits.
# On by default where it can run (HYDRA_LITE_PDL=0: off). Kernels that take part call _pdl_start first, before any
# load or store, and are launched with **_pdl(x).
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # (a Triton without grid dependency control)
    gdc_launch_dependents = gdc_wait = None
PDL = os.environ.get("HYDRA_LITE_PDL", "1") == "1"
# Only for calls of at most this many tokens (0: any). A large call's early-launched dependents hold SM slots while
# they wait, which its own programs need (a batch-8 verify got 6% slower with all calls taking part, run 16).
PDL_MAX_TOKENS = int(os.environ.get("HYDRA_LITE_PDL_MAX_TOKENS", "64"))
_PDL_DEVICES = {}  # device -> whether it can launch dependents early (compute capability 9+)


def _pdl(x, tokens=None):
    """The launch options for a kernel over x (tokens: how many it covers; default x's rows): dict(PDL=...) and,
    where it is on, launch_pdl=True."""
    tokens = x.numel() // max(x.shape[-1], 1) if tokens is None else tokens
    if not (PDL and x.is_cuda and gdc_wait is not None) or (PDL_MAX_TOKENS and tokens > PDL_MAX_TOKENS):
        return dict(PDL=False)
    if x.device not in _PDL_DEVICES:
        _PDL_DEVICES[x.device] = torch.cuda.get_device_capability(x.device)[0] >= 9
    return dict(PDL=True, launch_pdl=True) if _PDL_DEVICES[x.device] else dict(PDL=False)


@triton.jit
def _pdl_start(PDL: tl.constexpr):
    if PDL:
        gdc_wait()  # the previous kernel's writes are visible, and it no longer reads what this one may overwrite
        gdc_launch_dependents()


@triton.jit
def _all_padding(live_ptr, rows, M, T):
    """Whether none of `rows` (of M, in rows of T tokens: row r is token r % T of batch row r // T) is one of its
    batch row's live tokens (live_ptr[b]: how many; the rest are a prefill's padding, whose results nobody reads)."""
    live = tl.load(live_ptr + rows // T, mask=rows < M, other=0)
    return tl.max(((rows < M) & (rows % T < live)).to(tl.int32), axis=0) == 0


# ----------------------------------------------------------------------------------------------------------
# RMSNorm (+ residual add)


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, dim, eps, stride_x, stride_r,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
        s = (x + r).to(s_ptr.dtype.element_ty)  # the sum is rounded to the stream's dtype, as in torch
        tl.store(s_ptr + row * dim + cols, s, mask=ok)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    # Reference order: normalize in fp32, round to the input dtype, then multiply by w.
    y = (x * rstd).to(s_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * dim + cols, (y * w).to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm(x, w, eps, residual=None):
    dim = x.shape[-1]
    x2 = _rows(x, dim)
    sdtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    y = torch.empty(x.shape, dtype=torch.promote_types(sdtype, w.dtype), device=x.device)
    # Without a residual the "sum" is x itself: s_ptr only carries the dtype (never written).
    s = torch.empty(x.shape, dtype=sdtype, device=x.device) if residual is not None else x2
    r2 = _rows(residual, dim) if residual is not None else x2
    BLOCK = _pow2(dim, 16)
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, w.contiguous(), y, s, dim, eps, x2.stride(0), r2.stride(0),
                                     HAS_RES=residual is not None, BLOCK=BLOCK,
                                     num_warps=min(max(BLOCK // 512, 1), 16), **_pdl(x))
    return y if residual is None else (y, s)


# ----------------------------------------------------------------------------------------------------------
# SwiGLU


@triton.jit
def _silu_rounded(x, DT: tl.constexpr):
    """silu(x) in float32, rounded to DT as torch rounds F.silu's result in that dtype (the next op sees that)."""
    return (x / (1.0 + tl.exp(-x))).to(DT).to(tl.float32)


@triton.jit
def _swiglu_kernel(gu_ptr, out_ptr, H, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < H
    g = tl.load(gu_ptr + row * stride_row + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_row + H + cols, mask=ok, other=0.0).to(tl.float32)
    # torch rounds silu(gate) to the dtype before the product; do the same.
    a = _silu_rounded(g, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * H + cols, (a * u).to(out_ptr.dtype.element_ty), mask=ok)


def swiglu(gate_up):
    H = gate_up.shape[-1] // 2
    x2 = _rows(gate_up, 2 * H)
    out = torch.empty(*gate_up.shape[:-1], H, dtype=gate_up.dtype, device=gate_up.device)
    BLOCK = min(_pow2(H, 16), 1024)
    _swiglu_kernel[(x2.shape[0], triton.cdiv(H, BLOCK))](x2, out, H, x2.stride(0), BLOCK=BLOCK, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------------
# res + silu(z): the draft heads' residual blocks


@triton.jit
def _silu_add_kernel(r_ptr, z_ptr, o_ptr, dim, stride_r, stride_z, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < dim
    z = tl.load(z_ptr + row * stride_z + cols, mask=ok, other=0.0).to(tl.float32)
    # Round as the reference does: silu in z's dtype, then the sum in the output's.
    act = _silu_rounded(z, z_ptr.dtype.element_ty)
    r = tl.load(r_ptr + row * stride_r + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * dim + cols, (r + act).to(o_ptr.dtype.element_ty), mask=ok)


def silu_add(res, z):
    """res + silu(z). Rows may be strided (e.g. the two halves of one fused projection's output)."""
    _require(res.shape == z.shape, f"silu_add: res {tuple(res.shape)} and z {tuple(z.shape)} differ")
    dim = z.shape[-1]
    r2, z2 = _rows(res, dim), _rows(z, dim)
    out = torch.empty(z.shape, dtype=torch.promote_types(res.dtype, z.dtype), device=z.device)
    BLOCK = min(_pow2(dim, 16), 1024)
    _silu_add_kernel[(z2.shape[0], triton.cdiv(dim, BLOCK))](r2, z2, out, dim, r2.stride(0), z2.stride(0),
                                                             BLOCK=BLOCK, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------------
# The grounded heads' input: concat(h, embed(tokens on the path)) for every parent at one depth, in one pass
# (instead of an index, an embedding lookup, an expand and a cat).


@triton.jit
def _head_input_kernel(h_ptr, tok_ptr, path_ptr, emb_ptr, out_ptr, P, J, dim, stride_h, stride_tok, stride_e,
                       spb, spp, spl, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # (row b, parent p)
    b, p = pid // P, pid % P
    j = tl.program_id(1)  # segment: 0 = h, j > 0 = the embedding of the path's token j-1
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < dim
    if j == 0:
        x = tl.load(h_ptr + b * stride_h + cols, mask=ok, other=0.0)
    else:
        node = tl.load(path_ptr + b * spb + p * spp + (j - 1) * spl)  # (spb = 0: one path table for all rows)
        t = tl.load(tok_ptr + b * stride_tok + node)
        x = tl.load(emb_ptr + t * stride_e + cols, mask=ok, other=0.0)
    tl.store(out_ptr + (pid * J + j) * dim + cols, x.to(out_ptr.dtype.element_ty), mask=ok)


def head_input(h, tokens, path, embed_w):
    """See head_input_ref. path [P, L] (shared by all rows) or [B, P, L] (row b's own), any strides."""
    B, dim = h.shape
    P, L = path.shape[-2:]
    _require(path.dim() == 2 or (path.dim() == 3 and path.shape[0] == B),
             f"head_input: path {tuple(path.shape)} is neither [P, L] nor [{B}, P, L]")
    _require(embed_w.shape[1] == dim, f"head_input: embeddings of width {embed_w.shape[1]}, h of {dim}")
    _require(embed_w.stride(1) == 1 and h.stride(1) == 1 and tokens.stride(1) == 1, "head_input: rows must be contiguous")
    sp = path.stride() if path.dim() == 3 else (0, *path.stride())
    out = torch.empty(B, P, (L + 1) * dim, dtype=h.dtype, device=h.device)
    BLOCK = min(_pow2(dim, 16), 1024)
    _head_input_kernel[(B * P, L + 1, triton.cdiv(dim, BLOCK))](h, tokens, path, embed_w, out, P, L + 1, dim,
                                                                h.stride(0), tokens.stride(0), embed_w.stride(0), *sp,
                                                                BLOCK=BLOCK, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------------------
# Prompt lookup (context drafts): one program per row finds the latest longest earlier match of the text's last
# tokens and gathers the k tokens after it. One launch instead of the reference's dozens of small ops a step.


@triton.jit(do_not_specialize=["S"])
def _context_match_kernel(hist_ptr, lens_ptr, out_ptr, found_ptr, S, stride_h, K, NGRAM: tl.constexpr,
                          BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    row = hist_ptr + b * stride_h
    end = tl.load(lens_ptr + b).to(tl.int64)  # the root's slot
    best = tl.zeros([], dtype=tl.int64) - 1  # the best key so far: match length * S + where it ends (-1: none)
    for j0 in range(0, end, BLOCK):  # matches end before the root
        j = j0 + tl.arange(0, BLOCK)
        ok = j < end
        run = ok
        length = tl.zeros([BLOCK], dtype=tl.int64)
        for i in tl.static_range(NGRAM):  # the match grows backwards while it holds
            last = tl.load(row + tl.maximum(end - i, 0))  # the text's i-th last token
            # (before slot 0: -1, which no token equals; so past the text's start, i > end > j, nothing matches)
            earlier = tl.load(row + j - i, mask=ok & (j >= i), other=-1)
            run = run & (earlier == last)
            length += run.to(tl.int64)
        best = tl.maximum(best, tl.max(tl.where(ok, length * S + j, -1), axis=0))
    found = tl.where(best >= 0, best // S, 0)  # the match's length (0: not even the root occurred before)
    start = tl.where(found > 0, best % S, end - 1)  # none: the "continuation" is the root itself, repeated
    kk = tl.arange(0, BLOCK_K)
    tok = tl.load(row + start + 1 + kk % (end - start), mask=kk < K, other=0)  # (wraps around into the match)
    tl.store(out_ptr + b * K + kk, tok, mask=kk < K)
    tl.store(found_ptr + b, found)


def context_match(history, lens, k, ngram):
    """See context_match_ref: (the k tokens [B, k], the match length [B])."""
    B, S = history.shape
    _require(history.stride(1) == 1, "context_match: history rows must be contiguous")
    _require(lens.shape == (B,), f"context_match: lens {tuple(lens.shape)} for {B} rows")
    out = torch.empty(B, k, dtype=history.dtype, device=history.device)
    found = torch.empty(B, dtype=torch.long, device=history.device)
    _context_match_kernel[(B,)](history, lens, out, found, S, history.stride(0), k, NGRAM=ngram,
                                BLOCK=1024 if history.is_cuda else 64, BLOCK_K=_pow2(k), num_warps=4)
    return out, found


# ----------------------------------------------------------------------------------------------------------
# RoPE + KV cache write: one program per (row, token) rotates all q and k heads (cos/sin loaded once) and
# writes k and v into the cache.


@triton.jit
def _rope_cache_write_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, kc_ptr, vc_ptr, lens_ptr, qo_ptr,
                             T, Hq, Hkv, HALF, S,
                             sqb, sqt, sqh, sqd, skb, skt, skh, skd, svb, svt, svh, svd,
                             scos, spb, spt, sc_b, sc_s, sc_h, sc_d, sv_b, sv_s, sv_h, sv_d,
                             BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = pid % T
    i = tl.arange(0, BLOCK_HALF)
    ok_i = i < HALF
    p = tl.load(pos_ptr + b * spb + t * spt)
    c = tl.load(cos_ptr + p * scos + i, mask=ok_i, other=0.0)[None, :]
    s = tl.load(sin_ptr + p * scos + i, mask=ok_i, other=0.0)[None, :]

    # q: rotate-half, result into a fresh contiguous [B, T, Hq, D] tensor
    h = tl.arange(0, BLOCK_HQ)[:, None]
    ok = (h < Hq) & ok_i[None, :]
    src = q_ptr + b * sqb + t * sqt + h * sqh + i[None, :] * sqd
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF * sqd, mask=ok, other=0.0).to(tl.float32)
    dst = qo_ptr + ((b * T + t) * Hq + h) * (2 * HALF) + i[None, :]
    tl.store(dst, (x1 * c - x2 * s).to(qo_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(qo_ptr.dtype.element_ty), mask=ok)

    # k (rotated, rounded to k's dtype like the reference, then to the cache's) and v go to slot lens[b] + t
    slot = tl.load(lens_ptr + b) + t
    h = tl.arange(0, BLOCK_HKV)[:, None]
    ok = (h < Hkv) & ok_i[None, :] & (slot < S)
    src = k_ptr + b * skb + t * skt + h * skh + i[None, :] * skd
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF * skd, mask=ok, other=0.0).to(tl.float32)
    dst = kc_ptr + b * sc_b + slot * sc_s + h * sc_h + i[None, :] * sc_d
    tl.store(dst, (x1 * c - x2 * s).to(k_ptr.dtype.element_ty).to(kc_ptr.dtype.element_ty), mask=ok)
    tl.store(dst + HALF * sc_d, (x2 * c + x1 * s).to(k_ptr.dtype.element_ty).to(kc_ptr.dtype.element_ty), mask=ok)
    src = v_ptr + b * svb + t * svt + h * svh + i[None, :] * svd
    dst = vc_ptr + b * sv_b + slot * sv_s + h * sv_h + i[None, :] * sv_d
    for half in tl.static_range(2):  # v is copied in the same two halves, to reuse the tile shape
        x = tl.load(src + half * HALF * svd, mask=ok, other=0.0)
        tl.store(dst + half * HALF * sv_d, x.to(vc_ptr.dtype.element_ty), mask=ok)


def rope_cache_write(q, k, v, cos_table, sin_table, pos, k_cache, v_cache, lens):
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    _require(D % 2 == 0, f"rotate-half RoPE needs an even head_dim, not {D}")
    _require(cos_table.stride() == sin_table.stride() and cos_table.stride(1) == 1, "rope tables must be contiguous rows")
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lens = lens.contiguous()
    _rope_cache_write_kernel[(B * T,)](
        q, k, v, cos_table, sin_table, pos, k_cache, v_cache, lens, qo, T, Hq, Hkv, D // 2, k_cache.shape[1],
        *q.stride(), *k.stride(), *v.stride(), cos_table.stride(0), *pos.stride(), *k_cache.stride(), *v_cache.stride(),
        BLOCK_HQ=_pow2(Hq, 2), BLOCK_HKV=_pow2(Hkv, 2), BLOCK_HALF=_pow2(D // 2, 2), num_warps=4)
    return qo


# ----------------------------------------------------------------------------------------------------------
# Attention over the cache (prefill, tree verification and decoding share one kernel).
#
# A program takes one (token block, row b, kv head) and packs the REP = Hq/Hkv query heads of that kv head as
# rows of its tile: tile row m is token t0 + m // REP, query head kv_head*REP + m % REP. So K/V are read once
# per GQA group, and decoding (T=1) fills REP rows instead of wasting 15 of 16 per head.
# Keys of row b: slots 0 .. lens[b]+T-1. Slots < lens[b] are visible to all; new slot lens[b]+j is visible to
# token i iff mask[i, j] (causal without a mask), or mask[b, i, j] with one tree per row (a [B, T, T] mask; its
# batch stride smb may be 0, an expanded view; a [T, T] mask is passed with smb = 0). Online softmax in base 2
# with fp32 statistics.
# Split-K (flash-decoding): when the grid would not fill the GPU, a third grid axis cuts the slots into
# NUM_SPLITS chunks of SPLIT_LEN; each writes a partial output and its log-sum-exp, and _attn_combine_kernel
# merges them. The split count comes from static shapes (capacity S, not lens), so chunks past a row's keys
# just write an empty partial.


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PREC: tl.constexpr, BY_SUM: tl.constexpr):
    """a @ b in fp32. BY_SUM: the interpreter, whose tl.dot is numpy's matmul, and numpy's bits for a row may
    depend on where the row sits in the tile: a plain product-and-sum gives every row the same bits instead."""
    if BY_SUM:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    elif UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(a, b)


@triton.jit
def _attn_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, sks, svs, scale, offs_n, ok_d,
               lens, hi, t, mask_ptr, smq, smk, T,
               MASKED: tl.constexpr, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr):
    """One BLOCK_N slice of keys starting at slot `start`; MASKED: apply the cache/tree/causal visibility."""
    kk = start + offs_n  # [BLOCK_N] key slots
    if MASKED:
        ld_mask = (kk < hi)[:, None] & ok_d[None, :]
    else:
        ld_mask = ok_d[None, :]
    k = tl.load(k_ptrs + start * sks, mask=ld_mask, other=0.0)
    v = tl.load(v_ptrs + start * svs, mask=ld_mask, other=0.0)
    qk = _dot(q, tl.trans(k), UPCAST, PREC, False) * scale
    if MASKED:
        j = kk[None, :] - lens  # index among the new tokens (negative: an old cache slot)
        if HAS_MASK:
            new_ok = tl.load(mask_ptr + t[:, None] * smq + j * smk,
                             mask=(j >= 0) & (j < T) & (t[:, None] < T), other=0) != 0
        else:
            new_ok = (j >= 0) & (j <= t[:, None])
        visible = ((j < 0) | new_ok) & (kk[None, :] < hi)
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if UPCAST:  # p rounded as the GPU path rounds it (to the activations' dtype: a no-op for fp32 q)
        p = p.to(q.dtype)
    else:
        p = p.to(v.dtype)
    acc = acc * alpha[:, None] + _dot(p, v, UPCAST, PREC, False)
    return acc, m_new, l_i


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, mask_ptr, o_ptr, po_ptr, plse_ptr, live_ptr,
                 T, Hq, Hkv, D, scale, SPLIT_LEN, NUM_SPLITS,
                 sqb, sqt, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, smb, smq, smk,
                 REP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                 LIVE: tl.constexpr):
    TOK: tl.constexpr = BLOCK_M // REP  # tokens per tile
    pid_t = tl.program_id(0)
    b = (tl.program_id(1) // Hkv).to(tl.int64)
    kvh = tl.program_id(1) % Hkv
    split = tl.program_id(2)

    offs_m = tl.arange(0, BLOCK_M)
    t = pid_t * TOK + offs_m // REP  # [BLOCK_M] token of each tile row
    h = kvh * REP + offs_m % REP  # its query head
    row_ok = (offs_m < TOK * REP) & (t < T)
    offs_d = tl.arange(0, BLOCK_D)
    ok_d = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)

    q = tl.load(q_ptr + b * sqb + t[:, None] * sqt + h[:, None] * sqh + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & ok_d[None, :], other=0.0)

    lens = tl.load(lens_ptr + b)
    mask_ptr += b * smb  # row b's tree
    if HAS_MASK:
        hi = lens + T
    else:  # causal: nothing past the tile's last token
        hi = lens + tl.minimum(pid_t * TOK + TOK, T)
    lo = split * SPLIT_LEN
    hi = tl.minimum(hi, lo + SPLIT_LEN)
    if LIVE:  # a tile of a prefill's padding only: no key blocks (not an early return: that spilled on sm_90)
        hi = tl.where(pid_t * TOK >= tl.load(live_ptr + b), lo, hi)

    k_ptrs = k_ptr + b * skb + kvh * skh + offs_n[:, None] * sks + offs_d[None, :] * skd
    v_ptrs = v_ptr + b * svb + kvh * svh + offs_n[:, None] * svs + offs_d[None, :] * svd
    # Running max starts finite so that rows which see no key in this chunk give p = 0, not NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Whole blocks of old cache slots: every one is visible, no masking. Then the rest (the block that
    # straddles lens, the new tokens, the chunk's end) with masks.
    n_full = tl.maximum(tl.minimum(hi, lens) - lo, 0) // BLOCK_N
    mid = lo + n_full * BLOCK_N
    for start in range(lo, mid, BLOCK_N):
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, sks, svs, scale, offs_n, ok_d,
                                   lens, hi, t, mask_ptr, smq, smk, T,
                                   MASKED=False, HAS_MASK=HAS_MASK, UPCAST=UPCAST, PREC=PREC)
    for start in range(mid, hi, BLOCK_N):
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, k_ptrs, v_ptrs, start, sks, svs, scale, offs_n, ok_d,
                                   lens, hi, t, mask_ptr, smq, smk, T,
                                   MASKED=True, HAS_MASK=HAS_MASK, UPCAST=UPCAST, PREC=PREC)

    row = (b * T + t) * Hq + h  # [BLOCK_M] index into [B, T, Hq]
    st_mask = row_ok[:, None] & ok_d[None, :]
    if SPLIT:
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(plse_ptr + row * NUM_SPLITS + split, lse, mask=row_ok)
        tl.store(po_ptr + (row * NUM_SPLITS + split)[:, None] * D + offs_d[None, :], acc / l_safe[:, None],
                 mask=st_mask)
    else:
        # (a row that sees no key at all, e.g. an all-False mask row, gets 0 where the reference gives NaN)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o_ptr + row[:, None] * D + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=st_mask)


@triton.jit
def _attn_combine_kernel(po_ptr, plse_ptr, o_ptr, D, NUM_SPLITS, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(plse_ptr + row * NUM_SPLITS + s, mask=s < NUM_SPLITS, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))
    o = tl.load(po_ptr + (row * NUM_SPLITS + s)[:, None] * D + d[None, :],
                mask=(s < NUM_SPLITS)[:, None] & (d < D)[None, :], other=0.0)
    o = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(o_ptr + row * D + d, o.to(o_ptr.dtype.element_ty), mask=d < D)


_SM_COUNT = {}
# Split-K chunks hold at least this many cache slots (fewer: more programs, shorter loops, more partials to
# merge). Separately for decoding (T = 1) and for trees/prefill; HYDRA_LITE_SPLIT="decode,tree" overrides.
SPLIT_MIN = tuple(int(x) for x in os.environ.get("HYDRA_LITE_SPLIT", "256,64").split(","))


def _sm_count(device):
    if device.type != "cuda":
        return 1  # the interpreter: no split unless asked for
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _attention(q, k_cache, v_cache, lens, mask, num_splits=None, live=None):
    B, T, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    _require(Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    _require(D <= 256, f"head_dim {D} > 256 is not supported")
    REP = Hq // Hkv
    # Tile sizes measured on an H100 (bf16, lens ~2000): decoding wants wide key blocks; trees and prefill
    # want 64 rows and narrow key blocks (BLOCK_M=128 with 8 warps was 1.5-3x slower; so was BLOCK_N=128).
    BLOCK_D = _pow2(D, 16)
    if T == 1:  # decoding: one token, the GQA group's heads are the tile rows
        BLOCK_M, BLOCK_N = _pow2(REP, 16), (128 if BLOCK_D <= 64 else 64)
    else:
        BLOCK_M, BLOCK_N = _pow2(REP, 64), (64 if BLOCK_D <= 64 else 32)
    if not q.is_cuda:
        BLOCK_N = 32  # the interpreter: small tiles, less wasted work on tiny test shapes
    n_tblocks = triton.cdiv(T, BLOCK_M // REP)
    grid_2d = n_tblocks * B * Hkv
    if num_splits is None:  # split only when the grid is smaller than the GPU, into chunks of >= SPLIT_MIN slots
        sms = _sm_count(q.device)
        chunk = SPLIT_MIN[0 if T == 1 else 1]
        num_splits = min(triton.cdiv(S, chunk), triton.cdiv(sms, grid_2d)) if grid_2d < sms else 1
    split_len = triton.cdiv(triton.cdiv(S, max(num_splits, 1)), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(S, split_len)  # chunks are whole blocks, so fewer chunks may cover S

    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    split = num_splits > 1
    if split:
        po = torch.empty(B * T * Hq * num_splits * D, dtype=torch.float32, device=q.device)
        plse = torch.empty(B * T * Hq * num_splits, dtype=torch.float32, device=q.device)
    else:
        po = plse = out  # unused
    upcast = (not q.is_cuda) or q.dtype == torch.float32 or q.dtype != k_cache.dtype
    lens = lens.contiguous()
    m = mask if mask is not None else q  # unused when HAS_MASK is False
    if mask is None:
        sm = (0, 0, 0)
    else:
        _require(tuple(mask.shape) in ((T, T), (B, T, T)), f"attention: mask {tuple(mask.shape)} is neither [{T}, {T}] "
                 f"nor [{B}, {T}, {T}]")
        sm = mask.stride() if mask.dim() == 3 else (0, *mask.stride())
    num_warps = 8 if BLOCK_M >= 128 else 4  # (only REP > 64 gets here with 128 rows)
    _require(live is None or mask is None, "attention: live rows are for a causal prefill, not a tree")
    _attn_kernel[(n_tblocks, B * Hkv, num_splits)](
        q, k_cache, v_cache, lens, m, out, po, plse, _live_rows(live, q)[0], T, Hq, Hkv, D,
        1.0 / math.sqrt(D) * 1.4426950408889634,
        split_len, num_splits, *q.stride(), *k_cache.stride(), *v_cache.stride(), *sm,
        REP=REP, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HAS_MASK=mask is not None, SPLIT=split,
        UPCAST=upcast, PREC="ieee" if torch.float32 in (q.dtype, k_cache.dtype) else "tf32", LIVE=live is not None,
        num_warps=num_warps, num_stages=3)
    if split:
        _attn_combine_kernel[(B * T * Hq,)](po, plse, out, D, num_splits, BLOCK_S=_pow2(num_splits, 2),
                                            BLOCK_D=BLOCK_D, num_warps=4)
    return out


def tree_attention(q, k_cache, v_cache, lens, mask, num_splits=None, live=None):
    """Attention of T new tokens over their row's cache (see attention_ref). mask: [T, T] bool shared by all
    rows, [B, T, T] bool with row b's tree in mask[b] (any strides, e.g. an expanded view), or None = causal.
    num_splits: override the split-K heuristic (tests, tuning). live: a causal prefill's real tokens per row
    (int32 [B]): tiles of padding only are skipped (their outputs left unwritten)."""
    return _attention(q, k_cache, v_cache, lens, mask, num_splits, live)


def decode_attention(q, k_cache, v_cache, lens, num_splits=None):
    """T = 1: the new token at slot lens[b] sees slots 0 .. lens[b]."""
    _require(q.shape[1] == 1, f"decode_attention takes one token per row, not {q.shape[1]}")
    return _attention(q, k_cache, v_cache, lens, None, num_splits)


# ----------------------------------------------------------------------------------------------------------
# Batch-invariant kernels (bit-exact speculative decoding, issue 15). A token's result must be the same bits
# whether it came from a one-token step, a tree verification or another batch: so no tile size, split or
# reduction order may depend on how many rows a call has.
#
# path_attention: a token sees the cache slots 0 .. lens[b]-1, then its path's tree slots lens[b] + path[b, t, j]
# for j = 0 .. depth[b, t] (its ancestors from the root, then itself): n = lens + depth + 1 "virtual positions",
# reduced in blocks of BLOCK_N from position 0 and in splits of SPLIT_LEN from 0, whatever lens is. A one-token
# step (path [[0]], depth 0) reduces over the same virtual positions, block by block, as a tree node does once
# its path is accepted, in a tile of the same shape; the combine merges the used splits in order, one at a time.
# The tile's rows are GQA heads of TOK tokens. A block of BLOCK_N positions that lies below lens (cached slots
# only) is one key tile for all of them; a block that reaches past lens is done token by token, each with its own
# keys (its path), updating only that token's rows (the others keep their state bit for bit). An MMA row depends
# only on its own row of q and on the key tile, so each row gets the same bits either way: those of decoding.
# Grid axis 1 (axis 0: row and KV head): 2 programs per EDGE_TOK tokens (1 with PATH_PROGRAMS) for the (at most
# two) splits that reach lens, then n_tiles x GROUPS for the splits below lens (GROUPS = NUM_SPLITS unless
# PATH_PROGRAMS: one split each, those past lens idle). GROUPS, EDGE_TOK and the edge programs change how the
# work is shared out, not a row's bits: one token per program keeps a small batch's edge in parallel, a tile of
# tokens per program saves a large batch from reading the cached part of the edge split once per token.


@triton.jit
def _path_block(acc, m_i, l_i, q, k_base, v_base, slot, seen, rows, sks, svs, scale, ok_d,
                UPCAST: tl.constexpr, PREC: tl.constexpr, BY_SUM: tl.constexpr):
    """One block of virtual positions (key slots `slot`, columns `seen`) into the online softmax of the tile's
    rows where `rows`; the other rows keep their state, bit for bit."""
    ld = seen[:, None] & ok_d[None, :]
    k = tl.load(k_base + slot[:, None] * sks, mask=ld, other=0.0)
    qk = tl.where(seen[None, :], _dot(q, tl.trans(k), UPCAST, PREC, BY_SUM) * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_new = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_base + slot[:, None] * svs, mask=ld, other=0.0)
    if UPCAST:
        p = p.to(q.dtype).to(tl.float32)  # rounded as the GPU path rounds it
    else:
        p = p.to(v.dtype)
    acc_new = acc * alpha[:, None] + _dot(p, v, UPCAST, PREC, BY_SUM)
    return tl.where(rows[:, None], acc_new, acc), tl.where(rows, m_new, m_i), tl.where(rows, l_new, l_i)


@triton.jit
def _path_edge_token(acc, m_i, l_i, q, k_base, v_base, vp, j, lens, lo, b, t, n_t, row_t, row_ok, path_ptr, spb, spt,
                     spj, sks, svs, scale, ok_d, SPLIT_LEN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                     BY_SUM: tl.constexpr):
    """Token t's rows (row_t: each tile row's token) through a block that reaches past the cache, its keys at its
    path's slots there (n_t: the token's positions, 0 for none)."""
    seen = vp < tl.minimum(n_t, lo + SPLIT_LEN)
    node = tl.load(path_ptr + b * spb + t * spt + j * spj, mask=seen & (j >= 0), other=0)
    slot = tl.where(j >= 0, lens + node, vp).to(tl.int64)
    return _path_block(acc, m_i, l_i, q, k_base, v_base, slot, seen, row_ok & (row_t == t), sks, svs, scale, ok_d,
                       UPCAST, PREC, BY_SUM)


@triton.jit
def _path_edge_block(acc, m_i, l_i, q, k_base, v_base, start, lens, lo, b, t0, tok, row_ok, n_tok, depth_ptr, path_ptr,
                     sdb, sdt, spb, spt, spj, sks, svs, scale, ok_d, BLOCK_N: tl.constexpr, SPLIT_LEN: tl.constexpr,
                     UPCAST: tl.constexpr, PREC: tl.constexpr, BY_SUM: tl.constexpr):
    """A block that reaches past the cache, token by token over the tile's n_tok tokens (each token's rows only,
    the others kept bit for bit). (Side by side, each token from the block's incoming state, was the same bits
    and slower at batch 8: 1.61-1.74 ms against 1.53 for a verification step, run 25. By path, a chain's tokens
    in one MMA with the deepest one's keys, each row up to its own depth: the same bits, 210 registers against
    168, and slower: 1.55 / 1.96 ms against 1.44 / 1.80 at 1,024 / 2,048 cached, run 27.)"""
    vp = start + tl.arange(0, BLOCK_N)  # the block's virtual positions
    j = vp - lens  # >= 0: the j-th node of the token's path
    for g in range(0, n_tok):
        n_g = lens + tl.load(depth_ptr + b * sdb + (t0 + g) * sdt) + 1
        acc, m_i, l_i = _path_edge_token(acc, m_i, l_i, q, k_base, v_base, vp, j, lens, lo, b, t0 + g, n_g, tok + t0,
                                         row_ok, path_ptr, spb, spt, spj, sks, svs, scale, ok_d, SPLIT_LEN, UPCAST,
                                         PREC, BY_SUM)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["T"])
def _path_attn_kernel(q_ptr, k_ptr, v_ptr, lens_ptr, path_ptr, depth_ptr, po_ptr, plse_ptr, o_ptr, cnt_ptr,
                      T, Hq, Hkv, D, scale, NUM_SPLITS, N_EDGE, EDGE_TOK, GROUPS, EDGE_PROGS,
                      sqb, sqt, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, spb, spt, spj, sdb, sdt,
                      REP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      SPLIT_LEN: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BY_SUM: tl.constexpr,
                      MERGE: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    TOK: tl.constexpr = BLOCK_M // REP  # tokens per tile
    pid = tl.program_id(1)
    b = (tl.program_id(0) // Hkv).to(tl.int64)
    kvh = tl.program_id(0) % Hkv
    lens = tl.load(lens_ptr + b)
    # Programs below N_EDGE take the (at most two) splits that reach past the cache, lens' own and the next (a
    # path may cross into it): EDGE_PROGS 2, one each; 1, both. One past them takes the splits wholly below lens
    # of its group, every GROUPS-th of them. (Which program reduces a split is not in the split's bits.) The edge
    # programs, the longest, come first in the grid's order (axis 0 is the row and KV head), so that the GPU
    # starts them first and the short ones fill in around them.
    edge = pid < N_EDGE
    pid = tl.where(edge, pid, pid - N_EDGE)
    t0 = tl.where(edge, pid // EDGE_PROGS * EDGE_TOK, pid // GROUPS * TOK)
    first = tl.where(edge, lens // SPLIT_LEN + pid % EDGE_PROGS, pid % GROUPS)
    last = tl.where(edge, tl.minimum(first + 3 - EDGE_PROGS, NUM_SPLITS), lens // SPLIT_LEN)
    stride = tl.where(edge, 1, GROUPS)
    offs_m = tl.arange(0, BLOCK_M)
    tok = offs_m // REP  # each tile row's token (in the tile)
    row_ok = (tok < tl.where(edge, EDGE_TOK, TOK)) & (t0 + tok < T)
    depth = tl.load(depth_ptr + b * sdb + (t0 + tok) * sdt, mask=row_ok, other=0)
    h = kvh * REP + offs_m % REP
    offs_d = tl.arange(0, BLOCK_D)
    ok_d = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * sqb + (t0 + tok)[:, None] * sqt + h[:, None] * sqh + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & ok_d[None, :], other=0.0)
    k_base = k_ptr + b * skb + kvh * skh + offs_d[None, :] * skd
    v_base = v_ptr + b * svb + kvh * svh + offs_d[None, :] * svd
    n_tok = tl.minimum(T - t0, tl.where(edge, EDGE_TOK, TOK))
    for split in range(first, last, stride):
        lo = split * SPLIT_LEN
        n = tl.minimum(tl.where(row_ok, lens + depth + 1, 0), lo + SPLIT_LEN)  # each row's positions in the split
        hi = tl.max(n, axis=0)
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # The blocks in order, from two loops: those wholly below the cache length (one key tile for every token),
        # then those past it (token by token, each with its path's slots). Two loops, not one that branches per
        # block: a loop without a branch is software-pipelined (PATH_STAGES), the same blocks in the same order.
        shared_end = tl.minimum(hi, lo + tl.maximum(lens - lo, 0) // BLOCK_N * BLOCK_N)
        for start in range(lo, shared_end, BLOCK_N):
            vp = start + offs_n  # the block's virtual positions
            acc, m_i, l_i = _path_block(acc, m_i, l_i, q, k_base, v_base, vp.to(tl.int64), vp < hi, row_ok, sks, svs,
                                        scale, ok_d, UPCAST, PREC, BY_SUM)
        for start in tl.range(shared_end, hi, BLOCK_N, num_stages=1):  # (1-2 blocks: a prefetch buys nothing)
            acc, m_i, l_i = _path_edge_block(acc, m_i, l_i, q, k_base, v_base, start, lens, lo, b, t0, tok, row_ok,
                                             n_tok, depth_ptr, path_ptr, sdb, sdt, spb, spt, spj, sks, svs, scale,
                                             ok_d, BLOCK_N, SPLIT_LEN, UPCAST, PREC, BY_SUM)
        row = ((b * T + t0 + tok) * Hq + h) * NUM_SPLITS + split  # [BLOCK_M] into [B, T, Hq, NUM_SPLITS]
        used = row_ok & (lo < n)
        l_safe = tl.where(used, l_i, 1.0)
        tl.store(plse_ptr + row, m_i + tl.log2(l_safe), mask=used)
        tl.store(po_ptr + row[:, None] * D + offs_d[None, :], acc / l_safe[:, None], mask=used[:, None] & ok_d[None, :])
        if MERGE:  # the last of a row's splits to finish merges them all (no combine kernel)
            _merge_if_last(po_ptr, plse_ptr, o_ptr, cnt_ptr, (b * T + t0 + tok) * Hq + h, used,
                           tl.cdiv(lens + depth + 1, SPLIT_LEN), offs_d, ok_d, D, NUM_SPLITS, BLOCK_M, BLOCK_D)


@triton.jit
def _merge_if_last(po_ptr, plse_ptr, o_ptr, cnt_ptr, orow, used, need, offs_d, ok_d, D, NUM_SPLITS,
                   BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Count this program's splits in, per row (cnt_ptr: one int32 per output row, 0 between calls); a row whose
    count reaches `need` (its splits) here is merged by this program, exactly as _path_combine_kernel merges it,
    and its count goes back to 0. The barriers and the acquire-release count order the other programs' partials
    before the merge reads them (read past L1: .cg)."""
    tl.debug_barrier()  # this program's partials are all stored before its count says so
    old = tl.atomic_add(cnt_ptr + orow, 1, mask=used, sem="acq_rel")
    last = used & (old == need - 1)
    if tl.max(last.to(tl.int32), axis=0) > 0:
        tl.debug_barrier()
        prow = orow * NUM_SPLITS
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        for s in range(0, tl.max(tl.where(last, need, 0), axis=0)):  # (a max is the same in any order)
            m = tl.maximum(m, tl.load(plse_ptr + prow + s, mask=last & (s < need), other=float("-inf"),
                                      cache_modifier=".cg"))
        m = tl.where(last, m, 0.0)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        den = tl.zeros([BLOCK_M], dtype=tl.float32)
        for s in range(0, tl.max(tl.where(last, need, 0), axis=0)):  # in split order, as the combine kernel
            w, x = _path_split(po_ptr, plse_ptr, orow, offs_d, ok_d, m, s, last & (s < need), NUM_SPLITS, D)
            acc += w[:, None] * x
            den += w
        den = tl.where(last, den, 1.0)
        tl.store(o_ptr + orow[:, None] * D + offs_d[None, :], (acc / den[:, None]).to(o_ptr.dtype.element_ty),
                 mask=last[:, None] & ok_d[None, :])
        tl.store(cnt_ptr + orow, tl.zeros([BLOCK_M], dtype=tl.int32), mask=last)


@triton.jit(do_not_specialize=["T"])
def _path_combine_kernel(po_ptr, plse_ptr, lens_ptr, depth_ptr, o_ptr, T, Hq, D, NUM_SPLITS, sdb, sdt,
                         SPLIT_LEN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                         PDL: tl.constexpr):
    _pdl_start(PDL)
    t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = tl.load(lens_ptr + b) + tl.load(depth_ptr + b * sdb + t * sdt) + 1
    used = tl.cdiv(n, SPLIT_LEN)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    h_ok, d_ok = h < Hq, d < D
    ok = h_ok[:, None] & d_ok[None, :]
    row = (b * T + t) * Hq + h  # [BLOCK_H]
    s = tl.arange(0, BLOCK_S)
    lse = tl.load(plse_ptr + row[:, None] * NUM_SPLITS + s[None, :], mask=h_ok[:, None] & (s < used)[None, :],
                  other=float("-inf"))
    m = tl.where(h_ok, tl.max(lse, axis=1), 0.0)  # (a max is the same in any order: one load, no loop)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_H], dtype=tl.float32)
    # In split order, one at a time: the same sums for any number of splits after `used`. The loads come four
    # splits at a time (independent, so in flight together: a loop of one load each waited for each); a split
    # past `used` weighs exp2(-inf) = 0 and adds exact zeros, so the sums are those of a loop over `used`.
    for s0 in range(0, used, 4):
        w0, x0 = _path_split(po_ptr, plse_ptr, row, d, d_ok, m, s0, h_ok & (s0 < used), NUM_SPLITS, D)
        w1, x1 = _path_split(po_ptr, plse_ptr, row, d, d_ok, m, s0 + 1, h_ok & (s0 + 1 < used), NUM_SPLITS, D)
        w2, x2 = _path_split(po_ptr, plse_ptr, row, d, d_ok, m, s0 + 2, h_ok & (s0 + 2 < used), NUM_SPLITS, D)
        w3, x3 = _path_split(po_ptr, plse_ptr, row, d, d_ok, m, s0 + 3, h_ok & (s0 + 3 < used), NUM_SPLITS, D)
        acc += w0[:, None] * x0
        den += w0
        acc += w1[:, None] * x1
        den += w1
        acc += w2[:, None] * x2
        den += w2
        acc += w3[:, None] * x3
        den += w3
    tl.store(o_ptr + row[:, None] * D + d[None, :], (acc / den[:, None]).to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _path_split(po_ptr, plse_ptr, row, d, d_ok, m, s, here, NUM_SPLITS, D):
    """Split s's weight exp2(lse - m) and partial output for each output row `row` where `here` (the row is
    merged and has a split s), else 0 and zeros. Read past L1 (.cg): the in-kernel merge reads partials that
    other programs wrote during the same kernel."""
    w = tl.exp2(tl.load(plse_ptr + row * NUM_SPLITS + s, mask=here, other=float("-inf"), cache_modifier=".cg") - m)
    x = tl.load(po_ptr + (row * NUM_SPLITS + s)[:, None] * D + d[None, :], mask=here[:, None] & d_ok[None, :],
                other=0.0, cache_modifier=".cg")
    return w, x


# Both are constants: splits and tiles must not depend on the batch or the grid. Measured on an H200 (SmolLM2,
# `benchmark.py steps --path-tiles`, BENCHMARKS.md run 14): 16 rows x 256 positions verifies a 64-node tree at
# batch 8 in 2.45 ms, against 3.06 ms with 64 x 128, and steps about as fast (1.23 vs 1.21 ms). Fewer rows waste
# less of a decode step's tile (3 rows of 16, not 64). Longer splits mean fewer partials for the combine.
PATH_SPLIT_LEN = int(os.environ.get("HYDRA_LITE_PATH_SPLIT_LEN", "256"))  # virtual positions per split (x 64)
PATH_TILE_ROWS = int(os.environ.get("HYDRA_LITE_PATH_TILE_ROWS", "16"))  # tile rows (tokens x GQA heads) on the GPU,
# for every call. (Run 25, 64 rows: verification 5-7% faster at batches 1 and 8, AR steps 4-5% slower; to time end
# to end with the split length.)
# The last program of a row's splits merges them (an atomic count per row) instead of a combine kernel: one launch
# less a layer, the same bits. Off until checked and timed on a GPU (HYDRA_LITE_PATH_MERGE=1; issue 15).
# Tokens per program for the splits that reach lens (see the note above); 0: by batch, 1 at batch 1, else 3. Run 25
# (H200, SmolLM2 shape, 1,024 cached tokens): batch-8 verification (16 nodes + a 10-token chain) 1.79 / 1.59 / 1.54
# / 1.56 ms with 1 / 2 / 3 / 5 (a tile's) tokens a program; end to end at batch 8 (60 held-out prompts), 3 tokens
# +4% tokens/s over 5 (2: +2%); at batch 1, 1 token (3: -6%).
PATH_EDGE_TOKENS = int(os.environ.get("HYDRA_LITE_PATH_EDGE_TOKENS", "0"))
PATH_MERGE_IN_KERNEL = os.environ.get("HYDRA_LITE_PATH_MERGE", "0") == "1"
# The merge in the kernel for decode steps only (T = 1): 30 combine launches fewer a step, where a row has only a
# few splits to merge (the same bits either way). Off until timed (issue 14).
PATH_MERGE_DECODE = os.environ.get("HYDRA_LITE_PATH_MERGE_DECODE", "0") == "1"
# Programs for the splits wholly below the cache length, about (0: one per split and tile, as many as the cache
# has splits, most of them past lens and idle: 4,700 of a batch-8 verification's 5,600 with 16 splits). With N,
# each program takes every G-th split of its tile, G = splits x tiles / N at most, and one program per edge
# group takes both edge splits (the second is idle unless a path crosses into it): the same partials, bit for
# bit (a split is reduced alike whichever program does it), from fewer launches. Trees only (T > 1): run 18
# (H200, random SmolLM2 weights, context 512), ~1056 programs: verification 1.13 vs 1.22 ms at batch 1, 2.05 vs
# 2.25 ms at batch 8; a decode step 1.07 vs 1.03 ms at batch 1 (its 9 heads x 2 splits are few programs anyway).
# Run 26 (SmolLM2 shape, batch-8 tree of 216 tokens): ~528 verify in 1.485 / 1.810 ms with 1,024 / 2,048 cached
# against 1.545 / 1.891 with ~1056 (~2112: 1.609 / 1.925); batch 1 the same; end to end (60 prompts) batch 8 +1.4%.
PATH_PROGRAMS = int(os.environ.get("HYDRA_LITE_PATH_PROGRAMS", "528"))
# Warps per path_attention program. Constant for every call, like the tiles: the row reductions of the online
# softmax are laid out by warps, so decoding and verification must share it. 4 until others are timed (issue 15).
PATH_WARPS = int(os.environ.get("HYDRA_LITE_PATH_WARPS", "4"))
# Pipeline stages of path_attention's loop over the key blocks below the cache length: loads in flight, not the
# order of the reduction (the same bits). Run 20 (H200, random SmolLM2 weights, context 512), ms with 2 / 3 / 4:
# AR step b1 0.881 / 0.838 / 0.835, verify-64 b1 1.014 / 1.004 / 1.016, b8 AR 0.981 / 0.890 / 0.896, b8 verify
# 2.062 / 2.058 / 2.132 (the one branching loop before: 0.912, 1.083, 1.006, 2.167). On the 7B shape 3 stages
# verify 5% slower than 2 (7.12 vs 6.84 ms; AR 5.33 vs 5.34): 3, for the model we ship.
PATH_STAGES = int(os.environ.get("HYDRA_LITE_PATH_STAGES", "3"))
_MERGE_COUNTS = {}  # device -> int32 counts, one per output row, all 0 between calls (each merge resets its rows)
_DECODE_PATH = {}  # device -> the one-token path ([[[0]]], depth [[0]]): a decode step is a one-node tree


def _merge_counts(device, n):
    """The merge's per-row counts: zeros, kept (a graph replays with the same buffer), grown to a power of two."""
    counts = _MERGE_COUNTS.get(device)
    if counts is None or counts.numel() < n:
        counts = _MERGE_COUNTS[device] = torch.zeros(max(1 << (n - 1).bit_length(), 1 << 16), dtype=torch.int32,
                                                     device=device)
    return counts


def path_attention(q, k_cache, v_cache, lens, path=None, depth=None):
    """Batch-invariant attention for decoding and tree verification (see the note above and path_attention_ref):
    q [B, T, Hq, D]; path [B, T, D1] (node indices from the root, any strides, e.g. an expanded view) and
    depth [B, T]; path None: one token per row (decoding)."""
    B, T, Hq, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    _require(Hq % Hkv == 0, f"Hq={Hq} is not a multiple of Hkv={Hkv}")
    _require(D <= 256, f"head_dim {D} > 256 is not supported")
    if path is None:
        _require(T == 1, f"path_attention without a path takes one token per row, not {T}")
        if q.device not in _DECODE_PATH:
            _DECODE_PATH[q.device] = torch.zeros(1, 1, 1, dtype=torch.long, device=q.device)
        path = _DECODE_PATH[q.device].expand(B, 1, 1)
        depth = path[:, :, 0]
    _require(path.dim() == 3 and tuple(path.shape[:2]) == (B, T) and tuple(depth.shape) == (B, T),
             f"path_attention: path {tuple(path.shape)} / depth {tuple(depth.shape)} do not fit q {tuple(q.shape)}")
    REP = Hq // Hkv
    # One tile shape for every call (decoding's one token in a tile of PATH_TILE_ROWS rows too: the same MMA
    # instructions; trees in wider tiles of their own, their rows summed by MMA, verified long caches faster and
    # were slower end to end: run 27).
    BLOCK_M, BLOCK_N, BLOCK_D = _pow2(REP, PATH_TILE_ROWS), 64, _pow2(D, 16)
    if not q.is_cuda:
        BLOCK_M, BLOCK_N = _pow2(REP, 16), 32  # the interpreter: small tiles
    _require(PATH_SPLIT_LEN % BLOCK_N == 0, f"PATH_SPLIT_LEN={PATH_SPLIT_LEN} is not a multiple of {BLOCK_N}")
    _require(path.shape[2] <= PATH_SPLIT_LEN, f"path_attention: paths of {path.shape[2]} nodes (at most {PATH_SPLIT_LEN})")
    num_splits = triton.cdiv(S, PATH_SPLIT_LEN)
    n_tiles = triton.cdiv(T, BLOCK_M // REP)
    programs = PATH_PROGRAMS if T > 1 else 0
    groups = num_splits if not programs else max(1, min(num_splits, triton.cdiv(programs, n_tiles * B * Hkv)))
    edge_progs = 1 if programs else 2
    edge_tok = min(PATH_EDGE_TOKENS or (1 if B == 1 else 3), BLOCK_M // REP)
    n_edge = edge_progs * triton.cdiv(T, edge_tok)
    _require(n_edge + n_tiles * groups < 65536, f"path_attention: {T} tokens over {S} cache slots need "
             f"{n_edge + n_tiles * groups} programs a row (at most 65,535: set HYDRA_LITE_PATH_PROGRAMS)")
    po = torch.empty(B * T * Hq * num_splits * D, dtype=torch.float32, device=q.device)
    plse = torch.empty(B * T * Hq * num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    upcast = (not q.is_cuda) or q.dtype == torch.float32 or q.dtype != k_cache.dtype
    lens = lens.contiguous()
    merge = PATH_MERGE_IN_KERNEL or (PATH_MERGE_DECODE and T == 1)
    counts = _merge_counts(q.device, B * T * Hq) if merge else lens  # (unused without the merge)
    _path_attn_kernel[(B * Hkv, n_edge + n_tiles * groups)](
        q, k_cache, v_cache, lens, path, depth, po, plse, out, counts, T, Hq, Hkv, D,
        1.0 / math.sqrt(D) * 1.4426950408889634, num_splits, n_edge, edge_tok, groups, edge_progs,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *path.stride(), *depth.stride(),
        REP=REP, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, SPLIT_LEN=PATH_SPLIT_LEN, UPCAST=upcast,
        PREC="ieee" if torch.float32 in (q.dtype, k_cache.dtype) else "tf32", BY_SUM=not q.is_cuda,
        MERGE=merge, num_warps=PATH_WARPS, num_stages=PATH_STAGES, **_pdl(q, B * T))
    if merge:
        return out
    _path_combine_kernel[(T, B)](po, plse, lens, depth, out, T, Hq, D, num_splits, *depth.stride(),
                                 SPLIT_LEN=PATH_SPLIT_LEN, BLOCK_H=_pow2(Hq, 2), BLOCK_D=BLOCK_D,
                                 BLOCK_S=_pow2(num_splits, 2), num_warps=4, **_pdl(q, B * T))
    return out


# matmul: y = x @ w.T (+ bias) with one tile shape per (N, K), whatever the number of rows M (cuBLAS picks its
# algorithm, and split-K, by M: the same row gets different bits in a 1-row step and a 74-row verification).
# Every row is reduced over K in BLOCK_K steps, in order, in fp32, by the same MMA instructions.


@triton.jit
def _mma(acc, x, w, UPCAST: tl.constexpr, PREC: tl.constexpr, BY_SUM: tl.constexpr):
    if BY_SUM or UPCAST:
        return acc + _dot(x, w, UPCAST, PREC, BY_SUM)
    return tl.dot(x, w, acc)  # (accumulating inside the MMA)


@triton.jit
def _row_sumsq(x_ptr, rm, M, K, sxm, sxk, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each row's sum of squares (RMSNorm's), BLOCK_K columns at a time, in order. A loop of its own: summed
    inside the matmul's pipelined loop, the tile raced the next load into the same buffer (H200, num_stages 2-3:
    wrong and varying sums)."""
    rk = tl.arange(0, BLOCK_K)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * sxm + (k0 + rk)[None, :] * sxk,
                    mask=(rm < M)[:, None] & (rk < K - k0)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(x * x, axis=1)
    return ss


@triton.jit
def _rows_times_w(x_ptr, w_ptr, rm, wa, wb, n_ok, M, K, sxm, sxk, swn, swk,
                  TWO: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                  BY_SUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[rm] @ w[wa].T and (TWO) x[rm] @ w[wb].T in fp32 [BLOCK_M, BLOCK_N], reduced over K in BLOCK_K steps, in
    order, from one read of x. x goes into the MMA as loaded: a prologue on its tile (64 rows, most of them
    padding in a decode step) costs more than the weight read it would hide behind."""
    rk = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :] * sxk
    wa_ptrs = w_ptr + wa[None, :].to(tl.int64) * swn + rk[:, None] * swk
    wb_ptrs = w_ptr + wb[None, :].to(tl.int64) * swn + rk[:, None] * swk
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = rk < K - k0
        x = tl.load(x_ptrs + k0 * sxk, mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
        w_ok = k_ok[:, None] & n_ok[None, :]
        acc_a = _mma(acc_a, x, tl.load(wa_ptrs + k0 * swk, mask=w_ok, other=0.0), UPCAST, PREC, BY_SUM)
        if TWO:
            acc_b = _mma(acc_b, x, tl.load(wb_ptrs + k0 * swk, mask=w_ok, other=0.0), UPCAST, PREC, BY_SUM)
    return acc_a, acc_b


@triton.jit
def _rms_scale(x_ptr, ss_ptr, rm, M, K, P, sxm, sxk, eps, SS_IN: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr):
    """Each row's 1/RMS: from the P partial sums of squares [M, P] that the kernel which wrote x left, added in
    one fixed order (SS_IN), else summed over x."""
    if SS_IN:
        rp = tl.arange(0, BLOCK_P)
        parts = tl.load(ss_ptr + rm[:, None].to(tl.int64) * P + rp[None, :], mask=(rm < M)[:, None] & (rp < P)[None, :],
                        other=0.0)
        ss = tl.sum(parts, axis=1)
    else:
        ss = _row_sumsq(x_ptr, rm, M, K, sxm, sxk, BLOCK_M, BLOCK_K)
    return 1.0 / tl.sqrt(ss / K + eps)


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, ssi_ptr, sso_ptr, live_ptr, M, N, K, P, T, sxm, sxk, swn, swk,
                   srm, eps,
                   HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr, SILU_ADD: tl.constexpr,
                   RESIDUAL: tl.constexpr,
                   SS_IN: tl.constexpr, SS_OUT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                   BY_SUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_P: tl.constexpr, LIVE: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    # Row blocks on axis 0: the programs that read one slice of w run side by side (rereads hit L2).
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if LIVE:  # a block of a prefill's padding only: nothing to compute
        if _all_padding(live_ptr, rm, M, T):
            return
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rstd = tl.zeros([BLOCK_M], dtype=tl.float32)  # (unused without NORM)
    if NORM:  # RMSNorm's 1/RMS, per row (its weight is in w's columns)
        rstd = _rms_scale(x_ptr, ssi_ptr, rm, M, K, P, sxm, sxk, eps, SS_IN, BLOCK_M, BLOCK_K, BLOCK_P)
    acc, up = _rows_times_w(x_ptr, w_ptr, rm, rn, N + rn, rn < N, M, K, sxm, sxk, swn, swk,
                            SWIGLU or SILU_ADD, UPCAST, PREC, BY_SUM, BLOCK_M, BLOCK_N, BLOCK_K)
    if NORM:
        acc, up = acc * rstd[:, None], up * rstd[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if SILU_ADD:
            up += tl.load(b_ptr + N + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    out_dt = y_ptr.dtype.element_ty
    if SILU_ADD:  # r + silu(z) (rows N + rn of w), each rounded as the unfused Linear and silu_add round them
        z = up.to(out_dt).to(tl.float32)
        acc = acc.to(out_dt).to(tl.float32) + _silu_rounded(z, out_dt)
    if SWIGLU:  # silu(gate) * up (rows N + rn of w), each rounded as the unfused ops round them
        g = acc.to(out_dt).to(tl.float32)
        a = _silu_rounded(g, out_dt)
        acc = a * up.to(out_dt).to(tl.float32)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    if RESIDUAL:  # residual + the product, which is rounded first (as a separate add would see it)
        r = tl.load(r_ptr + rm[:, None].to(tl.int64) * srm + rn[None, :], mask=ok, other=0.0).to(tl.float32)
        acc = acc.to(out_dt).to(tl.float32) + r
    y = acc.to(out_dt)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], y, mask=ok)
    if SS_OUT:  # this block's share of each output row's sum of squares, for the next norm (_rms_scale)
        yf = tl.where(ok, y.to(tl.float32), 0.0)
        tl.store(sso_ptr + rm.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), tl.sum(yf * yf, axis=1), mask=rm < M)


# Outputs this wide or wider take 64 columns a program (below: 32). A decode step's matmul is a read of w spread
# over N / BLOCK_N programs: at N = 4096 (a 7B model's attention output and down projection) 64 of them leave
# half of an H100's SMs idle; 4097 gives those 128. Per (N, K), so a row's bits still do not depend on M.
MATMUL_WIDE_N = int(os.environ.get("HYDRA_LITE_MATMUL_WIDE_N", "4096"))


# Wider K steps (0: 128 where K allows, else 64): a decode step's matmul reads a narrow slice of w in K / BLOCK_K
# steps one after another, so fewer, longer steps cut its latency. Per K, so a row's bits still do not depend on M.
MATMUL_K_TILE = int(os.environ.get("HYDRA_LITE_MATMUL_K_TILE", "0"))


# Pipeline stages of the matmuls (0: by BLOCK_K, below). Run 18 (H200, random SmolLM2 weights, context 512): 4
# stages made the AR step 0.91 vs 1.03 ms at batch 1 and 0.95 vs 1.07 at batch 8, a 64-node verification 0.98 vs
# 1.10, batch-8 verification 2.06 vs 2.01; 5 stages 0.88 / 0.91 / 0.95 / 2.20. Run 19 checked 4 against the
# reference and in the GPU tests with the real model (a pipelined loop once raced: _row_sumsq), so 4 is the default.
MATMUL_STAGES = int(os.environ.get("HYDRA_LITE_MATMUL_STAGES", "0"))


def _matmul_stages(BLOCK_K):
    """Software-pipeline stages that keep a tile's loads in shared memory (x: 64 rows, w: up to two 64-column
    slices, BLOCK_K wide): loads in flight, which a decode step's short K loop waits on (run 18: K steps of 256 in
    2 stages were 25% slower than steps of 64 in 3; run 19: 4 stages against 3, AR step 0.90 against 1.06 ms,
    7B 5.49 against 5.69; 5 stages no better)."""
    return MATMUL_STAGES or (4 if BLOCK_K <= 128 else 2 if BLOCK_K <= 256 else 1)


def _matmul_tiles(N, K, cuda):
    """(BLOCK_M, BLOCK_N, BLOCK_K) of a matmul, one per (N, K) whatever M: 64 rows (Hopper's wgmma; a decode
    step's one row pays for 64, which a memory-bound step hides), narrow column blocks where N is small so that
    more programs share the read of w. (128 x 64 tiles from 256 rows made batch-8 verification slower, 2.35 vs
    2.25 ms: BENCHMARKS.md run 17.)"""
    if not cuda:
        return 64, 64, 64  # (the interpreter: few, large programs)
    BLOCK_N = 16 if N <= 1024 else 32 if N < MATMUL_WIDE_N else 64
    BLOCK_K = min(MATMUL_K_TILE, triton.next_power_of_2(K)) if MATMUL_K_TILE else 128 if K % 128 == 0 else 64
    while (64 + 2 * BLOCK_N) * BLOCK_K * 2 * _matmul_stages(BLOCK_K) > 200 * 1024:  # (shared memory: x, two w slices)
        BLOCK_K //= 2
    return 64, BLOCK_N, BLOCK_K


def _sumsq_in(sumsq, M, device):
    """(tensor, P, BLOCK_P) for a kernel's SS_IN: the writer's partial sums of squares [..., P], or a stand-in."""
    if sumsq is None:
        return torch.empty(1, dtype=torch.float32, device=device), 1, 1
    parts = sumsq.reshape(M, -1)
    _require(parts.dtype == torch.float32, f"sums of squares must be float32, not {parts.dtype}")
    return parts.contiguous(), parts.shape[1], triton.next_power_of_2(parts.shape[1])


def matmul(x, w, bias=None, rms_eps=None, residual=None, swiglu=False, sumsq=None, sumsq_out=False, silu_add=False,
           live=None):
    """Batch-invariant x @ w.T (+ bias), as F.linear: x [..., K], w [N, K] -> [..., N] in x's dtype. Fused on
    request (see matmul_ref): rms_eps: RMSNorm of x's rows first, its weight folded into w's columns (fold_norm),
    its scale from x's rows or from sumsq [..., P], the partial sums of squares that the matmul which wrote x left
    (sumsq_out); swiglu: w holds gate and up ([2H, K]) and the result is silu(gate) * up [..., H]; residual
    [..., N]: added to the result. sumsq_out: returns (y, the partial sums of squares of y's rows [..., P']).
    silu_add: w and bias stack r and z ([2N, K], [2N]) and the result is r + silu(z) [..., N]. live: x [B, T, K]
    is a prefill and live [B] (int32) its rows' real tokens: blocks of padding only are skipped (their outputs
    are left unwritten)."""
    K = x.shape[-1]
    _require(w.dim() == 2 and w.shape[1] == K, f"matmul: weight {tuple(w.shape)} does not take inputs of width {K}")
    _require(not swiglu or w.shape[0] % 2 == 0, f"matmul: swiglu needs an even number of weight rows, not {w.shape[0]}")
    _require(not (swiglu and bias is not None), "matmul: swiglu with a bias is not supported")
    _require(not (silu_add and (swiglu or rms_eps is not None or residual is not None or sumsq_out)),
             "matmul: silu_add goes with no other fusion")
    _require(not silu_add or (w.shape[0] % 2 == 0 and (bias is None or bias.shape == (w.shape[0],))),
             f"matmul: silu_add needs an even number of weight rows and a bias for each, not {tuple(w.shape)}")
    N = w.shape[0] // 2 if swiglu or silu_add else w.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    if residual is not None:
        _require(residual.shape == y.shape, f"matmul: residual {tuple(residual.shape)} does not fit the output {tuple(y.shape)}")
        r2 = residual.reshape(M, N)
        r2 = r2 if r2.stride(1) == 1 else r2.contiguous()
    else:
        r2 = y  # unused
    BLOCK_M, BLOCK_N, BLOCK_K = _matmul_tiles(N, K, x.is_cuda)
    upcast = (not x.is_cuda) or torch.float32 in (x.dtype, w.dtype) or x.dtype != w.dtype
    b = bias.contiguous() if bias is not None else w  # unused without a bias
    ss_in, P, BLOCK_P = _sumsq_in(sumsq if rms_eps is not None else None, M, x.device)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    ss_out = torch.empty(*x.shape[:-1], grid[1], dtype=torch.float32, device=x.device) if sumsq_out else ss_in
    live_ptr, T = _live_rows(live, x)
    _matmul_kernel[grid](
        x2, w, b, y, r2, ss_in, ss_out, live_ptr, M, N, K, P, T, *x2.stride(), *w.stride(), r2.stride(0),
        0.0 if rms_eps is None else rms_eps, HAS_BIAS=bias is not None, NORM=rms_eps is not None, SWIGLU=swiglu,
        SILU_ADD=silu_add,
        RESIDUAL=residual is not None, SS_IN=rms_eps is not None and sumsq is not None, SS_OUT=sumsq_out,
        UPCAST=upcast, BY_SUM=not x.is_cuda, PREC="ieee" if torch.float32 in (x.dtype, w.dtype) else "tf32",
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_P=BLOCK_P, LIVE=live is not None, num_warps=4,
        num_stages=_matmul_stages(BLOCK_K), **_pdl(x))
    return (y, ss_out) if sumsq_out else y


def _live_rows(live, x):
    """(pointer, T) for a kernel's LIVE: the real tokens per batch row of x [B, T, ...], or a stand-in."""
    if live is None:
        return x, 1
    _require(x.dim() >= 3 and tuple(live.shape) == (x.shape[0],) and live.dtype == torch.int32,
             f"live: int32 [{x.shape[0]}] for x {tuple(x.shape)}, not {live.dtype} {tuple(live.shape)}")
    return live, x.shape[1]


# qkv_rope: a decoder layer's first matmul with what follows it: RMSNorm(x) @ wqkv.T (the norm's weight folded
# into wqkv), then RoPE on q and k, k and
# v written into the cache at slot lens[b] + t, rotated q returned. Columns go in pairs (j, j + D/2) of one head,
# the two halves that rotate-half RoPE mixes: a program holds BLOCK_N pairs, as two accumulators.


@triton.jit(do_not_specialize=["M", "T"])
def _qkv_rope_kernel(x_ptr, w_ptr, ss_ptr, cos_ptr, sin_ptr, pos_ptr, lens_ptr, q_ptr, kc_ptr, vc_ptr, live_ptr,
                     M, T, K, P, Hq, Hkv, HALF, S, sxm, sxk, swn, swk, eps, scos, spb, spt,
                     sc_b, sc_s, sc_h, sc_d, sv_b, sv_s, sv_h, sv_d, SS_IN: tl.constexpr,
                     UPCAST: tl.constexpr, PREC: tl.constexpr, BY_SUM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                     LIVE: tl.constexpr, PDL: tl.constexpr):
    _pdl_start(PDL)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    if LIVE:  # a block of a prefill's padding only: nothing to compute
        if _all_padding(live_ptr, rm, M, T):
            return
    pair = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (head, j): columns head*D + j and + HALF
    head, j = pair // HALF, pair % HALF
    n_ok = head < Hq + 2 * Hkv
    col = head * 2 * HALF + j
    rstd = _rms_scale(x_ptr, ss_ptr, rm, M, K, P, sxm, sxk, eps, SS_IN, BLOCK_M, BLOCK_K, BLOCK_P)[:, None]
    x1, x2 = _rows_times_w(x_ptr, w_ptr, rm, col, col + HALF, n_ok, M, K, sxm, sxk, swn, swk,
                           True, UPCAST, PREC, BY_SUM, BLOCK_M, BLOCK_N, BLOCK_K)
    dt = q_ptr.dtype.element_ty
    x1, x2 = (x1 * rstd).to(dt).to(tl.float32), (x2 * rstd).to(dt).to(tl.float32)  # the projection's outputs, rounded
    b, t = (rm // T).to(tl.int64), rm % T
    m_ok = rm < M
    p = tl.load(pos_ptr + b * spb + t * spt, mask=m_ok, other=0)
    c = tl.load(cos_ptr + p[:, None] * scos + j[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    sn = tl.load(sin_ptr + p[:, None] * scos + j[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    is_v = (head >= Hq + Hkv)[None, :]
    r1 = tl.where(is_v, x1, x1 * c - x2 * sn).to(dt)  # v is not rotated
    r2 = tl.where(is_v, x2, x2 * c + x1 * sn).to(dt)
    is_q = head < Hq
    ok = m_ok[:, None] & (is_q & n_ok)[None, :]
    dst = q_ptr + ((b * T + t)[:, None] * Hq + head[None, :]) * (2 * HALF) + j[None, :]
    tl.store(dst, r1, mask=ok)
    tl.store(dst + HALF, r2, mask=ok)
    slot = tl.load(lens_ptr + b, mask=m_ok, other=0) + t
    ok_kv = m_ok[:, None] & (slot < S)[:, None] & (~is_q & n_ok)[None, :]
    kvh = tl.where(is_q, 0, (head - Hq) % Hkv)[None, :]
    dst_k = kc_ptr + b[:, None] * sc_b + slot[:, None] * sc_s + kvh * sc_h + j[None, :] * sc_d
    dst_v = vc_ptr + b[:, None] * sv_b + slot[:, None] * sv_s + kvh * sv_h + j[None, :] * sv_d
    tl.store(dst_k, r1.to(kc_ptr.dtype.element_ty), mask=ok_kv & ~is_v)
    tl.store(dst_k + HALF * sc_d, r2.to(kc_ptr.dtype.element_ty), mask=ok_kv & ~is_v)
    tl.store(dst_v, r1.to(vc_ptr.dtype.element_ty), mask=ok_kv & is_v)
    tl.store(dst_v + HALF * sv_d, r2.to(vc_ptr.dtype.element_ty), mask=ok_kv & is_v)


def qkv_rope(x, w, rms_eps, cos_table, sin_table, pos, k_cache, v_cache, lens, n_heads, sumsq=None, live=None):
    """RMSNorm(x) @ w.T (the norm's weight folded into w: fold_norm) split into q, k, v heads; q and k rotated by
    RoPE at positions pos [B, T]; k and v written into the cache at slots lens[b] + t; returns q [B, T, n_heads,
    D]. As matmul(x, w, rms_eps=rms_eps, sumsq=sumsq) then rope_cache_write, in one kernel (see qkv_rope_ref).
    live: as matmul's (a prefill's padding: q and its cache slots are left unwritten)."""
    B, T, K = x.shape
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    _require(D % 2 == 0, f"rotate-half RoPE needs an even head_dim, not {D}")
    _require(tuple(w.shape) == ((n_heads + 2 * Hkv) * D, K), f"qkv_rope: weight {tuple(w.shape)} is not "
             f"[({n_heads} + 2 x {Hkv}) x {D}, {K}]")
    _require(cos_table.stride() == sin_table.stride() and cos_table.stride(1) == 1, "rope tables must be contiguous rows")
    x2 = x.reshape(B * T, K)
    q = torch.empty(B, T, n_heads, D, dtype=x.dtype, device=x.device)
    pairs = (n_heads + 2 * Hkv) * D // 2
    BLOCK_M, BLOCK_N, BLOCK_K = _matmul_tiles(0, K, x.is_cuda)  # (the narrowest: BLOCK_N pairs, 2 x BLOCK_N columns)
    upcast = (not x.is_cuda) or torch.float32 in (x.dtype, w.dtype) or x.dtype != w.dtype
    ss_in, P, BLOCK_P = _sumsq_in(sumsq, B * T, x.device)
    _qkv_rope_kernel[(triton.cdiv(B * T, BLOCK_M), triton.cdiv(pairs, BLOCK_N))](
        x2, w, ss_in, cos_table, sin_table, pos, lens.contiguous(), q, k_cache, v_cache, _live_rows(live, x)[0],
        B * T, T, K, P, n_heads, Hkv, D // 2, k_cache.shape[1], *x2.stride(), *w.stride(), rms_eps, cos_table.stride(0),
        *pos.stride(), *k_cache.stride(), *v_cache.stride(), SS_IN=sumsq is not None,
        UPCAST=upcast, BY_SUM=not x.is_cuda, PREC="ieee" if torch.float32 in (x.dtype, w.dtype) else "tf32",
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_P=BLOCK_P, LIVE=live is not None, num_warps=4,
        num_stages=_matmul_stages(BLOCK_K), **_pdl(x))
    return q


# ----------------------------------------------------------------------------------------------------------
# KV compaction after verification: slot lens[b] + path[b, j] -> slot lens[b] + j in every layer. One program
# per (layer, row, column chunk) loads all P source rows, waits for its whole block, then stores: sources and
# destinations overlap across j, and different threads may hold the same slot's load and store.


@triton.jit
def _kv_compact_kernel(k_ptr, v_ptr, lens_ptr, path_ptr, B, P, S, D, HD,
                       skl, skb, sks, skh, skd, svl, svb, svs, svh, svd, spb, spj,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    layer = (tl.program_id(0) // B).to(tl.int64)
    b = (tl.program_id(0) % B).to(tl.int64)
    j = tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    head, d = c // D, c % D
    lens = tl.load(lens_ptr + b)
    src = lens + tl.load(path_ptr + b * spb + j * spj, mask=j < P, other=0)
    dst = lens + j
    ok = ((j < P) & (src < S) & (dst < S))[:, None] & (c < HD)[None, :]
    k_row = k_ptr + layer * skl + b * skb + head[None, :] * skh + d[None, :] * skd
    v_row = v_ptr + layer * svl + b * svb + head[None, :] * svh + d[None, :] * svd
    k = tl.load(k_row + src[:, None] * sks, mask=ok)
    v = tl.load(v_row + src[:, None] * svs, mask=ok)
    tl.debug_barrier()  # every load of the block is done before any store
    tl.store(k_row + dst[:, None] * sks, k, mask=ok)
    tl.store(v_row + dst[:, None] * svs, v, mask=ok)


def kv_compact(k_all, v_all, lens, path):
    L, B, S, Hkv, D = k_all.shape
    P = path.shape[1]
    BLOCK_P = _pow2(P, 2)
    BLOCK_C = min(_pow2(Hkv * D, 16), max(4096 // BLOCK_P, 128))
    lens = lens.contiguous()
    _kv_compact_kernel[(L * B, triton.cdiv(Hkv * D, BLOCK_C))](
        k_all, v_all, lens, path, B, P, S, D, Hkv * D, *k_all.stride(), *v_all.stride(), *path.stride(),
        BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4)


# ----------------------------------------------------------------------------------------------------------
# Greedy acceptance: one program per row; the whole retrieve table [P, D1] (row b's own with a [B, P, D1] table;
# srb = 0 for a shared one) is one tile.


@triton.jit
def _accept_greedy_kernel(tok_ptr, pred_ptr, ret_ptr, n_ptr, path_ptr, out_ptr, P, D1, stok, spred, srb, srp, srj,
                          BLOCK_P: tl.constexpr, BLOCK_D1: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK_P)[:, None]
    j = tl.arange(0, BLOCK_D1)[None, :]
    in_tab = (p < P) & (j < D1)
    ret = ret_ptr + b * srb + p * srp  # [BLOCK_P, 1] row b's paths
    node = tl.load(ret + j * srj, mask=in_tab, other=-1)
    valid = node >= 0
    idx = tl.maximum(node, 0)
    # the base model's prediction after the previous node of the path, for j >= 1
    prev = tl.maximum(tl.load(ret + (j - 1) * srj, mask=in_tab & (j >= 1), other=0), 0)
    cand = tl.load(tok_ptr + b * stok + idx, mask=in_tab)
    pred = tl.load(pred_ptr + b * spred + prev, mask=in_tab & (j >= 1))
    match = valid & (cand == pred)
    # accepted = length of the leading run of matches over j = 1 .. D1-1 (the cumprod of the reference)
    first_miss = tl.min(tl.where((j >= 1) & ~match, j, BLOCK_D1), axis=1)  # [BLOCK_P]
    accepted = tl.minimum(first_miss, D1) - 1
    accepted = tl.where(tl.arange(0, BLOCK_P) < P, accepted, -1)
    best_len = tl.max(accepted, axis=0)
    best = tl.min(tl.where(accepted == best_len, tl.arange(0, BLOCK_P), BLOCK_P), axis=0)  # first longest
    n = best_len + 1
    best_path = tl.sum(tl.where(p == best, idx, 0), axis=0)  # [BLOCK_D1]
    jj = tl.arange(0, BLOCK_D1)
    out = tl.where(jj < n, best_path, jj)
    tl.store(n_ptr + b, n.to(tl.int64))
    tl.store(path_ptr + b * D1 + jj, out.to(tl.int64), mask=jj < D1)
    # the step's output row: the tokens along the path, n, and the base model's token after the last accepted
    row = out_ptr + b * (D1 + 2)
    tl.store(row + jj, tl.load(tok_ptr + b * stok + out, mask=jj < D1).to(tl.int64), mask=jj < D1)
    tl.store(row + D1, n.to(tl.int64))
    last = tl.sum(tl.where(jj == n - 1, best_path, 0), axis=0)
    tl.store(row + D1 + 1, tl.load(pred_ptr + b * spred + last).to(tl.int64))


def accept_greedy(tree_tokens, base_pred, retrieve):
    """See accept_greedy_ref. retrieve [P, D1] (shared by all rows) or [B, P, D1] (row b's own), any strides."""
    B = tree_tokens.shape[0]
    P, D1 = retrieve.shape[-2:]
    _require(retrieve.dim() == 2 or (retrieve.dim() == 3 and retrieve.shape[0] == B),
             f"accept_greedy: retrieve {tuple(retrieve.shape)} is neither [P, D1] nor [{B}, P, D1]")
    _require(tree_tokens.stride(1) == 1 and base_pred.stride(1) == 1, "accept_greedy: rows must be contiguous")
    n_accept = torch.empty(B, dtype=torch.int64, device=tree_tokens.device)
    path = torch.empty(B, D1, dtype=torch.int64, device=tree_tokens.device)
    out = torch.empty(B, D1 + 2, dtype=torch.int64, device=tree_tokens.device)
    sr = retrieve.stride() if retrieve.dim() == 3 else (0, *retrieve.stride())
    _accept_greedy_kernel[(B,)](tree_tokens, base_pred, retrieve, n_accept, path, out, P, D1,
                                tree_tokens.stride(0), base_pred.stride(0), *sr,
                                BLOCK_P=_pow2(P, 2), BLOCK_D1=_pow2(D1, 2), num_warps=4)
    return n_accept, path, out


# ----------------------------------------------------------------------------------------------------------
# Output projection + top-k (draft proposals): the k largest of x @ w.T (+ bias) per row, without the [N, V]
# logits in memory. Stage 1: a program takes BLOCK_N rows and BLOCK_V vocab entries (a chunk), computes that
# logit tile and keeps its top K per row as candidates [N, n_chunks, K]. Stage 2: one program per row takes the
# top K of its candidates. A top K is K passes of: row max, its first column, that column set to -inf.
# With HAS_LSE, each chunk also writes the log-sum-exp of its logits [N, n_chunks] (columns past V excluded), and
# stage 2 merges a row's chunk values into the log-sum-exp over all V logits (values - lse: log-probabilities).
# (Assumes finite logits: a row with fewer than k of them may get repeated or out-of-range indices.)


@triton.jit
def _lm_topk_chunk_kernel(x_ptr, w_ptr, b_ptr, cv_ptr, ci_ptr, cl_ptr, N, V, D, stride_x, stride_w, n_chunks,
                          K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LSE: tl.constexpr, UPCAST: tl.constexpr,
                          PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                          PDL: tl.constexpr):
    _pdl_start(PDL)
    # Row blocks on axis 0: the programs that share a chunk of w run side by side (its rereads hit L2).
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < N, cols < V
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + offs_d[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + offs_d[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = offs_d[None, :] < D - d0
        x = tl.load(x_ptrs + d0, mask=row_ok[:, None] & d_ok, other=0.0)
        w = tl.load(w_ptrs + d0, mask=col_ok[:, None] & d_ok, other=0.0)
        if UPCAST:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=PREC)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # The reference's logits are in x's dtype: round once, bias included, as torch's fused addmm does (same
    # values, same ties; its unfused path, a non-contiguous 3D x with a bias, rounds twice: 1-2 ulps off).
    s = tl.where(col_ok[None, :], acc.to(x_ptr.dtype.element_ty).to(tl.float32), float("-inf"))
    if HAS_LSE:  # the chunk's log-sum-exp (every chunk holds a column < V, so m is finite for finite logits)
        m = tl.max(s, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)
        tl.store(cl_ptr + rows.to(tl.int64) * n_chunks + chunk, m + tl.log(tl.sum(tl.exp(s - m[:, None]), axis=1)),
                 mask=row_ok)
    local = tl.arange(0, BLOCK_V)[None, :]
    out = rows.to(tl.int64) * n_chunks * K + chunk * K  # [BLOCK_N] this chunk's candidates of each row
    for j in tl.static_range(K):
        m = tl.max(s, axis=1)
        first = tl.min(tl.where(s == m[:, None], local, BLOCK_V), axis=1)
        tl.store(cv_ptr + out + j, m, mask=row_ok)
        tl.store(ci_ptr + out + j, chunk * BLOCK_V + first, mask=row_ok)
        s = tl.where(local == first[:, None], float("-inf"), s)


@triton.jit
def _lm_topk_merge_kernel(cv_ptr, ci_ptr, vocab_ptr, v_ptr, i_ptr, cl_ptr, lse_ptr, tok_ptr, node_ptr, C, n_chunks, P,
                          stride_tok, K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                          HAS_VOCAB: tl.constexpr, HAS_LSE: tl.constexpr, INTO: tl.constexpr, BLOCK_CH: tl.constexpr,
                          PDL: tl.constexpr):
    _pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    if HAS_LSE:  # log-sum-exp of the chunks' log-sum-exps
        ch = tl.arange(0, BLOCK_CH)
        cl = tl.load(cl_ptr + row * n_chunks + ch, mask=ch < n_chunks, other=float("-inf"))
        m = tl.max(cl, axis=0)
        m = tl.where(m == float("-inf"), 0.0, m)
        tl.store(lse_ptr + row, m + tl.log(tl.sum(tl.exp(cl - m), axis=0)))
    offs = tl.arange(0, BLOCK_C)
    s = tl.load(cv_ptr + row * C + offs, mask=offs < C, other=float("-inf"))
    kk = tl.arange(0, BLOCK_K)
    top_v = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_pos = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(K):
        m = tl.max(s, axis=0)
        first = tl.min(tl.where(s == m, offs, BLOCK_C), axis=0)
        top_v = tl.where(kk == j, m, top_v)
        top_pos = tl.where(kk == j, first, top_pos)
        s = tl.where(offs == first, float("-inf"), s)
    # The vocab indices in one gather at the end, not a dependent load per pass. (first == BLOCK_C: NaNs only)
    idx = tl.load(ci_ptr + row * C + top_pos, mask=(kk < K) & (top_pos < C), other=0)
    if HAS_VOCAB:  # rows of w are a draft vocabulary: report token ids
        idx = tl.load(vocab_ptr + idx, mask=kk < K, other=0)
    tl.store(v_ptr + row * K + kk, top_v, mask=kk < K)
    tl.store(i_ptr + row * K + kk, idx.to(tl.int64), mask=kk < K)
    if INTO:  # row = (b, parent p): its ranks' tree nodes get the ids (a drafting depth's scatter, in here)
        node = tl.load(node_ptr + (row % P) * K + kk, mask=kk < K, other=-1)
        tl.store(tok_ptr + (row // P) * stride_tok + node, idx.to(tl.int64), mask=(kk < K) & (node >= 0))


def lm_topk(x, w, k, bias=None, vocab=None, lse=False, into=None):
    """See lm_topk_ref: (values, indices), and with lse=True the log-sum-exp over all V logits [...] as well;
    into=(tokens, node_of): the ids written into the tree's nodes too, by the merge kernel."""
    D, V = x.shape[-1], w.shape[0]
    _require(w.shape[1] == D and w.stride(1) == 1, f"lm_topk: weight {tuple(w.shape)} does not take inputs of width {D}")
    _require(1 <= k <= V, f"lm_topk: k={k} is not between 1 and the {V} rows of the weight")
    _require(vocab is None or (vocab.shape == (V,) and vocab.is_contiguous()), "lm_topk: vocab needs one id per weight row")
    x2 = _rows(x, D)
    N = x2.shape[0]
    # Tiles measured on an H100 (bf16; D=576 and 4096, V=16k-49k, N=1-80): 128 vocab entries a program; 64 rows
    # at most (larger N: more row blocks, w read again from L2); 128-wide steps along D only where they divide it.
    BLOCK_N = min(_pow2(N, 16), 64)  # (tl.dot needs >= 16 rows)
    BLOCK_V = 128 if x.is_cuda else 32  # the interpreter: small tiles, several chunks even at tiny V
    BLOCK_D = 128 if D % 128 == 0 else min(_pow2(D, 16), 64)
    n_chunks = triton.cdiv(V, BLOCK_V)
    cand_v = torch.empty(N, n_chunks, k, dtype=torch.float32, device=x.device)
    cand_i = torch.empty(N, n_chunks, k, dtype=torch.int32, device=x.device)
    values = torch.empty(*x.shape[:-1], k, dtype=torch.float32, device=x.device)
    indices = torch.empty(*x.shape[:-1], k, dtype=torch.int64, device=x.device)
    if lse:
        cand_l = torch.empty(N, n_chunks, dtype=torch.float32, device=x.device)
        out_l = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    else:
        cand_l = out_l = cand_v  # unused
    upcast = (not x.is_cuda) or x.dtype == torch.float32 or x.dtype != w.dtype
    b = bias.contiguous() if bias is not None else w  # unused without a bias
    tokens, node_of = into if into is not None else (cand_i, cand_i)  # (unused without into)
    if into is not None:
        _require(tokens.dtype == torch.int64 and tokens.dim() == 2 and tokens.stride(1) == 1
                 and node_of.dim() == 2 and node_of.shape[1] == k and N == tokens.shape[0] * node_of.shape[0]
                 and node_of.dtype == torch.int64 and node_of.is_contiguous(),
                 f"lm_topk: into= tokens {tuple(tokens.shape)} and node_of {tuple(node_of.shape)} do not fit "
                 f"{N} rows and k={k}")
    _lm_topk_chunk_kernel[(triton.cdiv(N, BLOCK_N), n_chunks)](
        x2, w, b, cand_v, cand_i, cand_l, N, V, D, x2.stride(0), w.stride(0), n_chunks,
        K=k, HAS_BIAS=bias is not None, HAS_LSE=lse, UPCAST=upcast,
        PREC="ieee" if torch.float32 in (x.dtype, w.dtype) else "tf32",
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_D=BLOCK_D, num_warps=4, num_stages=4, **_pdl(x))
    BLOCK_C = _pow2(n_chunks * k, 16)
    _lm_topk_merge_kernel[(N,)](cand_v, cand_i, vocab if vocab is not None else cand_i, values, indices, cand_l, out_l,
                                tokens, node_of, n_chunks * k, n_chunks, node_of.shape[0] if into is not None else 1,
                                tokens.stride(0), K=k, BLOCK_C=BLOCK_C, BLOCK_K=_pow2(k, 2),
                                HAS_VOCAB=vocab is not None, HAS_LSE=lse, INTO=into is not None, BLOCK_CH=_pow2(n_chunks, 2),
                                num_warps=4 if BLOCK_C <= 8192 else 16, **_pdl(x))
    return (values, indices, out_l) if lse else (values, indices)
