"""Head training: the training-time forward matches the runtime's, and training learns."""
import random

import torch

import hydra_lite as hl
import train_heads as th
from test_runtime import tiny_model


def test_prefix_training_forward_matches_runtime():
    model = tiny_model(4)
    heads = th.new_heads(model, "hydra++", 3, 1)
    for p in heads.prefix.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(2, 11, model.cfg.dim)
    cache = model.new_cache(2, 16)
    pre_cache = hl.KVCache(1, 2, 16, model.cfg.n_kv_heads, model.cfg.head_dim, "cpu", torch.float32)
    with torch.no_grad():
        runtime = heads.run_prefix(h, model.rope, pre_cache)
        train = th.prefix_forward_train(heads, h, model.rope)
    assert (runtime - train).abs().max() < 1e-4


def test_training_learns_a_predictable_sequence():
    """Answers that repeat a fixed cycle: every head can learn the token k+2 ahead."""
    model = tiny_model(5)
    cycle = [3, 14, 15, 92, 65, 35, 89, 79]
    rows = [([1, 2] + cycle * 4 + cycle[:s], 2) for s in range(8)]
    for kind in ("medusa", "hydra", "hydra++"):
        torch.manual_seed(0)
        heads = th.new_heads(model, kind, 3, 1)
        before = th.train(model, heads, rows, 0, 1e-2, 4096, 0.0, eval_rows=rows)
        after = th.train(model, heads, rows, 150, 1e-2, 4096, 1.0, eval_rows=rows)
        top1 = lambda accs: [a[0] for a in accs]
        assert min(top1(after)) > 0.9 and sum(top1(after)) > sum(top1(before)), (kind, before, after)


def test_read_prompts_and_batches(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"turns": ["a", "b"]}\n{"prompt": "c"}\n\n{"text": "d"}\n')
    assert th.read_prompts(str(path)) == ["a", "b", "c", "d"]
    assert th.read_prompts(str(path), th.parse_range("1-2")) == ["c"]
    rows = [([1] * n, 1) for n in range(1, 40)]
    plan = th.batches(rows, 64, random.Random(0))
    assert sorted(i for b in plan for i in b) == list(range(39))
    assert all(len(b) * max(len(rows[i][0]) for i in b) <= 64 or len(b) == 1 for b in plan)


def test_draft_vocab_and_synthetic_prompts():
    rows = [([9, 9, 1, 1, 1, 2, 2, 3], 2), ([9, 4, 1, 2], 1)]  # answer tokens: 1 x4, 2 x3, 3 x1, 4 x1
    vocab, coverage = th.draft_vocab(rows, 2, 10)
    assert vocab.tolist() == [1, 2] and abs(coverage - 7 / 9) < 1e-6
    assert th.draft_vocab(rows, 0, 10) == (None, 1.0) and th.draft_vocab(rows, 10, 10) == (None, 1.0)
    model = tiny_model(6)
    heads = th.new_heads(model, "hydra++", 2, 1, vocab)
    assert heads.hc.draft_vocab == 2 and heads.vocab.tolist() == [1, 2]
    prompts = th.synthetic_prompts(200, seed=3)
    assert prompts == th.synthetic_prompts(200, seed=3) and len(set(prompts)) > 150
    assert not any("{" in p for p in prompts)
