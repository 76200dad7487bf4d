"""Head training: the training-time forward matches the runtime's, and training learns."""
import contextlib
import os
import pickle
import random

import pytest
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
    pre_cache = hl.new_cache(model.cfg, 1, 2, 16, "cpu", torch.float32, rope=cache.rope)
    with torch.no_grad():
        runtime = heads.run_prefix(h, cache.rope, pre_cache)  # cached, as generation runs it
    train = heads.run_prefix(h, cache.rope)  # no cache, with grad: as training runs it
    assert (runtime - train).abs().max() < 1e-4


def greedy_rows(model, n, length, seed):
    """The tiny model's own greedy answers to random prompts (what the data step makes, at temperature 0)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, model.cfg.vocab_size, (3,), generator=g).tolist() for _ in range(n)]
    outs, _ = hl.Generator(model).generate(prompts, length, stop_at_eos=False)
    return [(p + o, len(p)) for p, o in zip(prompts, outs)]


def test_training_learns_the_base_models_greedy_path():
    """Heads trained on the base model's own answers learn to propose its greedy continuation (draft_ranks
    counts that), and the fitted tree's expected acceptance grows with them."""
    model = tiny_model(5)
    rows = greedy_rows(model, 12, 40, seed=0)
    for kind in ("medusa", "hydra", "hydra++"):
        torch.manual_seed(0)
        heads = th.new_heads(model, kind, 3, 1)
        before = th.draft_ranks(model, heads, rows, 4096)
        th.train(model, heads, rows, 150, 1e-2, 4096, 1.0)
        after = th.draft_ranks(model, heads, rows, 4096)
        assert before.shape == (sum(len(r[0]) - r[1] + 1 for r in rows), 3) and (before[:, 0] >= 0).float().mean() > 0.9
        top1 = lambda ranks: [a[0] for a in th.rank_accuracies(ranks)]
        print(kind, top1(before), top1(after), th.fit_tree(before, 8)[1], th.fit_tree(after, 8)[1])
        assert min(top1(after)) > 0.45 and sum(top1(after)) > sum(top1(before)) + 0.5, (kind, top1(before), top1(after))
        assert th.fit_tree(after, 8)[1] > th.fit_tree(before, 8)[1] + 1.0


def test_time_limit_cuts_the_run():
    model = tiny_model(8)
    rows = greedy_rows(model, 2, 10, seed=2)
    heads = th.new_heads(model, "hydra", 2, 1)
    assert th.train(model, heads, rows, 400, 1e-3, 4096, 0.0, time_limit=1e-3) == 51
    assert th.train(model, heads, rows, 60, 1e-3, 4096, 0.0, time_limit=3600) == 60


def test_time_limit_follows_the_rate_as_it_settles(monkeypatch):
    """Steps that start slow (0.2 s, warm-up) and settle (0.05 s): the run is re-planned as the rate settles
    and fills the time limit, where a plan made once from the early rate stopped at about half of it."""
    model = tiny_model(8)
    rows = greedy_rows(model, 2, 10, seed=2)
    heads = th.new_heads(model, "hydra", 2, 1)
    clock, done = [0.0], [0]
    real_losses = th.head_losses

    def timed_losses(*args):  # each training step costs fake time
        done[0] += 1
        clock[0] += 0.2 if done[0] <= 50 else 0.05
        return real_losses(*args)

    monkeypatch.setattr(th, "head_losses", timed_losses)
    monkeypatch.setattr(th.time, "time", lambda: clock[0])
    steps = th.train(model, heads, rows, 1000, 1e-3, 4096, 0.0, time_limit=20)
    assert 220 <= steps <= 260 and 19 <= clock[0] <= 21, (steps, clock[0])  # 50 x 0.2 s + 200 x 0.05 s = 20 s


def test_draft_ranks_leave_sampled_paths():
    """Positions whose following tokens are not the base model's greedy ones drop out at that depth (-1)."""
    model = tiny_model(7)
    rows = greedy_rows(model, 2, 30, seed=1)
    heads = th.new_heads(model, "hydra", 3, 1)
    ids, start = rows[0]
    bad = list(ids)
    bad[start + 10] = (bad[start + 10] + 1) % model.cfg.vocab_size  # one sampled, non-greedy token
    ranks = th.draft_ranks(model, heads, [(bad, start)], 4096)
    # Position i is token start-1+i; head k there reads tokens up to start+i+k, so head k first reads the
    # changed token start+10 at position 10-k (and the heads before it do not yet).
    for k in range(3):
        assert ranks[10 - k, k] == -1 and (ranks[10 - k, :k] >= 0).all()
    assert (ranks[:8] >= 0).all()


def test_fit_tree_counts_paths_jointly():
    # Head 1 is right exactly where head 0 is right at rank 0: [0, 0] is worth more than [1] or [2].
    ranks = torch.tensor([[0, 0]] * 6 + [[1, 3]] * 2 + [[2, 4]] * 2)
    tree, expected = th.fit_tree(ranks, 2)
    assert tree == [[0], [0, 0]] and abs(expected - (1 + 0.6 + 0.6)) < 1e-9
    assert abs(th.tree_accept(ranks, tree) - expected) < 1e-9
    tree, expected = th.fit_tree(ranks, 3)
    assert tree == [[0], [1], [0, 0]] and abs(expected - 2.4) < 1e-9  # (ties: the smaller path first)
    assert abs(th.tree_accept(ranks, [[1], [1, 3]]) - 1.4) < 1e-9
    # Positions that left the greedy path (-1) drop out of the deeper counts instead of counting as misses.
    ranks = torch.tensor([[0, 0]] * 4 + [[0, -1]] * 4 + [[1, -1]] * 2)
    tree, expected = th.fit_tree(ranks, 2)
    assert tree == [[0], [0, 0]] and abs(expected - (1 + 0.8 + 0.8)) < 1e-9
    assert th.rank_accuracies(ranks)[1][:2] == [1.0, 0.0]


def test_replay_decoding_counts_steps_where_they_start():
    """Steps start where the last one ended: the average over step starts, not over every position."""
    tree = [[0], [1], [0, 0]]
    # Answer 1: at position 0 the tree's [0, 0] matches (3 tokens), so position 1 and 2 are skipped; position 3
    # matches [1] (2 tokens); position 5 nothing (1); position 6 is the last (n = 7 rows: 6 tokens).
    a = torch.tensor([[0, 0], [5, 5], [5, 5], [1, 2], [0, 0], [4, 4], [-1, -1]])
    tokens, steps, starts = th.replay_decoding([a], tree)
    assert (tokens, steps) == (6, 3) and starts[0].tolist() == [1, 0, 0, 1, 0, 1, 0]
    # Easy positions inside accepted runs are skipped, so the average over every position is kinder: positions
    # 0-5 accept 3, 3, 3, 1, 3, 1 (2.33 on average); steps start at 0, 3 and 4 (3, 1, then 2: the answer ends).
    c = torch.tensor([[0, 0], [0, 0], [0, 0], [5, 5], [0, 0], [4, 4], [-1, -1]])
    tokens, steps, starts = th.replay_decoding([c], tree)
    assert (tokens, steps) == (6, 3) and starts[0].tolist() == [1, 0, 0, 1, 1, 0, 0]
    assert abs(th.tree_accept(c[:6], tree) - 14 / 6) < 1e-9
    # Answer 2 leaves the greedy path at position 2 (a sampled token): replayed up to there only, and a step's
    # tokens do not run past it.
    b = torch.tensor([[0, 0], [0, 0], [-1, -1], [0, 0], [0, 0], [-1, -1], [-1, -1]])
    assert th.replay_decoding([b], tree)[:2] == (2, 1)
    assert th.replay_decoding([a, b], tree)[:2] == (8, 4)


def test_replay_decoding_matches_the_runtime():
    """Replayed on the ranks of the base model's own greedy answers, decoding takes, answer by answer, exactly as
    many steps as the runtime's speculative decoding of the same prompts with the same heads and tree (float32).
    (The runtime's prefill gives the first token, so its steps cover an answer less that one: replayed trimmed.)"""
    model = tiny_model(11)
    rows = greedy_rows(model, 6, 40, seed=5)
    torch.manual_seed(0)
    heads = th.new_heads(model, "hydra++", 3, 1)
    th.train(model, heads, rows, 30, 1e-2, 4096, 1.0)  # (half-trained: the heads are right often, not always)
    answers = th.draft_ranks(model, heads, [(ids[:-1], start) for ids, start in rows], 4096, per_answer=True)
    tree = th.fit_tree(torch.cat(answers), 12)[0]
    gen = hl.Generator(model, heads=heads.eval(), tree_choices=tree, context_drafts=0)
    outs, stats = gen.generate([ids[:start] for ids, start in rows], 40, stop_at_eos=False)
    assert [ids[start:] for ids, start in rows] == outs  # the same answers
    replayed = [th.replay_decoding([a], tree) for a in answers]  # (one batch, in the rows' order)
    assert [r[1] for r in replayed] == stats.row_active
    assert 1.3 < sum(r[0] for r in replayed) / sum(r[1] for r in replayed) < 3.5  # steps skip, and miss


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
    counts = th.answer_counts(rows, 10)
    vocab = th.top_tokens(counts, 2)
    assert vocab.tolist() == [1, 2] and abs(th.coverage(counts, vocab) - 7 / 9) < 1e-6
    assert th.top_tokens(counts, 0) is None and th.top_tokens(counts, 10) is None
    model = tiny_model(6)
    heads = th.new_heads(model, "hydra++", 2, 1, vocab)
    assert heads.hc.draft_vocab == 2 and heads.vocab.tolist() == [1, 2]
    prompts = th.synthetic_prompts(200, seed=3)
    assert prompts == th.synthetic_prompts(200, seed=3) and len(set(prompts)) > 150
    assert not any("{" in p for p in prompts)


class LenTok:  # a prompt's first token is 1 + its length
    def encode_chat(self, messages):
        return [1 + len(messages[0]["content"]) % 50, 2, 3]


def test_make_data_answers_every_job():
    """Batches never mix temperatures, and no job is dropped where a batch would have (earlier, a batch that
    spanned two temperatures lost the second one's jobs). Greedy answers are made once per prompt: samples
    0 and 2 of each prompt are both greedy here, and would be the same answer twice."""
    model = tiny_model(9)
    rows = th.make_data(model, LenTok(), ["a", "bb", "ccc"], 3, [0.0, 1.0], 5, 4, extra_prompts=["dddd", "eeeee"])
    assert len(rows) == 3 * 2 + 2
    assert sorted(r[0][0] for r in rows) == sorted([2, 3, 4] * 2 + [5, 6])
    assert all(r[1] == 3 and len(r[0]) >= 4 for r in rows)


def test_make_data_stops_before_the_deadline(monkeypatch):
    """Each batch costs 10 s of a fake clock: with 25 s, a third batch (which would end at ~30 s) is not
    started, and the answers made so far come back."""
    model = tiny_model(9)
    clock, real_generate = [0.0], hl.Generator.generate

    def slow_generate(self, *args, **kwargs):
        clock[0] += 10
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(hl.Generator, "generate", slow_generate)
    monkeypatch.setattr(th.time, "time", lambda: clock[0])
    rows = th.make_data(model, LenTok(), ["a", "bb", "ccc", "dddd"], 2, [0.5, 1.0], 5, 2, deadline=25)
    assert len(rows) == 4 and clock[0] == 20  # 2 of the 4 batches of 2
    assert len(th.make_data(model, LenTok(), ["a", "bb", "ccc", "dddd"], 2, [0.5, 1.0], 5, 2)) == 8


def test_imitated_prompts(monkeypatch):
    """The base model continues a list of example requests; each new first line is a prompt (deduplicated,
    no copies of the examples, bounded even when the model writes nothing usable)."""
    class Tok:  # characters as token ids (the tiny model's vocabulary is 97)
        def encode(self, text):
            return [min(ord(c), 96) for c in text]

        def decode(self, ids):
            return "".join(chr(i) if i >= 32 or i == 10 else " " for i in ids)

    model = tiny_model(10)
    examples = ["how do i sort a list", "what is a mixin", "write a poem about rain", "two\nlines are skipped"]
    out = th.imitated_prompts(model, Tok(), examples, 5, 8, seed=0, max_new_tokens=12)
    assert 0 < len(out) <= 5 and len(set(out)) == len(out) and not set(out) & set(examples)
    assert all("\n" not in p and 8 <= len(p) <= 300 for p in out)
    with pytest.raises(hl.HydraLiteError, match="single-line"):
        th.imitated_prompts(model, Tok(), examples[:2], 5, 8)
    # Past the deadline: one batch, then stop (the model writes too few usable lines to reach 1000 in one).
    calls, real_generate = [0], hl.Generator.generate

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(hl.Generator, "generate", counted)
    out = th.imitated_prompts(model, Tok(), examples, 1000, 8, seed=0, max_new_tokens=12, deadline=0)
    assert calls[0] == 1 and len(out) < 1000


def test_fine_tuning_with_another_draft_vocabulary():
    """--init with a new draft vocabulary: the trained weights carry over, proposals come from the new
    vocabulary, and "auto" picks the smallest size that covers the held-out answers."""
    model = tiny_model(6)
    rows = greedy_rows(model, 6, 30, seed=3)
    heads = th.new_heads(model, "hydra++", 2, 1, torch.arange(0, 40))
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    vocab = torch.arange(50, 97)
    moved = th.with_draft_vocab(heads, vocab, model.cfg)
    assert torch.equal(moved.vocab, vocab) and moved.hc.draft_vocab == 47
    assert all(torch.equal(a, b) for (n, a), (m, b) in zip(heads.named_parameters(), moved.named_parameters()))
    with torch.no_grad():
        x = torch.randn(3, 2 * model.cfg.dim)  # head 0 reads h and the root's embedding
        assert torch.isin(moved.propose(0, x, model.output_weight, 5), vocab).all()
    old_sizes = th.VOCAB_SIZES
    try:
        th.VOCAB_SIZES = (10, 20, 97)
        counts = th.answer_counts(rows, 97)
        assert th.pick_vocab_size("auto", counts, counts) in (10, 20, 97)
        every_token = th.answer_counts([([1] * 5 + list(range(97)), 5)], 97)  # held-out answers using every token once
        assert th.pick_vocab_size("auto", counts, every_token) == 97
    finally:
        th.VOCAB_SIZES = old_sizes
    counts = th.answer_counts(rows, 97)
    assert th.pick_vocab_size(None, counts, counts) is None and th.pick_vocab_size("300", counts, counts) == 300


def test_deeper_heads_propose_what_they_did_and_train_on():
    """--init with more --n-layers: the new blocks start as the identity, so the proposals are unchanged (same
    top-10 ids and logits), and the new blocks get gradients (w = 0 still passes silu'(0) = 1/2 through)."""
    model = tiny_model(7)
    heads = th.new_heads(model, "hydra++", 3, 2, torch.randperm(model.cfg.vocab_size)[:60])
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    deeper = th.deeper_heads(heads, 4, model.cfg)
    assert deeper.hc.n_layers == 4 and all(len(h.blocks) == 4 for h in deeper.heads)
    assert torch.equal(deeper.vocab, heads.vocab)
    x = torch.randn(5, 3 * model.cfg.dim)  # head 1 reads h and two embeddings
    with torch.no_grad():
        want, got = (hh.propose(1, x, model.output_weight, 10) for hh in (heads, deeper))
        logits = [hh.heads[1](x, model.output_weight) for hh in (heads, deeper)]
    assert torch.equal(want, got) and torch.allclose(logits[0], logits[1], atol=1e-6)
    deeper.heads[1](x, model.output_weight).logsumexp(-1).sum().backward()
    assert deeper.heads[1].blocks[3].w.weight.grad.abs().sum() > 0


def test_more_heads_keep_the_old_ones_and_start_from_the_last():
    """--init with more --n-heads: the old heads propose exactly what they did; a new grounded head starts as
    the last one reading the path's last token where that one read its own last (the slots between at zero),
    and trains on."""
    model = tiny_model(9)
    dim = model.cfg.dim
    for kind in ("hydra++", "medusa"):
        heads = th.new_heads(model, kind, 2, 2, torch.randperm(model.cfg.vocab_size)[:60])
        for p in heads.parameters():
            torch.nn.init.normal_(p, std=0.3)
        more = th.more_heads(heads, 4, model.cfg)
        assert more.hc.n_heads == 4 and len(more.heads) == 4 and torch.equal(more.vocab, heads.vocab)
        grounded = kind != "medusa"
        with torch.no_grad():
            for k in range(2):  # the old heads, unchanged
                x = torch.randn(5, ((k + 2) if grounded else 1) * dim)
                assert torch.equal(heads.heads[k](x, model.output_weight), more.heads[k](x, model.output_weight))
            for k in (2, 3):  # head k reads h, e_0..e_k; the last old head (1) reads h, e_0, e_1
                x = torch.randn(5, ((k + 2) if grounded else 1) * dim)
                seen = torch.cat([x[:, :2 * dim], x[:, -dim:]], 1) if grounded else x
                want = heads.heads[1](seen, model.output_weight)
                assert torch.allclose(more.heads[k](x, model.output_weight), want, rtol=1e-5, atol=1e-4)
                if grounded:  # the slots in between really are read as zeros
                    y = x.clone()
                    y[:, 2 * dim:-dim] = torch.randn_like(y[:, 2 * dim:-dim])
                    assert torch.allclose(more.heads[k](y, model.output_weight), want, rtol=1e-5, atol=1e-4)
        x = torch.randn(5, (5 if grounded else 1) * dim)
        more.heads[3](x, model.output_weight).logsumexp(-1).sum().backward()
        assert more.heads[3].blocks[0].w.weight.grad.abs().sum() > 0
        assert heads.heads[1].blocks[0].w.weight.grad is None  # a copy, not shared


def test_keep_writes_the_first_heads_and_their_tree(tmp_path):
    """train_heads.py keep: the first N heads, as stored (bf16 stays bf16), proposing exactly what they did among
    all of them; the tree cut to N levels (a tree still: every parent kept), or another heads' tree of that depth."""
    model = tiny_model(9)
    heads = th.new_heads(model, "hydra++", 3, 2, torch.randperm(model.cfg.vocab_size)[:60])
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.3)
    tree = [[0], [1], [0, 0], [0, 1], [0, 0, 0], [1, 0], [0, 1, 0]]
    src, out, other = (str(tmp_path / n) for n in ("src", "out", "other"))
    hl.save_heads(heads.to(torch.bfloat16), src, model.cfg,
                  {"tree.json": tree, "train.json": {"held_out_rank_acc": [[0.5], [0.4], [0.3]]}})
    args = th.build_parser().parse_args(["keep", "--init", src, "--n-heads", "2", "--out", out])
    th.run_keep(args, model, torch.float32)
    kept, full = hl.load_heads(out, model), hl.load_heads(src, model)
    assert kept.hc.n_heads == 2 and len(kept.heads) == 2 and torch.equal(kept.vocab, full.vocab)
    assert kept.tree_choices == [[0], [1], [0, 0], [0, 1], [1, 0]]
    assert hl.read_json(os.path.join(out, "train.json"))["held_out_rank_acc"] == [[0.5], [0.4]]
    stored = hl.load_safetensors(hl.shard_files(out, "heads"))
    assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.bfloat16}
    assert all(torch.equal(t, hl.load_safetensors(hl.shard_files(src, "heads"))[k]) for k, t in stored.items())
    with torch.no_grad():
        for k in range(2):
            x = torch.randn(5, (k + 2) * model.cfg.dim)
            assert torch.equal(kept.heads[k](x, model.output_weight), full.heads[k](x, model.output_weight))
        h = torch.randn(1, 7, model.cfg.dim)
        assert torch.equal(kept.run_prefix(h, model.new_cache(1, 8).rope), full.run_prefix(h, model.new_cache(1, 8).rope))
    th.run_keep(th.build_parser().parse_args(["keep", "--init", src, "--n-heads", "3", "--tree-from", out,
                                              "--out", other]), model, torch.float32)
    assert hl.load_heads(other, model).tree_choices == kept.tree_choices and hl.load_heads(other, model).context_tree is None
    th.run_keep(th.build_parser().parse_args(["keep", "--init", src, "--n-heads", "3", "--context-tree-from", out,
                                              "--out", other]), model, torch.float32)
    six = hl.load_heads(other, model)  # all heads, their own tree, and the shallower one beside context drafts
    assert six.hc.n_heads == 3 and six.tree_choices == tree and six.context_tree == kept.tree_choices
    again = str(tmp_path / "again")  # from heads that have their own tree_context.json: that one, not their tree.json
    th.run_keep(th.build_parser().parse_args(["keep", "--init", src, "--n-heads", "3", "--context-tree-from", other,
                                              "--out", again]), model, torch.float32)
    assert hl.load_heads(again, model).context_tree == kept.tree_choices != tree
    with pytest.raises(hl.HydraLiteError, match="3 levels deep"):
        th.run_keep(th.build_parser().parse_args(["keep", "--init", src, "--n-heads", "2", "--tree-from", src,
                                                  "--out", other]), model, torch.float32)


@pytest.mark.parametrize("argv,match", [
    (["data", "--prompts", "q.jsonl", "--out", "x.txt"], "data files are .npz"),
    (["data", "--prompts", "/nonexistent.jsonl", "--out", "x.npz"], "not found"),
    (["data", "--prompts", "{prompts}", "--temperatures", "0,hot", "--out", "x.npz"], "comma-separated"),
    (["data", "--prompts", "{prompts}", "--temperatures", "-1", "--out", "x.npz"], "0 (greedy) or positive"),
    (["data", "--prompts", "{prompts}", "--batch", "0", "--out", "x.npz"], "--batch must be"),
    (["train", "--data", "/nonexistent.npz", "--out", "h"], "not found"),
    (["train", "--data", "{data}", "--steps", "0", "--out", "h"], "--steps must be"),
    (["train", "--data", "{data}", "--lr", "5", "--out", "h"], "--lr must be"),
    (["train", "--data", "{data}", "--draft-vocab", "lots", "--out", "h"], "--draft-vocab"),
    (["train", "--data", "{data}", "--out", "{shipped}"], "shipped with hydra-lite"),
    (["tree", "--data", "{data}", "--out", "/nonexistent"], "no heads in"),
    (["train", "--data", "{data}", "--device", "tpu9", "--out", "h"], "not a device"),
    (["train", "--steps", "x"], "invalid int value"),
    (["train", "--data", "{data}", "--n-layers", "0", "--out", "h"], "--n-layers must be"),
    (["train", "--data", "{data}", "--n-heads", "0", "--out", "h"], "--n-heads must be"),
    (["keep", "--init", "/nonexistent", "--n-heads", "2", "--out", "h"], "no heads in"),
])
def test_train_heads_mistakes_are_one_line(tmp_path, capsys, argv, match):
    """Refused before the model loads (the checkpoint named does not even exist): one line, exit 2."""
    (tmp_path / "q.jsonl").write_text('{"prompt": "hi"}\n')
    th.save_rows([([1, 2, 3], 1)], str(tmp_path / "d.npz"))
    fill = dict(prompts=str(tmp_path / "q.jsonl"), data=str(tmp_path / "d.npz"),
                shipped=os.path.join(hl.HERE, "heads", "smollm2-135m-hydra++"))
    with pytest.raises(SystemExit) if "invalid" in match else contextlib.nullcontext():
        rc = th.main([a.format(**fill) for a in argv] + ["--checkpoint", "/nonexistent"])
        assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_heads_are_saved_whole_or_not_at_all(tmp_path, monkeypatch):
    """A failure while writing leaves the earlier heads as they were (byte for byte), and a save replaces the
    whole directory: no stale file of the earlier heads survives."""
    import hashlib

    model = tiny_model(3)
    out = tmp_path / "heads"
    hl.save_heads(th.new_heads(model, "hydra", 2, 1), str(out), model.cfg, {"tree.json": [[0]], "stale.json": {}})
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.iterdir()}
    real_save = __import__("safetensors.torch", fromlist=["save_file"]).save_file

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", disk_full)
    with pytest.raises(OSError):
        hl.save_heads(th.new_heads(model, "hydra++", 3, 1), str(out))
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["heads"]  # no temp directory left behind
    monkeypatch.setattr("safetensors.torch.save_file", real_save)
    hl.save_heads(th.new_heads(model, "hydra++", 3, 1), str(out), model.cfg, {"tree.json": [[0], [1]]})
    assert sorted(f.name for f in out.iterdir()) == ["heads.json", "heads.safetensors", "tree.json"]
    again = hl.load_heads(str(out), model)
    assert again.hc.n_heads == 3 and again.tree_choices == [[0], [1]]
    assert hl.read_json(str(out / "heads.json"))["base"]["dim"] == model.cfg.dim


def test_old_style_data_files_load_without_running_code(tmp_path, monkeypatch):
    """.pt data files load with weights_only: a pickle that would run code is refused, also when the environment
    asks torch to allow it."""
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"rows": Boom()}, tmp_path / "evil.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        th.load_rows(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()
