"""The benchmark's helpers: the Hugging Face export (used for the transformers baseline) reproduces our logits,
and the match statistics count what they claim."""
import pytest
import torch

import benchmark
from test_runtime import LLAMA3_SCALING, tiny_model


@pytest.mark.parametrize("tie,scaling", [(True, None), (False, LLAMA3_SCALING)])
def test_export_hf_logits_parity(tmp_path, tie, scaling):
    transformers = pytest.importorskip("transformers")
    model = tiny_model(8, n_heads=4, n_kv_heads=2, tie=tie, rope_scaling=scaling)
    benchmark.export_hf(model, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 80))
    with torch.no_grad():
        ref = hf(tokens).logits
    ours = model.forward_logits(tokens)
    diff = (ours - ref).abs().max().item()
    print(f"max abs logit diff vs transformers: {diff:.2e}")
    assert diff < 1e-4 * ref.abs().max().item()
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_mark_partings_finds_where_each_output_parts(capsys):
    """Random AR answers and copies with one token changed (or cut short): parts_at is that token, None for the
    copies left alone, and each parting is logged with its prompt."""
    torch.manual_seed(0)
    ar = [dict(id=f"p{i}", out=torch.randint(0, 50, (int(torch.randint(5, 30, ())),)).tolist()) for i in range(8)]
    spec, want = [], {}
    for i, a in enumerate(ar):
        out, k = list(a["out"]), int(torch.randint(0, len(a["out"]), ()))
        if i % 3 == 1:
            out[k] = out[k] + 1
        elif i % 3 == 2:
            out = out[:k]  # (a prefix: parts where it ends)
        spec.append(dict(id=a["id"], out=out, call=i // 2, attempt="first"))
        want[a["id"]] = None if i % 3 == 0 else k
    benchmark.mark_partings(spec, ar, "b2 x")
    assert {r["id"]: r["parts_at"] for r in spec} == want
    logged = capsys.readouterr()
    assert sum(f"{i} (call" in logged.out + logged.err for i, k in want.items() if k is not None) == 5


def test_context_length_option():
    assert benchmark.context_length("default") is None and benchmark.context_length("16") == 16
    args = benchmark.build_parser().parse_args(["tasks", "--context", "0", "default", "10"])
    assert args.context == [0, None, 10]


def test_match_stats():
    ref = [[1, 2, 3, 4], [5, 6]]
    assert benchmark.match_stats(ref, ref) == (1.0, 1.0)
    assert benchmark.match_stats([[1, 2, 9, 4], [5, 6]], ref) == (0.5, 4 / 6)


def test_divergence_margins():
    from test_runtime import tiny_model
    model = tiny_model(9)
    ref = [[5, 6, 7], [1, 2]]
    out = benchmark.divergence_margins(model, [[3, 4], [8]], [[5, 6, 9], [1, 2]], ref)
    assert len(out) == 1 and out[0]["at"] == 2 and out[0]["margin"] >= 0


def test_latency_report(tmp_path, monkeypatch):
    """benchmark.py latency on a tiny model: a row per batch, length and call, with the figures it names."""
    import json

    import hydra_lite as hl
    model = tiny_model(4)
    monkeypatch.setattr(hl, "load_model", lambda *a, **k: model)
    monkeypatch.setattr(hl, "Tokenizer", lambda *a, **k: None)
    assert benchmark.main(["latency", "--lengths", "5", "17", "--batch", "1", "2", "--max-new-tokens", "6",
                           "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path)]) in (None, 0)
    rows = json.loads((tmp_path / "latency.json").read_text())["rows"]
    assert [(r["batch"], r["prompt"], r["attempt"]) for r in rows] == [
        (b, n, a) for b in (1, 2) for n in (5, 17) for a in ("first", "repeat")]
    assert all(r["ttft_ms"] > 0 and r["token_p50_ms"] <= r["token_p99_ms"] and r["overhead_ms"] >= 0 for r in rows)
    assert (tmp_path / "latency.md").read_text().count("\n") == len(rows) + 2


@pytest.mark.parametrize("argv,match", [
    (["tasks", "--batch", "0"], "--batch must be"), (["latency", "--lengths", "16", "0"], "--lengths must be"),
    (["e2e", "--prompts", "q.jsonl", "--max-new-tokens", "-1"], "--max-new-tokens must be"),
    (["e2e", "--prompts", "q.jsonl", "--temperature", "nan"], "--temperature"), (["tasks", "--device", "tpu9"], "not a device"),
    (["e2e", "--prompts", "/nonexistent.jsonl", "--checkpoint", "/nonexistent"], "nonexistent"),
])
def test_bad_arguments_are_one_line(capsys, argv, match):
    assert benchmark.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_steps_times_every_kernel_set_and_restores_the_settings(tmp_path, monkeypatch):
    """benchmark.py steps (a GPU command) on the CPU with a tiny shape, graphs and bandwidth stubbed: a row per
    batch, step and kernel set (two tile settings, another edge-token setting, dependent launch, the previous
    kernels, the unfused layers, the merge in the kernel), each set in force while its step ran, and the
    caller's settings back afterwards."""
    import json

    import hydra_lite as hl
    import kernels

    monkeypatch.setitem(benchmark.SHAPES, "tiny", dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                                                       vocab_size=97))
    seen = []
    monkeypatch.setattr(benchmark, "time_graph", lambda fn: fn() is None or seen.append(
        (hl.EXACT, hl.FUSED, kernels.PATH_MERGE_IN_KERNEL, kernels.PATH_SPLIT_LEN, kernels.PATH_EDGE_TOKENS, kernels.PDL,
         kernels.PDL_MAX_TOKENS, kernels.MATMUL_WIDE_N, kernels.PATH_PROGRAMS, kernels.PATH_WARPS,
         kernels.MATMUL_K_TILE, kernels.PATH_MERGE_DECODE, kernels.MATMUL_STAGES,
         kernels.PATH_STAGES)) or 1.0)
    monkeypatch.setattr(benchmark, "hbm_bandwidth", lambda device: 4e12)
    monkeypatch.setattr(benchmark, "path_tiles_invariant", lambda K, cfg, tree: True)
    before = benchmark.kernel_settings(kernels)
    assert benchmark.main(["steps", "--shape", "tiny", "--device", "cpu", "--batch", "1", "2", "--context", "20",
                           "--path-tiles", "16x256", "64x128", "--unfused", "--edge-tokens", "1", "0", "--pdl",
                           "--matmul-wide-n", "4097", "--path-programs", "264", "--path-warps", "2", "--matmul-k-tile", "256",
                           "--merge-decode", "--matmul-stages", "5", "--path-stages", "4", "--profile",
                           "--out", str(tmp_path)]) in (None, 0)
    rows = json.loads((tmp_path / "steps_tiny.json").read_text())["rows"]
    names = {r["step"] for r in rows}
    assert len(rows) == 2 * 2 * 15 and len(names) == 2 * 15
    assert "aten::" in (tmp_path / "profile_tiny_b2_verify_fast.txt").read_text()  # (on the CPU: ops)
    assert len(list(tmp_path.glob("profile_*.txt"))) == 2 * 2 * 2  # batches x steps x (default, fast)
    assert {"tree verify (merge in kernel)", "AR step (unfused layers)", "tree verify (edge tokens 0)",
            "AR step (no dependent launch)"} <= names
    base = (True, True, False, 256, 1, True, 64, kernels.MATMUL_WIDE_N, kernels.PATH_PROGRAMS, kernels.PATH_WARPS,
            kernels.MATMUL_K_TILE, kernels.PATH_MERGE_DECODE, kernels.MATMUL_STAGES,
            kernels.PATH_STAGES)
    changed = [{0: False, 1: False}, {3: 128}, {4: 0}, {5: False}, {6: 0}, {1: False}, {2: True}, {7: 4097}, {8: 264},
               {9: 2}, {10: 256}, {11: True}, {12: 5}, {13: 4}]
    want = {base} | {tuple(ch.get(i, v) for i, v in enumerate(base)) for ch in changed}
    assert sorted(set(seen)) == sorted(want)
    assert benchmark.kernel_settings(kernels) == before


def test_steps_verifies_a_tree_of_the_size_asked(tmp_path, monkeypatch):
    """--tree-nodes and --tree-chain: the verification step times a tree of the default tree's likeliest nodes
    and a chain (as the Generator verifies at larger batches), not the whole 63-node tree."""
    import json
    import random

    monkeypatch.setitem(benchmark.SHAPES, "tiny", dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96,
                                                       vocab_size=97))
    monkeypatch.setattr(benchmark, "time_graph", lambda fn: fn() is None or 1.0)
    monkeypatch.setattr(benchmark, "hbm_bandwidth", lambda device: 4e12)
    monkeypatch.setattr(benchmark, "path_tiles_invariant", lambda K, cfg, tree: True)
    nodes, chain = random.randint(2, 20), random.randint(0, 6)
    assert benchmark.main(["steps", "--shape", "tiny", "--device", "cpu", "--batch", "2", "--context", "20",
                           "--tree-nodes", str(nodes), "--tree-chain", str(chain), "--out", str(tmp_path)]) in (None, 0)
    rows = json.loads((tmp_path / "steps_tiny.json").read_text())["rows"]
    assert {r["tokens"] for r in rows if r["step"].startswith("tree verify")} == {2 * (1 + nodes + chain)}
    assert {r["tokens"] for r in rows if r["step"].startswith("AR step")} == {2}
