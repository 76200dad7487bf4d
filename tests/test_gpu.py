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
