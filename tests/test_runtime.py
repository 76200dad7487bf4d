"""Runtime invariants on tiny random models (CPU, float32): cached decoding equals a full forward, and greedy
speculative decoding (Medusa, Hydra, Hydra++) equals greedy autoregressive decoding token for token."""
import argparse
import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, sharp_init

import hydra_lite as hl


def tiny_model(seed, n_heads=4, n_kv_heads=2, tie=True, rope_scaling=None, vocab=97):
    torch.manual_seed(seed)
    cfg = hl.Config(dim=32 * n_heads // 2, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=80,
                    vocab_size=vocab, max_seq_len=1024, tie_embeddings=tie, rope_scaling=rope_scaling, eos_ids=[])
    model = hl.Llama(cfg)
    sharp_init(model)
    return model.eval()


def tiny_heads(model, grounded, prefix, seed=1, n_heads=4, lm_head="base", draft_vocab=0):
    torch.manual_seed(seed)
    c = model.cfg
    hc = hl.HeadsConfig(n_heads=n_heads, n_layers=2, dim=c.dim, vocab_size=c.vocab_size, grounded=grounded,
                        prefix=prefix, lm_head=lm_head, lm_bias=lm_head == "own", draft_vocab=draft_vocab)
    heads = hl.DraftHeads(hc, c)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    if draft_vocab:
        heads.vocab.copy_(torch.randperm(c.vocab_size)[:draft_vocab].sort().values)
    return heads.eval()


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


@pytest.mark.parametrize("n_heads,n_kv_heads,tie,scaling",
                         [(4, 4, True, None), (4, 2, False, None), (6, 2, True, LLAMA3_SCALING)])
def test_cached_decoding_equals_full_forward(n_heads, n_kv_heads, tie, scaling):
    model = tiny_model(seed=n_heads + n_kv_heads, n_heads=n_heads, n_kv_heads=n_kv_heads, tie=tie, rope_scaling=scaling)
    tokens = torch.randint(0, model.cfg.vocab_size, (3, 90))  # past original_max_position_embeddings
    full = model.forward_logits(tokens)
    cache = model.new_cache(3, 128)
    with torch.no_grad():
        pieces = [model.logits(model(tokens[:, :37], cache))]
        cache.lens += 37
        for t in range(37, 90):
            pieces.append(model.logits(model(tokens[:, t:t + 1], cache)))
            cache.lens += 1
    step = torch.cat(pieces, 1).float()
    assert (step - full).abs().max() < 1e-3 * full.abs().max()
    assert torch.equal(step.argmax(-1), full.argmax(-1))


def test_ragged_rows_match_single_rows():
    """A batch whose rows hold different lengths decodes each row as if it were alone."""
    model = tiny_model(3)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 17, 9)]
    gen = hl.Generator(model)
    batch, _ = gen.generate(prompts, 20, stop_at_eos=False)
    for p, out in zip(prompts, batch):
        alone, _ = hl.Generator(model).generate([p], 20, stop_at_eos=False)
        assert alone[0] == out


@pytest.mark.parametrize("grounded,prefix", [(False, False), (True, False), (True, True)], ids=["medusa", "hydra", "hydra++"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_speculative_equals_autoregressive(grounded, prefix, batch):
    model = tiny_model(10 + batch)
    heads = tiny_heads(model, grounded, prefix, lm_head="own" if grounded else "base")
    torch.manual_seed(batch)
    prompts = [torch.randint(0, 97, (int(n),)).tolist() for n in torch.randint(3, 30, (batch,))]
    ar, ar_stats = hl.Generator(model).generate(prompts, 48, stop_at_eos=False)
    spec, spec_stats = hl.Generator(model, heads=heads).generate(prompts, 48, stop_at_eos=False)
    assert spec == ar
    assert ar_stats.mean_accept == 1.0 and spec_stats.mean_accept >= 1.0


def test_fused_layers_compute_the_same_model(monkeypatch):
    """Fused layers (hl.FUSED: norms, SwiGLU and residual adds inside the matmuls, the norms' weights folded into the next
    projection): the same model as the unfused layers, in float32 as close to the float64 model as they are (the
    Hydra++ prefix layer too), and greedy speculative decoding still equals AR with it."""
    model = tiny_model(21)
    heads = tiny_heads(model, True, True)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40))
    h = torch.randn(2, 40, model.cfg.dim)

    def outputs(model, heads, h):
        return model.forward_logits(tokens).double(), heads.run_prefix(h, model.new_cache(2, 40).rope).double()
    with torch.no_grad():  # (_fused: on the CPU the fused layers' references, as the GPU runs their kernels)
        monkeypatch.setattr(hl, "_fused", lambda x: False)
        truth = outputs(copy.deepcopy(model).double(), copy.deepcopy(heads).double(), h.double())
        plain = outputs(model, heads, h)
        monkeypatch.setattr(hl, "_fused", lambda x: True)
        fused = outputs(model, heads, h)
    for want, a, b in zip(truth, plain, fused):
        err_plain, err_fused = (a - want).abs().max().item(), (b - want).abs().max().item()
        assert err_fused <= 2 * err_plain + 1e-6 * want.abs().max().item(), (err_plain, err_fused)
    with torch.no_grad():  # the folded weights follow a weight that changes in place
        model.layers[0].ffn_norm.weight.mul_(1.5)
        changed = model.forward_logits(tokens)
        monkeypatch.setattr(hl, "_fused", lambda x: False)
        want = model.forward_logits(tokens)
    assert (changed - fused[0]).abs().max() > 0.1
    torch.testing.assert_close(changed, want, rtol=0, atol=1e-5 * want.abs().max().item())
    monkeypatch.setattr(hl, "_fused", lambda x: True)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (4, 19)]
    ar, _ = hl.Generator(model).generate(prompts, 40, stop_at_eos=False)
    spec, stats = hl.Generator(model, heads=heads).generate(prompts, 40, stop_at_eos=False)
    assert spec == ar and stats.mean_accept >= 1.0


def test_oracle_drafts_are_accepted_and_compacted(monkeypatch):
    """Drafts that follow the true greedy continuation for a random number of steps per row: every such token
    must be accepted (mean acceptance > 1), and compaction must keep the output equal to plain decoding."""
    model = tiny_model(7)
    heads = tiny_heads(model, True, False)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (6, 13)]
    ar, _ = hl.Generator(model).generate(prompts, 60, stop_at_eos=False)
    gen = hl.Generator(model, heads=heads)
    real_draft = hl.draft
    gen_prompt_lens = [len(p) for p in prompts]
    rng = torch.Generator().manual_seed(0)

    def oracle_draft(sources, tree, inp):
        tokens, rows = real_draft(sources, tree, inp)
        for b in range(tokens.shape[0]):
            at = int(gen.workspace.cache.lens[b]) - gen_prompt_lens[b]  # index of the root in the output
            node, good = 0, int(torch.randint(0, tree.depth + 1, (1,), generator=rng))
            for d in range(1, good + 1):  # follow rank-0 children along the true continuation
                children = [i for i in range(tree.size) if int(tree.node_depth[i]) == d and int(tree.node_path[i, d - 1]) == node]
                if not children or at + d >= len(ar[b]):
                    break
                node = children[0]
                tokens[b, node] = ar[b][at + d]
        return tokens, rows

    monkeypatch.setattr(hl, "draft", oracle_draft)
    spec, stats = gen.generate(prompts, 60, stop_at_eos=False)
    assert spec == ar
    assert stats.mean_accept > 1.8


def test_tree_buffers():
    tree = hl.Tree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    assert tree.size == 7 and tree.depth == 3
    # nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [0,1], 5 [1,0], 6 [0,0,0]
    assert tree.node_depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.mask[6].nonzero().flatten().tolist() == [0, 1, 3, 6]
    assert tree.mask[5].nonzero().flatten().tolist() == [0, 2, 5]
    assert sorted(map(tuple, tree.retrieve.tolist())) == [(0, 1, 3, 6), (0, 1, 4, -1), (0, 2, 5, -1)]
    assert tree.levels[1]["parents"].tolist() == [1, 2] and tree.levels[1]["rank"].tolist() == [0, 1, 0]
    assert tree.levels[1]["node_of"].tolist() == [[3, 4], [5, -1]] and tree.levels[2]["node_of"].tolist() == [[6]]
    assert tree.levels[0]["path"].tolist() == [[0]] and tree.levels[1]["path"].tolist() == [[0, 1], [0, 2]]
    assert tree.levels[2]["path"].tolist() == [[0, 1, 3]]
    with pytest.raises(hl.HydraLiteError, match="no parent"):
        hl.Tree([[0, 1]])
    with pytest.raises(hl.HydraLiteError, match="twice"):
        hl.Tree([[0], [0]])
    assert len(hl.default_tree()) == 63 and hl.Tree(hl.default_tree()).depth == 4
    # a head that is always right at rank 0 gets a chain; a useless second head gets nothing below depth 1
    assert hl.build_tree([[1.0, 0.0], [1.0, 0.0]], 2) == [[0], [0, 0]]
    assert hl.build_tree([[0.6, 0.3, 0.1], [0.0, 0.0, 0.0]], 3) == [[0], [1], [2]]


def test_fused_block_projection_matches_training_path():
    """At inference a grounded block runs its two projections as one GEMM (stacked weights, cached); it must
    match the training path, and see in-place updates of its parameters."""
    torch.manual_seed(0)
    block = hl.ResBlock(16, 48)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        fused = block(x)
    train = block(x)
    assert train.requires_grad and torch.allclose(fused, train, atol=1e-5)
    with torch.no_grad():
        block.w.weight.mul_(-1)  # as an optimizer step does
        expected = hl.silu_add_ref(F.linear(x, block.res.weight, block.res.bias), F.linear(x, block.w.weight, block.w.bias))
        assert torch.allclose(block(x), expected, atol=1e-5)


def test_accept_greedy_ref():
    retrieve = torch.tensor([[0, 1, 3], [0, 1, 4], [0, 2, -1]])
    tokens = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    # row 0: base says 6 after root, 9 after node 1 -> path 0,1,4 accepted fully
    # row 1: base says 7 after root -> path 0,2 (length 2; the padding slot reads node 0's token 5, which
    #        the base predicts after node 2, but padding must never match)
    # row 2: base agrees with nothing -> root only
    pred = torch.tensor([[6, 9, 0, 0, 0], [7, 0, 5, 0, 0], [1, 1, 1, 1, 1]])
    n, path, out = hl.accept_greedy_ref(tokens, pred, retrieve)
    assert n.tolist() == [3, 2, 1]
    assert path.tolist() == [[0, 1, 4], [0, 2, 2], [0, 1, 2]]
    # the host's row: tokens along the path (the tail is unused), n, the base model's token after the last
    assert out.tolist() == [[5, 6, 9, 3, 0], [5, 7, 7, 2, 5], [5, 6, 7, 1, 1]]


def test_sampling():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = logits.argmax(-1)
    assert torch.equal(hl.sample(logits, hl.SamplingParams()), greedy)
    assert torch.equal(hl.sample(logits, hl.SamplingParams(temperature=1.0, top_k=1)), greedy)
    assert torch.equal(hl.sample(logits, hl.SamplingParams(temperature=1.0, top_p=1e-6)), greedy)
    draws = torch.stack([hl.sample(logits, hl.SamplingParams(temperature=1.0, top_k=3)) for _ in range(200)])
    top3 = logits.topk(3, -1).indices
    assert all((draws[:, b, None] == top3[b]).any(-1).all() for b in range(4))
    assert len(set(draws[:, 0].tolist())) > 1


def test_bad_inputs(tmp_path):
    model = tiny_model(0)
    with pytest.raises(hl.HydraLiteError, match="not found"):
        hl.load_model(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(hl.HydraLiteError, match="not valid JSON"):
        hl.load_model(str(tmp_path))
    with pytest.raises(hl.HydraLiteError, match="only 2 heads"):
        hl.Generator(model, heads=tiny_heads(model, True, False, n_heads=2), tree_choices=hl.default_tree(depth=4))
    with pytest.raises(hl.HydraLiteError, match="one of 'exact', 'typical'"):
        hl.Generator(model, acceptance="loose")
    with pytest.raises(hl.HydraLiteError, match="at least one token"):
        hl.Generator(model).generate([[]])
    with pytest.raises(hl.HydraLiteError, match="does not fit"):
        hl.Generator(model).generate([[1] * 2000])
    with pytest.raises(hl.HydraLiteError, match="multiple"):
        hl.Config(dim=32, n_layers=1, n_heads=4, n_kv_heads=3, hidden_dim=8, vocab_size=10)


def test_heads_save_load_roundtrip(tmp_path):
    model = tiny_model(2)
    heads = tiny_heads(model, True, True)
    hl.save_heads(heads, str(tmp_path), shard_mb=0.05)
    assert len(list(tmp_path.glob("heads-*.safetensors"))) > 2
    again = hl.load_heads(str(tmp_path), model)
    for (n, a), (m, b) in zip(heads.state_dict().items(), again.state_dict().items()):
        assert n == m and torch.equal(a, b)


@pytest.mark.parametrize("mode", ["ar", "spec"])
def test_finished_rows_stop_growing(mode, monkeypatch):
    """A row that hits EOS early keeps its cache length while the others go on (else it could fill the cache
    and end the whole batch early, cutting the other rows' answers short). (The batch kept whole: shrinking it
    would move the other row into the finished one's place.)"""
    monkeypatch.setattr(hl, "SHRINK", False)
    model = tiny_model(12)
    heads = tiny_heads(model, True, True)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (25, 4)]
    free, _ = hl.Generator(model).generate(prompts, 60, stop_at_eos=False)
    eos = free[0][2]
    model.cfg.eos_ids = [eos]
    try:
        ar, _ = hl.Generator(model).generate(prompts, 60)
        gen = hl.Generator(model, heads=heads)
        out, _ = gen.generate(prompts, 60, mode=mode)
    finally:
        model.cfg.eos_ids = []
    assert out == ar and len(out[0]) == 2
    # the host learns of the EOS one step late (one step is always in flight), so one more step may land
    grow = 1 if mode == "ar" else gen.tree.depth + 1
    assert int(gen.workspace.cache.lens[0]) <= len(prompts[0]) + 2 + 2 * grow


@pytest.mark.parametrize("heads", [False, True])
def test_a_batch_shrinks_as_its_rows_finish(heads, monkeypatch):
    """Rows that end at different steps (EOS tokens that each row meets at another point): the batch of 7 goes
    on over fewer rows, moved to the front of the caches, down to 1, and every row's output is the same as with
    the batch kept whole and as AR's for its prompt alone (float32)."""
    model = tiny_model(21)
    kw = dict(heads=tiny_heads(model, True, True), context_drafts=4) if heads else dict(context_drafts=6)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (9, 30, 4, 17, 25, 6, 12)]
    free, _ = hl.Generator(model).generate(prompts, 50, stop_at_eos=False)
    model.cfg.eos_ids = sorted({row[at] for row, at in zip(free, (45, 2, 30, 8, 38, 5, 14))})
    try:
        ar = [hl.Generator(model).generate([p], 50)[0][0] for p in prompts]
        runs = {}
        for shrink in (False, True):
            monkeypatch.setattr(hl, "SHRINK", shrink)
            runs[shrink] = hl.Generator(model, **kw).generate(prompts, 50)
    finally:
        model.cfg.eos_ids = []
    (whole, whole_stats), (shrunk, stats) = runs[False], runs[True]
    assert len({len(o) for o in ar}) > 3  # (rows end at different points)
    assert whole_stats.batches == [7] and stats.batches[0] == 7 and stats.batches[-1] == 1, stats.batches
    assert shrunk == whole == ar


def test_a_batch_near_the_context_stays_whole():
    """The smaller batch sizes verify bigger trees, which need more room past the rows' lengths: where the
    context cannot give it, the batch keeps its size (rather than refusing the prompt or cutting rows short),
    and every row is AR's."""
    model = tiny_model(23)
    model.cfg.max_seq_len = 160
    gen = hl.Generator(model, heads=tiny_heads(model, True, True))
    room, over = gen._room([gen.tree_for(8)])
    room_all, over_all = gen._room([gen.tree_for(b) for b in (8, 4, 2, 1)])
    n_new = 20
    longest = 160 - n_new - room - over  # fits with the batch's own tree, not with the smaller sizes' trees
    assert longest + n_new + room_all + over_all > 160
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (longest, 5, 9, 30, 12, 3, 40, 7)]
    out, stats = gen.generate(prompts, n_new, stop_at_eos=False)
    assert stats.batches == [8] and stats.cut_short == []
    assert out == [hl.Generator(model).generate([p], n_new, stop_at_eos=False)[0][0] for p in prompts]


def test_accept_typical():
    tree = hl.Tree([[0], [1], [0, 0]])  # nodes: 0 root, 1 [0], 2 [1], 3 [0,0]
    tokens = torch.tensor([[5, 6, 7, 8]])
    logits = torch.full((1, 4, 10), -20.0)
    logits[0, 0, 6] = 10.0  # after the root the base is sure of 6 (node 1)
    logits[0, 1, 8] = 0.0  # after node 1: flat over 8 and 9 -> p(8) = 0.5, high entropy
    logits[0, 1, 9] = 0.0
    acc = hl.accept_typical(hl.Verified(tree, tokens, given_logits=logits), hl.SamplingParams(1.0))
    assert acc.n.tolist() == [3] and acc.path.tolist() == [[0, 1, 3]]
    acc = hl.accept_typical(hl.Verified(tree, tokens, given_logits=logits),
                            hl.SamplingParams(1.0, typical_threshold=0.6, typical_alpha=1.0))
    assert acc.n.tolist() == [2]  # p(8) = 0.5 is not above min(0.6, exp(-ln 2)) = 0.5: rejected


def markov_decode(tree, table, draft_table, root, n_tokens, sp, acceptance, rows):
    """Speculative sampling of a first-order Markov "model" (the logits after token t are table[t]), drafts
    from the top ranks of draft_table[parent token] on `tree`, like draft() does with heads, `rows` sequences
    at once; a context chain in the tree repeats the heads' rank-0 path (every token drafted twice under one
    parent, as a context draft can be). Returns the first n_tokens sampled tokens [rows, n_tokens] and the mean
    acceptance length."""
    out = torch.full((rows, n_tokens), -1)
    count, last = torch.zeros(rows, dtype=torch.long), torch.full((rows,), root)
    steps = accepted = 0
    trees = tree if isinstance(tree, list) else [tree]  # several: row b has trees[b % len(trees)]
    group = torch.arange(rows) % len(trees)
    verified_tree = tree if len(trees) == 1 else per_row_trees([trees[g] for g in group.tolist()])
    while (count < n_tokens).any():
        tokens = last[:, None].repeat(1, trees[0].size)
        for g, tree in enumerate(trees):
            t = tokens[group == g]
            for lv in tree.levels:
                top = draft_table[t[:, lv["parents"]]].topk(lv["k"], dim=-1).indices  # [rows, n_par, k]
                fill = lv["node_of"] >= 0  # [n_par, k]: the (parent, rank) pairs that are nodes
                t[:, lv["node_of"][fill]] = top[:, fill]
            if tree.context:
                deepest = tree.choices.index([0] * tree.context) + 1  # the node at the end of the rank-0 path
                t[:, tree.context_nodes] = t[:, tree.node_path[deepest, 1:tree.context + 1]]
            tokens[group == g] = t
        logits = table[tokens]  # [rows, T, V]
        acc = hl.ACCEPTANCE_RULES[acceptance](hl.Verified(verified_tree, tokens, given_logits=logits), sp)
        n, path, nxt = acc.n, acc.path, acc.next_token
        emitted = torch.cat([tokens.gather(1, path)[:, 1:], nxt[:, None]], dim=1)  # valid: the first n
        emitted.scatter_(1, (n - 1)[:, None], nxt[:, None])
        j = torch.arange(emitted.shape[1])
        pos = count[:, None] + j
        keep = (j < n[:, None]) & (pos < n_tokens)
        out[torch.arange(rows)[:, None].expand_as(pos)[keep], pos[keep]] = emitted[keep]
        count, last = count + n, nxt
        steps, accepted = steps + 1, accepted + n.float().mean().item()
    return out, accepted / steps


def per_row_trees(trees):
    """TreeRows with row b shaped as trees[b] (one size and depth), its paths to every node, and its sampling
    tables derived from the parents, as a dynamic tree's are."""
    def paths(t):
        j = torch.arange(t.depth + 1)
        return torch.where(j[None] <= t.node_depth[:, None], t.node_path, -1)
    return hl.TreeRows(torch.stack([t.parent for t in trees]), torch.stack([t.node_depth for t in trees]),
                       torch.stack([t.mask for t in trees]), torch.stack([paths(t) for t in trees]))


def chi_square_ok(samples, probs, z=4.3):
    """Pearson's chi-square of samples (cell ids) against probs, cells expected < 5 times pooled; passes
    unless it is past the (1 - 1e-5)-quantile (Wilson-Hilferty, z = 4.3). Returns (ok, statistic, limit)."""
    n = len(samples)
    counts = torch.bincount(samples, minlength=len(probs)).double()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum().item()
    k = len(exp) - 1
    limit = k * (1 - 2 / (9 * k) + z * (2 / (9 * k)) ** 0.5) ** 3
    return stat < limit, stat, limit


@pytest.mark.parametrize("context,per_row", [(0, False), (3, False), (3, True)],
                         ids=["heads", "heads+context", "a tree per row"])
@pytest.mark.parametrize("sp", [hl.SamplingParams(temperature=1.0), hl.SamplingParams(temperature=0.7, top_p=0.8),
                                hl.SamplingParams(temperature=1.3, top_k=3)])
def test_accept_exact_samples_the_base_distribution(sp, context, per_row):
    """Speculative sampling with exact acceptance: the first three tokens are distributed as the base model's
    own sampling (its joint probability, checked by chi-square over 30,000 sequences on fresh random tables),
    while accepting more than one token per step; also when rows verify differently shaped trees (TreeRows, as
    dynamic trees do). Typical acceptance, on the same draws, is not (the check has the power to fail)."""
    import random
    seed = random.randrange(2 ** 31)
    torch.manual_seed(seed)
    V = 5
    while True:  # a table whose three-token outcomes are not close to certain (else there is nothing to test)
        table = torch.randn(V, V) * 1.5
        p = hl.sampling_logits(table, sp).softmax(-1)  # p[a, b]: the base model's chance of b after a
        joint = (p[2][:, None, None] * p[:, :, None] * p[None]).flatten()  # the first three tokens after root 2
        if (joint * 30000 >= 5).sum() >= 10:
            break
    draft_table = table + 0.7 * torch.randn(V, V)  # drafts: mostly, not always, the base model's top tokens
    tree = hl.Tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1]], context=context)
    if per_row:
        tree = [tree, hl.Tree([[0], [1], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [0, 0, 0]], context=context)]
    for acceptance in ("exact", "typical"):
        out, mean_accept = markov_decode(tree, table, draft_table, 2, 3, sp, acceptance, 30000)
        ok, stat, limit = chi_square_ok(out[:, 0] * V * V + out[:, 1] * V + out[:, 2], joint)
        if acceptance == "exact":
            assert ok and mean_accept > 1.3, (seed, stat, limit, mean_accept)
        else:
            assert not ok, (seed, stat, limit)


def test_exact_acceptance_without_dropping_repeats_is_not_lossless(monkeypatch):
    """The check above has the power to catch a token drafted twice under one parent being tried twice: with
    drop_repeats poisoned (a no-op), the context chain's copies of the heads' path skew the distribution."""
    torch.manual_seed(5)
    V, sp = 5, hl.SamplingParams(temperature=1.0)
    table = torch.randn(V, V) * 1.5
    p = table.softmax(-1)
    joint = (p[2][:, None, None] * p[:, :, None] * p[None]).flatten()
    tree = hl.Tree([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 1]], context=3)
    monkeypatch.setattr(hl, "drop_repeats", lambda p_node, tokens, tree: p_node)
    out, _ = markov_decode(tree, table, table, 2, 3, sp, "exact", 30000)
    ok, stat, limit = chi_square_ok(out[:, 0] * V * V + out[:, 1] * V + out[:, 2], joint)
    assert not ok, (stat, limit)


def test_accept_exact_rejects_then_draws_the_rest():
    """After the root, p = [0.5, 0.3, 0.2] over tokens 0-2 and the tree drafts tokens 0 and 1 (in that
    order): token 0 comes first with 0.5, token 1 with 0.3 / (1 - 0.5), and token 2 only from what is left."""
    tree = hl.Tree([[0], [1]])
    tokens = torch.tensor([[2, 0, 1]]).repeat(20000, 1)
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))[None, None].repeat(20000, 3, 1)
    torch.manual_seed(0)
    acc = hl.accept_exact(hl.Verified(tree, tokens, given_logits=logits), hl.SamplingParams(temperature=1.0))
    n, path, nxt = acc.n, acc.path, acc.next_token
    first = torch.where(n == 2, tokens.gather(1, path)[:, 1], nxt)
    share = torch.bincount(first, minlength=3).float() / len(first)
    assert torch.allclose(share, torch.tensor([0.5, 0.3, 0.2]), atol=0.015), share
    assert (nxt[n == 1] == 2).all()  # both drafts rejected: only token 2 is left


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("acceptance", ["exact", "typical"])
def test_sampled_speculative_decoding(prefix, acceptance):
    model = tiny_model(14)
    heads = tiny_heads(model, True, prefix)
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5]]
    greedy, _ = hl.Generator(model).generate(prompts, 30, stop_at_eos=False)
    gen = hl.Generator(model, heads=heads, acceptance=acceptance)
    cold, _ = gen.generate(prompts, 30, hl.SamplingParams(temperature=1e-3), stop_at_eos=False)
    assert cold == greedy  # near-zero temperature: both acceptance rules degenerate to greedy verification
    torch.manual_seed(0)
    hot, stats = gen.generate(prompts, 30, hl.SamplingParams(temperature=1.0, top_p=0.9), stop_at_eos=False)
    assert hot != greedy and all(len(o) == 30 and all(0 <= t < 97 for t in o) for o in hot)
    assert stats.mean_accept >= 1.0


@pytest.mark.parametrize("lm_head", ["base", "own"])
def test_draft_vocabulary(tmp_path, lm_head):
    """Heads with a draft vocabulary propose the best tokens of that vocabulary only, keep it through save and
    load, and greedy speculative decoding with them still equals AR."""
    model = tiny_model(21)
    heads = tiny_heads(model, True, True, lm_head=lm_head, draft_vocab=40)
    vocab, lm_w = heads.vocab, model.output_weight
    for d in range(4):
        x = torch.randn(2, 3, (d + 2) * model.cfg.dim)
        ids = heads.propose(d, x, lm_w, 5)
        expected = vocab[heads.heads[d](x, lm_w)[..., vocab].topk(5, dim=-1).indices]
        assert torch.equal(ids, expected)
    hl.save_heads(heads, str(tmp_path))
    again = hl.load_heads(str(tmp_path), model)
    assert again.vocab.dtype == torch.long and torch.equal(again.vocab, vocab)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (7, 19)]
    ar, _ = hl.Generator(model).generate(prompts, 40, stop_at_eos=False)
    spec, stats = hl.Generator(model, heads=again).generate(prompts, 40, stop_at_eos=False)
    assert spec == ar and stats.mean_accept >= 1.0
    bad = tmp_path / "bad"
    heads.vocab[0] = 97  # outside the base vocabulary
    hl.save_heads(heads, str(bad))
    with pytest.raises(hl.HydraLiteError, match="draft vocabulary"):
        hl.load_heads(str(bad), model)


def test_proposal_weights_cut_follows_updates():
    """The draft-vocabulary cut of a head's output projection is cached for inference; an in-place update of
    the weights (an optimizer step, a load) rebuilds it instead of serving stale rows."""
    cfg = hl.Config(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=24, vocab_size=40, max_seq_len=32)
    hc = hl.HeadsConfig(n_heads=2, n_layers=1, dim=16, vocab_size=40, grounded=False, prefix=False, lm_head="own",
                        lm_bias=True, draft_vocab=5)
    heads = hl.DraftHeads(hc, cfg)
    heads.vocab.copy_(torch.tensor([1, 4, 9, 16, 25]))
    for p in heads.parameters():
        torch.nn.init.normal_(p)
    with torch.no_grad():
        w, b = heads.proposal_weights(1, None)
        lm = heads.heads[1].lm
        assert torch.equal(w, lm.weight[heads.vocab]) and torch.equal(b, lm.bias[heads.vocab])
        lm.weight.mul_(2)
        lm.bias.add_(1)
        w2, b2 = heads.proposal_weights(1, None)
        assert torch.equal(w2, 2 * w) and torch.equal(b2, b + 1)
        heads.proposal_weights(0, None)
        assert len(heads._cut) == 2  # one cut per head's own projection: the stale one was replaced


def context_match_oracle(history, length, k, ngram):
    """A plain-Python prompt lookup over one row (history: the tokens up to and including the root), written
    independently of hydra_lite.context_match: the longest earlier match of the last tokens (up to ngram), the
    latest among equals, and the k tokens after it (wrapping within the known text)."""
    best, best_len = None, 0
    for j in range(len(history) - 1):  # a match ends at j < the root's position
        n = 0
        while n < ngram and j - n >= 0 and history[j - n] == history[len(history) - 1 - n]:
            n += 1
        if n >= best_len and n > 0:
            best, best_len = j, n
    if best is None:
        return [history[-1]] * k, 0
    known = history[best + 1:]
    return [known[i % len(known)] for i in range(k)], best_len


def test_context_match_against_a_plain_oracle():
    torch.manual_seed(3)
    for _ in range(40):
        B, S, k, ngram = 3, 40, 5, 4
        history = torch.randint(0, 4, (B, S))  # a small vocabulary: many matches of every length
        lens = torch.randint(0, S - 1, (B,))
        tokens, length = hl.context_match(history, lens, k, ngram)
        for b in range(B):
            expected, n = context_match_oracle(history[b, :lens[b] + 1].tolist(), int(lens[b]), k, ngram)
            assert tokens[b].tolist() == expected and int(length[b]) == n, (history[b, :lens[b] + 1], lens[b])
    # by hand: a repeat of "5 6 7" continues with what followed it; a loop wraps; no match repeats the root
    h = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 0, 0], [1, 2, 3, 1, 2, 3, 1, 0, 0, 0], [4, 4, 4, 9, 0, 0, 0, 0, 0, 0]])
    tokens, length = hl.context_match(h, torch.tensor([7, 6, 3]), 5)
    assert tokens.tolist() == [[8, 9, 5, 6, 7], [2, 3, 1, 2, 3], [9, 9, 9, 9, 9]] and length.tolist() == [3, 4, 0]


def test_context_replay_counts_steps():
    """scripts/context_replay.py: an answer that repeats the prompt is drafted a chain at a time; one that never
    repeats takes a step a token."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import context_replay

    prompt = list(range(10, 40))
    assert context_replay.chain_steps(prompt, prompt[:23], 4, 10) == 3  # root + 10, root + 10, root
    assert context_replay.chain_steps(prompt, list(range(50, 62)), 4, 10) == 12


@pytest.mark.parametrize("with_heads", [False, True], ids=["context", "heads+context"])
def test_context_drafts_are_accepted_and_recorded(monkeypatch, with_heads):
    """Context chains that hold the true greedy continuation are accepted (many tokens per step), the output
    equals plain decoding, and the history the matcher reads is the text so far (prompt, answer, root)."""
    model = tiny_model(7)
    heads = tiny_heads(model, True, True) if with_heads else None
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (6, 13)]
    ar, _ = hl.Generator(model).generate(prompts, 60, stop_at_eos=False)
    gen = hl.Generator(model, heads=heads, context_drafts=6)
    checked = []

    def true_continuation(history, lens, k, ngram=4):
        rows = []
        for b, p in enumerate(prompts):
            at = int(lens[b]) - len(p)  # the root's index in the answer
            if at < len(ar[b]):  # (the step in flight at the end runs past the answer)
                assert history[b, :int(lens[b]) + 1].tolist() == p + ar[b][:at + 1]
            rows.append((ar[b][at + 1:at + 1 + k] + [0] * k)[:k])
            checked.append(1)
        return torch.tensor(rows), torch.full((len(prompts),), ngram)

    monkeypatch.setattr(hl, "context_match", true_continuation)
    spec, stats = gen.generate(prompts, 60, stop_at_eos=False)
    assert spec == ar and checked
    assert stats.mean_accept > 5.0, stats.mean_accept


@pytest.mark.parametrize("shrink", [False, True])
def test_a_row_past_its_budget_does_not_stop_the_others(shrink, monkeypatch):
    """A row whose last step accepts a long chain past its budget (an oracle chain: the true continuation) ends
    while the other row, drafted nothing useful, goes on; with the longest prompt just short of a cache-size
    boundary, the finished row's length must not stop the other row short of its tokens (it did: the cache had
    no room for the overshoot). Output equals AR for every prompt length around the boundary, with the batch
    kept whole and shrunk to the other row once row 0 is done."""
    model = tiny_model(7)
    monkeypatch.setattr(hl, "SHRINK", shrink)
    gen, n_new = hl.Generator(model, context_drafts=16), 60
    tree = gen.tree_for(2)  # (the same as batch 1's: context drafts of 16 at every batch size)
    tight = 256 - n_new - 2 * (tree.size + 1)  # the longest prompt that fits the smallest cache, before the fix
    for L in (tight - tree.depth + 1, tight - 3, tight):
        torch.manual_seed(L)
        prompts = [torch.randint(0, 97, (L,)).tolist(), torch.randint(0, 97, (5,)).tolist()]
        longer, _ = hl.Generator(model).generate(prompts, n_new + tree.depth + 1, stop_at_eos=False)

        def oracle(history, lens, k, ngram=4, prompts=prompts, longer=longer):  # row 0: the truth; row 1: zeros
            at = int(lens[0]) - len(prompts[0])  # (< 0: prompt 1 moved up into row 0, prompt 0 done)
            rows = [(longer[0][at + 1:at + 1 + k] + [0] * k)[:k] if at >= 0 else [0] * k] + [[0] * k] * (len(lens) - 1)
            return torch.tensor(rows), torch.full((len(lens),), ngram)

        monkeypatch.setattr(hl, "context_match", oracle)
        spec, stats = gen.generate(prompts, n_new, stop_at_eos=False)
        assert stats.row_accepted[0] > n_new and stats.row_active[0] < 6  # (row 0 ran long steps past its budget)
        assert spec == [a[:n_new] for a in longer], (L, [len(o) for o in spec])
        assert stats.cut_short == []


def test_rows_cut_short_by_the_context_are_reported(capsys):
    """A model whose context cannot hold a row's budget: generation stops there, and the stats (and the command
    line's report) say which rows stopped short; rows that ended on their own are not among them."""
    model = tiny_model(9)
    model.cfg.max_seq_len = 96
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (50, 8)]
    small_tree = dict(tree_nodes_by_batch=((1 << 30, 8),))  # (a tree that leaves the prompt room in 96 slots)
    for gen in (hl.Generator(model), hl.Generator(model, heads=tiny_heads(model, True, True), context_drafts=4, **small_tree)):
        out, stats = gen.generate(prompts, 200, stop_at_eos=False)
        assert stats.cut_short == [0, 1] and all(len(o) < 200 for o in out)
        assert len(out[0]) + 50 <= 96
        out, stats = gen.generate(prompts, 5, stop_at_eos=False)
        assert stats.cut_short == [] and [len(o) for o in out] == [5, 5]
    hl.print_stats("ar", hl.Stats(cut_short=[0, 2]), argparse.Namespace(device="cpu"))
    assert "answer 1, 3 stopped short of --max-new-tokens" in capsys.readouterr().err
    hl.print_stats("spec", hl.Stats(batches=[8, 4, 1]), argparse.Namespace(device="cpu"))
    assert "the batch shrank as its answers ended: 8 -> 4 -> 1" in capsys.readouterr().err


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_speculative_with_context_drafts_equals_autoregressive(batch):
    """The real matcher (not an oracle) on repetitive prompts: whatever the chain drafts, output equals AR."""
    model = tiny_model(20 + batch)
    heads = tiny_heads(model, True, True)
    torch.manual_seed(batch)
    base = [torch.randint(0, 97, (7,)).tolist() for _ in range(batch)]
    prompts = [b * 3 + b[:2] for b in base]  # a repeated span: the matcher finds it
    ar, _ = hl.Generator(model).generate(prompts, 40, stop_at_eos=False)
    for h in (None, heads):
        spec, stats = hl.Generator(model, heads=h, context_drafts=5).generate(prompts, 40, stop_at_eos=False)
        assert spec == ar and stats.mean_accept >= 1.0


def test_default_context_chain_is_by_batch(monkeypatch):
    """With heads and no chain length given, each batch size verifies the chain of CONTEXT_DRAFTS_BY_BATCH (here
    the CPU's table, replaced): a long chain at batch 1, a short one at batch 3, none without heads; a length
    given is used at every batch; greedy output equals AR at both."""
    monkeypatch.setattr(hl, "CPU_CONTEXT_DRAFTS_BY_BATCH", ((1, 7), (1 << 30, 2)))
    model = tiny_model(33)
    heads = tiny_heads(model, True, True)
    gen = hl.Generator(model, heads=heads)
    assert (gen.tree_for(1).context, gen.tree_for(3).context) == (7, 2) and "context drafts 7" in gen.describe(1)
    fixed = hl.Generator(model, heads=heads, context_drafts=4)
    assert (fixed.tree_for(1).context, fixed.tree_for(3).context) == (4, 4)
    assert hl.Generator(model).tree is None
    torch.manual_seed(4)
    base = [torch.randint(0, 97, (6,)).tolist() for _ in range(3)]
    prompts = [b * 3 + b[:2] for b in base]
    for batch in (1, 3):
        ar, _ = hl.Generator(model).generate(prompts[:batch], 30, stop_at_eos=False)
        assert gen.generate(prompts[:batch], 30, stop_at_eos=False)[0] == ar


def test_heads_context_tree_is_used_beside_context_drafts():
    """Heads that ship tree_context.json: a shallower tree with context drafts (the heads draft only that deep),
    their own tree without; greedy output equals AR either way."""
    model = tiny_model(31)
    heads = tiny_heads(model, True, True)  # (4 heads)
    heads.tree_choices = hl.default_tree(depth=4)
    heads.context_tree = [[0], [1], [0, 0], [0, 1], [1, 0]]
    with_ctx, without = hl.Generator(model, heads=heads, context_drafts=3), hl.Generator(model, heads=heads, context_drafts=0)
    assert with_ctx.tree_choices == heads.context_tree and with_ctx.tree.depth == 3  # (the chain: 3 deep)
    assert len(with_ctx.tree.levels) == 2 and without.tree_choices == heads.tree_choices and len(without.tree.levels) == 4
    torch.manual_seed(3)
    prompts = [torch.randint(0, 97, (9,)).tolist() for _ in range(2)]
    ar, _ = hl.Generator(model).generate(prompts, 30, stop_at_eos=False)
    for gen in (with_ctx, without):
        assert gen.generate(prompts, 30, stop_at_eos=False)[0] == ar


def test_tree_with_a_context_chain():
    tree = hl.Tree([[0], [1], [0, 0]], context=3)  # nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4-6 the chain
    assert tree.size == 7 and tree.depth == 3 and tree.context_nodes.tolist() == [4, 5, 6]
    assert tree.parent.tolist() == [0, 0, 0, 1, 0, 4, 5] and tree.node_depth.tolist() == [0, 1, 1, 2, 1, 2, 3]
    assert tree.retrieve.tolist() == [[0, 2, -1, -1], [0, 1, 3, -1], [0, 4, 5, 6]]
    assert tree.mask[6].nonzero().flatten().tolist() == [0, 4, 5, 6]
    assert [lv["nodes"].tolist() for lv in tree.levels] == [[1, 2], [3]]  # the heads fill only their own nodes
    assert tree.earlier_siblings[4].nonzero().flatten().tolist() == [1, 2]  # the chain is tried after the heads
    assert hl.Tree([], context=2).retrieve.tolist() == [[0, 1, 2]]
    with pytest.raises(hl.HydraLiteError, match="at least one"):
        hl.Tree([])


def test_tree_size_by_batch_and_pruning():
    """Larger batches verify the heads' most likely paths only; every kept path keeps its parent."""
    model = tiny_model(2)
    heads = tiny_heads(model, True, False)
    gen = hl.Generator(model, heads=heads, tree_choices=hl.default_tree(), context_drafts=4,
                       tree_nodes_by_batch=((1, 63), (8, 20), (1 << 30, 5)))
    assert [gen.tree_for(b).size for b in (1, 2, 8, 9)] == [64 + 4, 21 + 4, 21 + 4, 6 + 4]
    kept = gen.tree_for(9).choices
    assert all(c[:-1] in kept or len(c) == 1 for c in kept) and [0] in kept and [0, 0] in kept
    acc = [[0.1, 0.9], [0.5, 0.5]]  # rank 1 is the better first guess: it is kept first
    assert hl.prune_tree([[0], [1], [1, 0], [0, 0]], 2, acc) == [[1], [1, 0]]


def test_default_head_tree_is_smaller_beside_a_context_chain():
    """By default a chain beside the heads cuts their tree to TREE_NODES_BESIDE_CHAIN_BY_BATCH; heads alone keep
    TREE_NODES_BY_BATCH (the chain takes the long accepts that deep head nodes would)."""
    model = tiny_model(2)
    heads = tiny_heads(model, True, False)
    alone = hl.Generator(model, heads=heads, tree_choices=hl.default_tree(), context_drafts=0)
    beside = hl.Generator(model, heads=heads, tree_choices=hl.default_tree(), context_drafts=5)
    for batch in (1, 2, 3, 8, 40):
        nodes = [next(n for b, n in table if batch <= b)
                 for table in (hl.TREE_NODES_BY_BATCH, hl.TREE_NODES_BESIDE_CHAIN_BY_BATCH)]
        assert alone.tree_for(batch).size == 1 + min(nodes[0], len(hl.default_tree()))
        assert beside.tree_for(batch).size == 1 + 5 + min(nodes[1], len(hl.default_tree()))
    assert beside.tree_for(1).size < alone.tree_for(1).size


def test_warmup_leaves_nothing_to_build(monkeypatch):
    model = tiny_model(4)
    gen = hl.Generator(model, heads=tiny_heads(model, True, True))
    gen.warmup([2], modes=["ar", "spec"], progress=lambda text: None)
    assert len(gen.workspaces) == 2 * 3  # AR and spec, caches of 256, 512 and 1024 (the context)
    monkeypatch.setattr(gen, "_build_workspace", lambda key: pytest.fail(f"built {key} after warm-up"))
    for n in (3, 300, 700):
        gen.generate([[1] * n, [2] * 5], 40, stop_at_eos=False)
        gen.generate([[1] * n, [2] * 5], 40, stop_at_eos=False, mode="ar")
    assert [hl.cache_bucket(n, 8192) for n in (1, 256, 257, 5000, 9000)] == [256, 256, 512, 8192, 8192]


# ----------------------------------------------------------------------------------------------------------
# Dynamic trees


def dynamic_tree_oracle(heads, model, h, root, depth, width, top, nodes):
    """The paths (token tuples after the root) a dynamic tree should verify, by a plain search per row: the
    root's top children; per depth, the `width` best candidates of the last depth get their `top` best
    children; a candidate's score is the sum of its tokens' draft log-probabilities (minus 1e-4 per depth, the
    runtime's tie-break); the `nodes` best candidates are kept."""
    lm_w, out = model.output_weight, []
    for b in range(h.shape[0]):
        level, candidates = [((), 0.0)], []
        for d in range(depth):
            frontier = level if d == 0 else sorted(level, key=lambda c: -c[1])[:width]
            level = []
            for path, score in frontier:
                toks = torch.tensor([int(root[b])] + list(path))
                x = torch.cat([h[b], model.embed.weight[toks].flatten()]) if heads.hc.grounded else h[b]
                w, bias = heads.proposal_weights(d, lm_w)
                logp = F.linear(heads.heads[d].features(x), w, bias).float().log_softmax(-1)
                values, ids = logp.topk(top)
                ids = heads.vocab[ids] if heads.vocab is not None else ids
                level += [(path + (int(t),), score + float(v)) for v, t in zip(values, ids)]
            candidates += level
        best = sorted(candidates, key=lambda c: -(c[1] - 1e-4 * len(c[0])))[:nodes]
        out.append({path for path, _ in best})
    return out


def check_tree_rows(tokens, rows, n_nodes):
    """Structure every TreeRows must have; returns each row's verified head paths as token tuples."""
    paths = []
    for b in range(tokens.shape[0]):
        parent, depth = rows.parent[b].tolist(), rows.node_depth[b].tolist()
        row_paths = set()
        for i in range(1, len(parent)):
            assert parent[i] < i and depth[i] == depth[parent[i]] + 1
            chain = hl.ancestry(parent, i)
            assert rows.mask[b, i].nonzero().flatten().tolist() == chain
            assert rows.retrieve[b, i, :len(chain)].tolist() == chain and (rows.retrieve[b, i, len(chain):] == -1).all()
            if i <= n_nodes:
                row_paths.add(tuple(tokens[b, chain[1:]].tolist()))
        paths.append(row_paths)
    return paths


@pytest.mark.parametrize("grounded,prefix,draft_vocab", [(False, False, 0), (True, False, 0), (True, True, 40)],
                         ids=["medusa", "hydra", "hydra++ draft vocab"])
def test_dynamic_tree_against_a_plain_search(grounded, prefix, draft_vocab):
    """Each row grows its own tree: the verified paths are those of a plain per-row search, and the structure
    (parents before children, masks of ancestors, paths, the context chain after the heads' nodes) holds."""
    model = tiny_model(30)
    heads = tiny_heads(model, grounded, prefix, draft_vocab=draft_vocab)
    B, nodes, depth, width, top = 3, 12, 3, 3, 4
    tree = hl.DynamicTree(nodes, depth, width, top, context=4)
    h, root = torch.randn(B, model.cfg.dim), torch.randint(0, 97, (B,))
    history, lens = torch.randint(0, 5, (B, 40)), torch.tensor([20, 30, 25])
    with torch.no_grad():
        tokens, rows = hl.draft([hl.HeadDrafts(heads, model), hl.ContextDrafts()], tree,
                                hl.DraftInput(root, h, history, lens))
        expected = dynamic_tree_oracle(heads, model, h, root, depth, width, top, nodes)
    assert tokens.shape == (B, 1 + nodes + 4) and torch.equal(tokens[:, 0], root)
    assert check_tree_rows(tokens, rows, nodes) == expected
    assert len({tuple(r) for r in rows.parent.tolist()}) > 1  # rows differ
    chain = hl.context_match(history, lens, 4)[0]
    assert torch.equal(tokens[:, 1 + nodes:], chain)
    assert rows.parent[:, 1 + nodes:].tolist() == [[0] + list(range(1 + nodes, 4 + nodes))] * B


def test_tree_rows_derive_siblings_and_children():
    """A static tree's sampling tables (built node by node) equal the ones TreeRows derives from the parents."""
    import random
    rng = random.Random()
    choices = hl.build_tree([[rng.random() for _ in range(5)] for _ in range(3)], rng.randrange(3, 30))
    tree = hl.Tree(choices, context=rng.randrange(0, 4))
    rows = tree.rows(2)
    derived = hl.TreeRows(rows.parent, rows.node_depth, rows.mask, rows.retrieve)
    assert torch.equal(derived.earlier_siblings, rows.earlier_siblings)
    assert torch.equal(derived.children, rows.children)


@pytest.mark.parametrize("grounded,prefix", [(False, False), (True, True)], ids=["medusa", "hydra++"])
def test_greedy_speculative_with_dynamic_trees_equals_autoregressive(grounded, prefix):
    model = tiny_model(31)
    heads = tiny_heads(model, grounded, prefix, lm_head="own" if grounded else "base")
    prompts = [torch.randint(0, 97, (int(n),)).tolist() for n in torch.randint(3, 30, (3,))]
    ar, _ = hl.Generator(model).generate(prompts, 40, stop_at_eos=False)
    gen = hl.Generator(model, heads=heads, dynamic=True, context_drafts=3, tree_nodes_by_batch=((1 << 30, 12),))
    assert "12-node dynamic tree" in gen.describe(3)
    spec, stats = gen.generate(prompts, 40, stop_at_eos=False)
    assert spec == ar and stats.mean_accept >= 1.0
    cold, _ = gen.generate(prompts, 40, hl.SamplingParams(temperature=1e-3), stop_at_eos=False)
    assert cold == ar  # sampled (exact acceptance) at near-zero temperature: greedy


def test_bucketed_prefill_equals_plain_prefill(monkeypatch):
    """On the GPU a prefill is padded to a length bucket (and captured): padding must not change any row's
    answer, the token history the context drafts read, or a conversation's next turn (cached tokens first)."""
    model = tiny_model(32)
    heads = tiny_heads(model, True, True)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 23, 17)]
    plain, padded = (hl.Generator(model, FakeTokenizer(), heads, context_drafts=3) for _ in range(2))
    buckets = []
    monkeypatch.setattr(padded, "_prefill_bucket", lambda ws, T, cached: buckets.append(T) or max(16, 1 << T.bit_length()))
    expected, _ = plain.generate(prompts, 24, stop_at_eos=False)
    out, _ = padded.generate(prompts, 24, stop_at_eos=False)
    assert out == expected and buckets == [23]
    for b, p in enumerate(prompts):
        assert padded.workspace.history[b, :len(p)].tolist() == p
    chats = [hl.Conversation(plain), hl.Conversation(padded)]
    answers = [[chat.say(text, max_new_tokens=12)[0] for text in ("3 4 5", "6 7 8 9")] for chat in chats]
    assert answers[0] == answers[1] and len(buckets) == 3 and buckets[-1] <= 8  # the second turn: its new tokens only


def test_chunked_prefill_equals_one_piece(monkeypatch):
    """A prefill over PREFILL_GRAPH_TOKENS padded tokens runs in chunks (each one a captured graph on the GPU):
    rows that end in different chunks, the Hydra++ layer's cache and the context drafts' history must come out
    as from one piece, and so must every answer, AR and speculative, and a conversation's next turns."""
    model = tiny_model(33)
    heads = tiny_heads(model, True, True)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (5, 40, 23)]  # end in chunks 0, 2 and 1 (of 16)
    runs = {}
    for limit in (4096, 48):
        monkeypatch.setattr(hl, "PREFILL_GRAPH_TOKENS", limit)
        chunks = []
        gen = hl.Generator(model, FakeTokenizer(), heads, context_drafts=3)
        real = gen._prefill_chunks
        monkeypatch.setattr(gen, "_prefill_chunks", lambda *a, chunks=chunks, real=real: chunks.append(a[3]) or real(*a))
        spec, _ = gen.generate(prompts, 24, stop_at_eos=False)
        ar, _ = hl.Generator(model, FakeTokenizer()).generate(prompts, 24, stop_at_eos=False)
        history = [gen.workspace.history[b, :len(p)].tolist() for b, p in enumerate(prompts)]
        chat = hl.Conversation(gen)
        turns = [chat.say(" ".join(["7"] * 30) + f" {i}", max_new_tokens=8)[0] for i in range(3)]
        runs[limit] = (spec, ar, history, turns, chunks)
    assert runs[4096][-1] == [] and runs[48][-1][0] == 16 and len(runs[48][-1]) >= 2  # (the turns chunk too)
    assert runs[48][:4] == runs[4096][:4] and runs[48][0] == runs[48][1]
    assert runs[48][2] == prompts


class FakeTokenizer:
    """Numbers as text, one token each (for conversations on tiny models)."""

    def encode_chat(self, messages, add_generation_prompt=True):
        return [int(t) for m in messages for t in m["content"].split()] + [1]

    def encode_next_turn(self, content):
        return [2] + [int(t) for t in content.split()] + [1]

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_another_package_named_kernels_does_not_shadow_ours(tmp_path):
    """A `kernels` package earlier on the path (Hugging Face's, which transformers >= 5.25 installs) is not taken
    for kernels.py: the runtime loads its own from beside hydra_lite.py (and keeps working without it)."""
    import subprocess

    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = object  # someone else's kernels\n")
    code = ("import kernels, hydra_lite as hl; assert kernels.CUDAProperties is object; "
            "print(hl._kernels.__file__, hasattr(hl._kernels, 'path_attention'))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    where, ours = run.stdout.split()
    assert os.path.samefile(where, os.path.join(ROOT, "kernels.py")) and ours == "True"
