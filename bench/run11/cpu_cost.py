"""CPU cost of tree sizes (BENCHMARKS.md run 11, "On the CPU"). From the repo root:

    python bench/run11/cpu_cost.py

Four held-out prompts (chat, summarization, code edit, math), 64 new tokens each, batch 1, float32, 2 threads:
tokens/s by the wall clock per call and while decoding, and mean acceptance, for AR and for head trees of a few
sizes with and without context drafts."""
import json
import sys
import time

import torch

sys.path.insert(0, ".")
import hydra_lite as hl  # noqa: E402  (run from the repo root, not installed)

CONFIGS = [("ar", False, 0, 0), ("heads63+ctx10", True, 63, 10), ("heads16+ctx10", True, 16, 10), ("heads8+ctx10", True, 8, 10),
           ("heads4+ctx6", True, 4, 6), ("heads8+ctx0", True, 8, 0), ("ctx10", False, 0, 10), ("ctx6", False, 0, 6)]


def main():
    torch.set_num_threads(2)
    ckpt = "checkpoints/smollm2-135m-instruct"
    model = hl.load_model(ckpt)
    tok, heads = hl.Tokenizer(ckpt, model.cfg), hl.load_heads("heads/smollm2-135m-hydra++", model)
    rows = [json.loads(line) for line in open("tasks/heldout.jsonl")]
    picked = [next(r for r in rows if r["task"] == t) for t in ("chat", "summarization", "code_edit", "math")]
    ids = [tok.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in picked]
    for name, with_heads, nodes, k in CONFIGS:
        sizes = dict(tree_nodes_by_batch=((1 << 30, nodes),))
        gen = hl.Generator(model, tok, heads if with_heads else None, context_drafts=k, **sizes)
        gen.generate([ids[0]], 4)
        t0, tokens, accept, decoding = time.perf_counter(), 0, [], 0.0
        for x in ids:
            out, stats = gen.generate([x], 64)
            tokens, decoding = tokens + len(out[0]), decoding + stats.decode_s
            accept.append(stats.mean_accept)
        wall = time.perf_counter() - t0
        print(f"{name:16s} {tokens / wall:6.1f} tokens/s per call, {tokens / decoding:6.1f} decoding, "
              f"accept {sum(accept) / len(accept):.2f}", flush=True)


if __name__ == "__main__":
    main()
