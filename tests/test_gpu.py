"""GPU checks (skipped without CUDA): the Triton + CUDA-graph path against the plain PyTorch path, and greedy
speculative decoding against autoregressive decoding, in float32, on tiny random models and (when
HYDRA_LITE_CKPT names a converted checkpoint) on the real model."""
import os

import pytest
import torch

import hydra_lite as hl
from test_runtime import tiny_heads, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or hl._kernels is None, reason="needs CUDA and Triton")


def models():
    yield "tiny", tiny_model(21, n_heads=4, n_kv_heads=2).cuda()
    ckpt = os.environ.get("HYDRA_LITE_CKPT")
    if ckpt:
        yield "real", hl.load_model(ckpt, "cuda", torch.float32)


@pytest.mark.parametrize("context,dynamic", [(0, False), (10, False), (10, True)],
                         ids=["heads", "heads+context", "dynamic+context"])
@pytest.mark.parametrize("kind", ["medusa", "hydra", "hydra++"])
def test_gpu_speculative_equals_autoregressive_fp32(kind, context, dynamic):
    for name, model in models():
        heads = tiny_heads(model, kind != "medusa", kind == "hydra++").cuda()  # uses only model.cfg
        torch.manual_seed(0)
        prompts = [torch.randint(0, model.cfg.vocab_size, (int(n),)).tolist() for n in (7, 31, 12)]
        prompts[1] = prompts[1] + prompts[1][:20]  # a repeated span for the context drafts
        ar, _ = hl.Generator(model).generate(prompts, 64, stop_at_eos=False)
        for batch in (prompts[:1], prompts):
            gen = hl.Generator(model, heads=heads, context_drafts=context, dynamic=dynamic)
            spec, _ = gen.generate(batch, 64, stop_at_eos=False)
            assert spec == ar[:len(batch)], (name, kind)


def test_gpu_context_drafts_alone_equal_autoregressive_fp32():
    """Prompt lookup without heads, under CUDA graphs: output equals AR, and a copied span is accepted."""
    for name, model in models():
        torch.manual_seed(3)
        prompts = [torch.randint(0, model.cfg.vocab_size, (n,)).tolist() for n in (9, 40)]
        ar, _ = hl.Generator(model).generate(prompts, 48, stop_at_eos=False)
        gen = hl.Generator(model, context_drafts=8)
        assert gen.use_graphs
        spec, _ = gen.generate(prompts, 48, stop_at_eos=False)
        assert spec == ar, name


def test_gpu_ragged_batch_equals_rows_alone_fp32():
    """Rows of different lengths share one right-padded prefill: each decodes as if it were alone."""
    for name, model in models():
        torch.manual_seed(2)
        prompts = [torch.randint(0, model.cfg.vocab_size, (n,)).tolist() for n in (5, 40, 17)]
        batch, _ = hl.Generator(model).generate(prompts, 32, stop_at_eos=False)
        for p, out in zip(prompts, batch):
            assert hl.Generator(model).generate([p], 32, stop_at_eos=False)[0][0] == out, name


def test_gpu_triton_path_matches_reference_path():
    for name, model in models():
        torch.manual_seed(1)
        tokens = torch.randint(0, model.cfg.vocab_size, (2, 50), device="cuda")
        hl.USE_TRITON = False
        try:
            ref = model.forward_logits(tokens)
        finally:
            hl.USE_TRITON = True
        fast = model.forward_logits(tokens)
        assert (fast - ref).abs().max() < 1e-3 * ref.abs().max(), name
        ar_graph, _ = hl.Generator(model).generate([tokens[0, :9].tolist()], 40, stop_at_eos=False)
        ar_plain, _ = hl.Generator(model, cuda_graphs=False).generate([tokens[0, :9].tolist()], 40, stop_at_eos=False)
        assert ar_graph == ar_plain, name


@pytest.mark.parametrize("acceptance,dynamic", [("exact", False), ("typical", False), ("exact", True)])
def test_gpu_sampled_speculative_under_graphs(acceptance, dynamic):
    model = tiny_model(22, n_heads=4, n_kv_heads=2).cuda()
    heads = tiny_heads(model, True, True).cuda()
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5]]
    greedy, _ = hl.Generator(model).generate(prompts, 40, stop_at_eos=False)
    gen = hl.Generator(model, heads=heads, acceptance=acceptance, dynamic=dynamic)
    assert gen.use_graphs
    cold, _ = gen.generate(prompts, 40, hl.SamplingParams(temperature=1e-3), stop_at_eos=False)
    assert cold == greedy
    hot, _ = gen.generate(prompts, 40, hl.SamplingParams(temperature=1.0, top_p=0.9), stop_at_eos=False)
    again, _ = gen.generate(prompts, 40, hl.SamplingParams(temperature=1.0, top_p=0.9), stop_at_eos=False)
    assert hot != greedy and hot != again  # the graph draws fresh random numbers on every replay


def test_gpu_captured_prefill_equals_eager_fp32(monkeypatch):
    """Prefills replay a graph captured per length bucket: the answers equal eager prefills', and after warm-up
    no call captures anything (prompt lengths 3 to 300, batch 1 and 2)."""
    for name, model in models():
        heads = tiny_heads(model, True, True).cuda()
        torch.manual_seed(4)
        prompts = [torch.randint(0, model.cfg.vocab_size, (n,)).tolist() for n in (3, 40, 300)]
        batches = [[p] for p in prompts] + [prompts[:2]]
        eager = hl.Generator(model, heads=heads, cuda_graphs=False)
        expected = [eager.generate(b, 32, stop_at_eos=False)[0] for b in batches]
        gen = hl.Generator(model, heads=heads)
        gen.warmup([1, 2])
        assert all(ws.prefills for ws in gen.workspaces.values()), name
        with monkeypatch.context() as m:
            m.setattr(hl, "StepGraph", lambda *a, **k: pytest.fail("captured after warm-up"))
            assert [gen.generate(b, 32, stop_at_eos=False)[0] for b in batches] == expected, name


# ----------------------------------------------------------------------------------------------------------
# Bit-exact bf16 / fp16 (issue 15): with the batch-invariant kernels (hl.EXACT, the default) a token's logits
# are the same bits from a one-token step, a tree verification or another batch.

HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def near_tie_model(dtype):
    """A tiny model whose logits sit close together (a small final norm): greedy near-ties at almost every step,
    where any difference in rounding between two paths shows as a different token."""
    model = tiny_model(23, n_heads=6, n_kv_heads=2, vocab=300)
    model.norm.data *= 0.05
    return model.cuda().to(dtype)


def real_prompts(ckpt, cfg, n):
    """The first turns of n held-out multi-task prompts (tasks/heldout.jsonl), every family, chat-formatted."""
    import json
    tok = hl.Tokenizer(ckpt, cfg)
    with open(os.path.join(hl.HERE, "tasks", "heldout.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = sorted(rows, key=lambda r: r["id"])[::max(len(rows) // n, 1)][:n]
    return tok, [tok.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("fused", [False, True], ids=["layers", "fused-layers"])
def test_gpu_verification_logits_equal_decoding_bit_for_bit(dtype, fused, monkeypatch):
    """Greedy decoding's logits at each step, and the keys/values it writes, equal bit for bit the tree pass's
    at the nodes of the same path (ragged rows, the path among other nodes, the cache of another size); with
    the decoder layers' ops one by one, and fused into the matmuls (hl.FUSED) with path_attention's merge in
    the kernel (kernels.PATH_MERGE_IN_KERNEL)."""
    import kernels

    assert hl.EXACT
    monkeypatch.setattr(hl, "FUSED", fused)
    monkeypatch.setattr(kernels, "PATH_MERGE_IN_KERNEL", fused)
    model = near_tie_model(dtype)
    torch.manual_seed(5)
    lens = [9, 70, 33]
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), device="cuda") for n in lens]
    B, steps = len(prompts), 6
    with torch.inference_mode():
        ar_cache, tree_cache = model.new_cache(B, 256), model.new_cache(B, 512)
        first = []
        for cache in (ar_cache, tree_cache):  # prefill each row alone (the same per-row kernels as in a batch)
            for b, p in enumerate(prompts):
                one = hl.KVCache(cache.k[:, b:b + 1], cache.v[:, b:b + 1], cache.lens[b:b + 1], cache.rope)
                first.append(model.logits(model(p[None], one)[:, -1]).argmax(-1))
                one.lens += len(p)
        token, ar_logits = torch.cat(first[:B]), []
        chain = [token]
        for _ in range(steps):  # greedy decoding, one token per step
            logits = model.logits(model(token[:, None], ar_cache)[:, 0])
            ar_cache.lens += 1
            ar_logits.append(logits)
            token = logits.argmax(-1)
            chain.append(token)
        # a tree whose chain [0], [0, 0], ... holds greedy's tokens, among other random nodes
        choices = [[0] * d for d in range(1, steps)] + [[1], [2], [0, 1], [0, 0, 2], [1, 0]]
        tree = hl.Tree(choices, "cuda")
        tokens = torch.randint(0, model.cfg.vocab_size, (B, tree.size), device="cuda")
        on_chain = [0] + [tree.choices.index([0] * d) + 1 for d in range(1, steps)]
        for d, node in enumerate(on_chain):
            tokens[:, node] = chain[d]
        rows = tree.rows(B)
        pos = tree_cache.lens[:, None].long() + rows.node_depth
        verify = model.logits(model(tokens, tree_cache, pos, rows))
        for d, node in enumerate(on_chain):
            assert torch.equal(verify[:, node], ar_logits[d]), f"depth {d}"
        path = torch.tensor(on_chain, device="cuda").expand(B, -1)
        hl.kv_compact(tree_cache.k, tree_cache.v, tree_cache.lens, path.contiguous())
        for b, n in enumerate(lens):
            assert torch.equal(tree_cache.k[:, b, :n + steps], ar_cache.k[:, b, :n + steps])
            assert torch.equal(tree_cache.v[:, b, :n + steps], ar_cache.v[:, b, :n + steps])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_gpu_half_speculative_equals_autoregressive(dtype, dynamic):
    """Greedy speculative decoding gives greedy decoding's tokens in bf16/fp16, batch 1 and a ragged batch of 8,
    under CUDA graphs; and each prompt's output is the same alone and inside the batch (which shrinks as its rows
    finish, on the way). On a near-tie model with
    random heads, and (HYDRA_LITE_CKPT) on SmolLM2 with the shipped heads and real prompts of every family."""
    check_half_speculative(dtype, dynamic)


def test_gpu_fused_layers_speculative_equals_autoregressive(monkeypatch):
    """The same with the decoder layers fused into the matmuls (hl.FUSED) and path_attention's merge in the
    kernel, bf16, static tree."""
    import kernels

    monkeypatch.setattr(hl, "FUSED", True)
    monkeypatch.setattr(kernels, "PATH_MERGE_IN_KERNEL", True)
    check_half_speculative(torch.bfloat16, False)


def test_gpu_dependent_launch_changes_no_bits(monkeypatch):
    """kernels.PDL (each kernel launched as a programmatic dependent of the one before, on Hopper): the same
    logits, bit for bit, as launched one after another, through captured steps, also where only the small calls
    take part (PDL_MAX_TOKENS: a step mixes both launches); and speculative == AR with it."""
    import kernels

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9+")
    model = near_tie_model(torch.bfloat16)
    torch.manual_seed(7)
    prompts = [torch.randint(0, model.cfg.vocab_size, (int(n),)).tolist() for n in (5, 40, 77)]
    outputs = []
    for pdl, max_tokens in ((False, 0), (True, 0), (True, 16)):
        monkeypatch.setattr(kernels, "PDL", pdl)
        monkeypatch.setattr(kernels, "PDL_MAX_TOKENS", max_tokens)
        gen = hl.Generator(model)  # (a fresh one: the graphs capture the launches)
        assert gen.use_graphs
        outputs.append(gen.generate(prompts, 64, stop_at_eos=False)[0])
        with torch.no_grad():
            tokens = torch.tensor([prompts[1]], device="cuda")
            outputs.append(model.forward_logits(tokens))
    assert outputs[0] == outputs[2] == outputs[4] and torch.equal(outputs[1], outputs[3])
    assert torch.equal(outputs[1], outputs[5])
    check_half_speculative(torch.bfloat16, False)


def check_half_speculative(dtype, dynamic):
    cases = [("near-tie", near_tie_model(dtype), None, None)]
    ckpt = os.environ.get("HYDRA_LITE_CKPT")
    if ckpt:
        real = hl.load_model(ckpt, "cuda", dtype)
        cases.append(("real", real, hl.load_heads(hl.DEFAULT_HEADS, real), real_prompts(ckpt, real.cfg, 8)[1]))
    for name, model, heads, prompts in cases:
        if heads is None:
            heads = tiny_heads(model, True, True).cuda().to(dtype)
            torch.manual_seed(6)
            prompts = [torch.randint(0, model.cfg.vocab_size, (int(n),)).tolist() for n in torch.randint(3, 90, (8,))]
            prompts[2] = prompts[2] + prompts[2][:30]  # a repeated span for the context drafts
        ar = hl.Generator(model)
        spec = hl.Generator(model, heads=heads, dynamic=dynamic)
        assert ar.use_graphs and spec.use_graphs
        alone = [ar.generate([p], 96, stop_at_eos=False)[0][0] for p in prompts]
        assert ar.generate(prompts, 96, stop_at_eos=False)[0] == alone, (name, "AR: batch vs alone")
        for p, want in zip(prompts[:3], alone):
            got, stats = spec.generate([p], 96, stop_at_eos=False)
            assert got[0] == want, (name, "spec batch 1")
        got, stats = spec.generate(prompts, 96, stop_at_eos=False)
        assert got == alone, (name, "spec batch 8")
        assert stats.mean_accept > 1.5 or name == "near-tie", (name, stats.mean_accept)  # (it did speculate)
        # (real prompts end at different steps: the batch shrank on the way, hl.SHRINK, and kept the bits)
        assert len(stats.batches) > 1 or name == "near-tie" or not hl.SHRINK, (name, stats.batches)


def test_gpu_prefill_skipping_padding_changes_no_bits(monkeypatch):
    """hl.PREFILL_SKIP (a batched prefill's blocks of padding skipped by the fused kernels): the same greedy
    tokens, bf16, near-tie model, as computing the padding; and speculative == AR, alone == in the batch."""
    monkeypatch.setattr(hl, "FUSED", True)
    model = near_tie_model(torch.bfloat16)
    torch.manual_seed(8)
    prompts = [torch.randint(0, model.cfg.vocab_size, (int(n),)).tolist() for n in (3, 700, 70, 1, 129, 40)]  # (chunked)
    outputs = []
    for skip in (False, True):
        monkeypatch.setattr(hl, "PREFILL_SKIP", skip)
        outputs.append(hl.Generator(model).generate(prompts, 48, stop_at_eos=False)[0])
    assert outputs[0] == outputs[1]
    check_half_speculative(torch.bfloat16, False)
