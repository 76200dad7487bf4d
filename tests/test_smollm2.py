"""The real SmolLM2-135M-Instruct (skipped when scripts/test.sh has not fetched and converted it): chat
template and tokenizer against transformers (from the same GGUF), and the runtime end to end on the CPU."""
import os

import pytest
import torch

import hydra_lite as hl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CKPT = os.path.join(ROOT, "checkpoints", "smollm2-135m-instruct")
GGUF = os.environ.get("HYDRA_LITE_GGUF") or os.path.join(ROOT, ".models", "SmolLM2-135M-Instruct.Q4_1.gguf")
pytestmark = pytest.mark.skipif(not os.path.isdir(CKPT), reason="run scripts/test.sh to fetch and convert SmolLM2")


@pytest.fixture(scope="module")
def model():
    return hl.load_model(CKPT)


@pytest.fixture(scope="module")
def tok(model):
    return hl.Tokenizer(CKPT, model.cfg)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a color.\nOnly one."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 👋"},
     {"role": "user", "content": "def f(x): return x**2"}],
]


@pytest.mark.skipif(not os.path.isfile(GGUF), reason="needs the GGUF for transformers")
def test_chat_template_matches_transformers(tok):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    hf = transformers.AutoTokenizer.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF))
    for messages in CONVERSATIONS:
        ref = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert tok.encode_chat(messages) == list(ref), messages


def test_greedy_answer_and_stream(model, tok):
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    pieces = []
    outs, stats = hl.Generator(model, tok).generate([ids], 24, on_text=lambda b, t: pieces.append(t))
    text = tok.decode(outs[0])
    assert "Paris" in text and "".join(pieces) == text
    assert stats.new_tokens == len(outs[0]) and stats.tokens_per_s > 0


def test_cli(capsys):
    assert hl.main(["--checkpoint", CKPT, "--prompt", "Say hello.", "--mode", "ar", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert "tokens/s" in out.err and out.out.strip()
    assert hl.main(["--checkpoint", CKPT, "--prompt", "x", "--mode", "hydra", "--heads", "/nonexistent"]) == 2
    assert "not found" in capsys.readouterr().err


def test_stop_strings_and_shipped_heads(model, tok):
    """Stop strings end a row; the shipped Hydra++ heads load, accept more than one token per step on the real
    model, and reproduce greedy decoding (float32, CPU)."""
    ids = tok.encode_chat([{"role": "user", "content": "List three fruits, one per line."}])
    full, _ = hl.Generator(model, tok).generate([ids], 40)
    text = tok.decode(full[0])
    stop = text.split("\n")[1][:4] if "\n" in text else text[5:9]
    cut, _ = hl.Generator(model, tok).generate([ids], 40, stop=[stop])
    assert stop in tok.decode(cut[0]) and len(cut[0]) < len(full[0]) and full[0][:len(cut[0])] == cut[0]
    heads_dir = os.path.join(ROOT, "heads", "smollm2-135m-hydra++")
    heads = hl.load_heads(heads_dir, model)
    spec, stats = hl.Generator(model, tok, heads, tree_choices=heads.tree_choices[:24]).generate([ids], 40)
    assert spec == full and stats.mean_accept > 1.5


def test_copying_a_passage_gains_over_3_5_tokens_per_step(model, tok):
    """Asked to copy a passage of its prompt, the default speculative decoding (the shipped Hydra++ heads with
    context drafts, as `--mode hydra` runs) gains at least 3.5 tokens per step on the CPU, and its answer is
    greedy decoding's."""
    passage = ("Speculative decoding drafts several tokens with a cheap model and verifies them with the large model "
               "in one forward pass, keeping the longest prefix that the large model agrees with. Because verification "
               "is exact, the output is the same as if the large model had generated every token on its own, only "
               "faster when the drafts are often right. The drafts can come from small heads on the large model's "
               "hidden state, or from the context itself, when the answer repeats spans of the prompt.")
    ids = tok.encode_chat([{"role": "user", "content": f"Copy this paragraph:\n\n{passage}"}])
    heads = hl.load_heads(os.path.join(ROOT, "heads", "smollm2-135m-hydra++"), model)
    spec, stats = hl.Generator(model, tok, heads).generate([ids], 64)
    ar, _ = hl.Generator(model, tok).generate([ids], 64)
    assert spec == ar and tok.decode(ar[0]).startswith(passage[:60])
    assert stats.mean_accept >= 3.5, stats.mean_accept


def test_benchmark_e2e_writes_its_report(tmp_path, tiny_smol):
    """benchmark.py e2e (a tiny model with SmolLM2's tokenizer, random Hydra++ heads; CPU): the report files appear
    in a fresh --out directory (profiles are written before the end), the heads' output matches AR in float32,
    and transformers generate() runs on the first --hf-limit prompts only and matches AR there."""
    import json

    import benchmark

    prompts = tmp_path / "q.jsonl"
    prompts.write_text('{"turns": ["Name three colors."]}\n{"turns": ["What is 2+2?"]}\n')
    out = tmp_path / "new" / "dir"
    ckpt, heads = tiny_smol
    rc = benchmark.main(["e2e", "--checkpoint", ckpt, "--prompts", str(prompts), "--batch", "1", "2", "--max-new-tokens", "12",
                         "--dtype", "float32", "--hf-limit", "1", "--profile", "--heads", f"hydra++={heads}", "--out", str(out),
                         "--tree-nodes", "8"])  # (the CPU's tree size: the 64-node tree is slow there)
    assert not rc
    results = json.loads((out / "e2e.json").read_text())["results"]
    spec = [r for r in results if r["mode"] == "hydra++"][0]
    assert spec["exact_match"] == 1.0 and spec["mean_accept"] >= 1.0
    hf = [r for r in results if r["mode"] == "hf-generate"][0]
    ar = [r for r in results if r["mode"] == "ar"][0]
    assert hf["exact_match"] == 1.0 and 0 < hf["new_tokens"] <= 12 < ar["new_tokens"]
    assert (out / "profile_hydra++.txt").exists() and (out / "e2e.md").exists()
    assert "aten::" in (out / "profile_hydra++_b2.txt").read_text()  # (a step of both rows, by op on the CPU)


def test_train_heads_cli_end_to_end(tmp_path, monkeypatch):
    """data -> train -> tree on the real model, tiny sizes: the heads load, the tree fits them, and it
    drafts with them."""
    import dataclasses
    import json

    import train_heads as th

    monkeypatch.setattr(hl, "EXACT", True)  # train_heads runs with the faster kernels and gives the setting back

    prompts = tmp_path / "q.jsonl"
    prompts.write_text('{"turns": ["Name three colors."]}\n{"turns": ["What is 2+2?"]}\n'
                       '{"turns": ["how to sort a list in python"]}\n')
    data, out = str(tmp_path / "d.npz"), str(tmp_path / "heads")
    assert th.main(["data", "--checkpoint", CKPT, "--prompts", str(prompts), "--samples", "2", "--temperatures", "0,0.8",
                    "--time-limit", "600", "--synthetic", "2", "--imitate", "2", "--batch", "4", "--max-new-tokens", "5",
                    "--out", data]) == 0
    assert len(th.load_rows(data)) == 3 * 2 + 2 + 2 and len(th.load_rows(f"{data},{data}")) == 20
    assert th.main(["train", "--checkpoint", CKPT, "--data", f"{data},{data}", "--steps", "2", "--n-layers", "1",
                    "--max-tokens", "256", "--draft-vocab", "64", "--tree-size", "7", "--out", out]) == 0
    info = json.loads(open(os.path.join(out, "train.json")).read())
    assert info["steps_run"] == 2 and len(json.loads(open(os.path.join(out, "tree.json")).read())) == 7
    assert th.main(["tree", "--checkpoint", CKPT, "--data", data, "--tree-size", "3", "--out", out]) == 0
    assert hl.EXACT  # (each command ran with the faster kernels and gave the setting back)
    tree = json.loads(open(os.path.join(out, "tree.json")).read())
    assert len(tree) == 3 and json.loads(open(os.path.join(out, "train.json")).read())["tree_answers"] == 10
    model = hl.load_model(CKPT)
    gen = hl.Generator(model, None, hl.load_heads(out, model), context_drafts=0)  # the heads' own tree alone
    assert gen.tree.size == 4
    ids = [1, 2, 3]
    assert gen.generate([ids], 6, stop_at_eos=False)[0] == hl.Generator(model).generate([ids], 6, stop_at_eos=False)[0]
    # fine-tuning (--init): the heads keep their kind, shape and draft vocabulary, and start where they were
    more = str(tmp_path / "more")
    assert th.main(["train", "--checkpoint", CKPT, "--data", data, "--init", out, "--kind", "medusa", "--steps", "2",
                    "--lr", "1e-4", "--max-tokens", "256", "--tree-size", "5", "--out", more]) == 0
    a, b = hl.load_heads(out, model), hl.load_heads(more, model)
    assert dataclasses.replace(a.hc, source="") == dataclasses.replace(b.hc, source="") and b.hc.source != a.hc.source
    assert torch.equal(a.vocab, b.vocab) and len(b.tree_choices) == 5
    info = json.loads(open(os.path.join(more, "train.json")).read())
    assert info["init"] == out and info["init_train"]["steps_run"] == 2 and info["steps_run"] == 2
    diffs = [(p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())]
    assert 0 < max(diffs) < 0.01, diffs


def test_benchmark_e2e_sampled(tmp_path, tiny_smol):
    """benchmark.py e2e --temperature: AR and speculative decoding both sample, each --acceptance rule as its
    own row, with no transformers baseline; the temperature and rules are recorded."""
    import json

    import benchmark

    prompts = tmp_path / "q.jsonl"
    prompts.write_text('{"turns": ["Write a haiku about rain."]}\n')
    ckpt, heads = tiny_smol
    rc = benchmark.main(["e2e", "--checkpoint", ckpt, "--prompts", str(prompts), "--batch", "1", "--max-new-tokens", "12",
                         "--dtype", "float32", "--temperature", "0.7", "--acceptance", "exact", "typical",
                         "--heads", f"hydra++={heads}", "--out", str(tmp_path), "--tree-nodes", "8"])
    assert not rc
    report = json.loads((tmp_path / "e2e.json").read_text())
    assert report["meta"]["temperature"] == 0.7 and report["meta"]["acceptance"] == ["exact", "typical"]
    assert [r["mode"] for r in report["results"]] == ["ar", "hydra++ (exact)", "hydra++ (typical)"]
    assert all(0 < r["new_tokens"] <= 12 and r["mean_accept"] >= 1.0 for r in report["results"][1:])


@pytest.mark.parametrize("with_heads", [True], ids=["hydra++"])  # (plain decoding goes through the same cache path)
def test_conversation_keeps_its_cache(model, tok, monkeypatch, with_heads):
    """A second turn prefills only its new tokens, and its greedy answer (float32) equals a fresh generation over
    the whole conversation's tokens; a call in between from someone else makes it prefill everything again."""
    heads = hl.load_heads(os.path.join(ROOT, "heads", "smollm2-135m-hydra++"), model) if with_heads else None
    gen = hl.Generator(model, tok, heads, tree_nodes_by_batch=((1 << 30, 8),))
    gen.generate([tok.encode_chat([{"role": "user", "content": "Hi"}])], 2)  # a workspace made by generate() first
    conv, prefilled = hl.Conversation(gen), []
    real_prefill = gen._prefill
    monkeypatch.setattr(gen, "_prefill", lambda ws, prompts, cached=0: prefilled.append(len(prompts[0]) - cached)
                        or real_prefill(ws, prompts, cached))
    first, _ = conv.say("Name a fruit.", 16)
    history = list(conv.ids)
    second, _ = conv.say("What color is it?", 20)
    follow = tok.encode_next_turn("What color is it?")
    assert prefilled[1] == len(follow) + 1  # the new turn, and the answer's last token again
    fresh, _ = hl.Generator(model, tok).generate([history + follow], 20)
    assert second == tok.decode(fresh[0]) and first and second
    assert [m["role"] for m in conv.messages] == ["user", "assistant"] * 2
    before = len(conv.ids)
    gen.generate([tok.encode_chat([{"role": "user", "content": "Something else."}])], 4)  # someone else's call
    conv.say("And its taste?", 4)  # (same cache size: the other call overwrote it)
    assert prefilled[-1] == before + len(tok.encode_next_turn("And its taste?"))


def test_chat_cli_reads_turns_from_a_pipe(monkeypatch, capsys):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Name a fruit.\n\nWhat color is it?\n/reset\nSay hi.\n/quit\nignored\n"))
    assert hl.main(["--checkpoint", CKPT, "--chat", "--mode", "ar", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.err.count("tokens/s") == 3 and "Traceback" not in out.err
    assert len([line for line in out.out.splitlines() if line.strip()]) == 3


def test_benchmark_tasks_writes_its_report(tmp_path, tiny_smol):
    """benchmark.py tasks on two families, one prompt each (CPU, float32; a tiny model with SmolLM2's tokenizer):
    every method and batch gets a row per family and overall, float32 speculative output equals AR's, and
    acceptance is counted per row."""
    import json

    import benchmark

    ckpt, heads = tiny_smol
    assert benchmark.main(["tasks", "--checkpoint", ckpt, "--tasks", "math", "chat", "--limit", "1", "--max-new-tokens", "6",
                           "--batch", "1", "2", "--dtype", "float32", "--heads", f"new={heads}", "--context", "4",
                           "--tree-nodes", "8", "--kernels", "exact", "unfused", "no-prefill-skip",
                           "--out", str(tmp_path)]) in (None, 0)
    report = json.loads((tmp_path / "tasks.json").read_text())
    rows = [r for r in report["results"] if r["attempt"] == "first"]
    assert {(r["method"], r["batch"], r["task"]) for r in rows} == {
        (m + k, b, t) for m in ("ar", "new + context 4") for k in ("", " [unfused kernels]", " [no-prefill-skip kernels]")
        for b in (1, 2) for t in ("math", "chat", "all")}
    assert all(r["exact_match"] == 1.0 and r["mean_accept"] >= 1.0 and 0.0 < r["prefill_share"] < 1.0 for r in rows)
    assert set(report["meta"]["vocab_coverage"]["new"]) == {"math", "chat", "all"}
    assert (tmp_path / "tasks.md").exists() and len(report["records"]) == 2 * 2 * 3 * 2
    assert hl.FUSED and hl.PREFILL_SKIP  # the caller's settings back
