"""Where speculative output parts from AR (issue 15): the multi-task held-out prompts (and ShareGPT rows 80-99) in
the batches `benchmark.py tasks` makes, greedy AR and speculative decoding with the given heads and context chain
side by side; for each output that differs, the token where it parts, the text around it, and whether the prompt
parts alone (batch 1) too: a fault that needs the batch, or one of the tree.

    python scripts/find_divergence.py --batch 2 --context 16 --limit 5

Run 22 (H200, bf16) found one prompt of 45 that parted at batch 2 with a 16-token chain (none at batch 1, 4 or 8).
Its likely cause, a row stopped short by its partner's overshoot, was then reproduced on the CPU and fixed; this
confirms on the GPU (an output that only parts inside its batch, at its end, was that)."""
import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmark as bm  # noqa: E402
import hydra_lite as hl  # noqa: E402
import train_heads as th  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=hl.DEFAULT_CHECKPOINT)
    ap.add_argument("--heads", default="heads/smollm2-135m-hydra++")
    ap.add_argument("--data", default=os.path.join(hl.HERE, "tasks", "heldout.jsonl"))
    ap.add_argument("--sharegpt", default=None, help="ShareGPT prompts (JSONL), rows 80-99 added")
    ap.add_argument("--limit", type=int, default=5, help="prompts per family")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--context", type=int, default=None, help="chain length (default: the Generator's)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = hl.load_model(args.checkpoint, args.device, dtype)
    tok = hl.Tokenizer(args.checkpoint, model.cfg)
    rows = bm.read_tasks(args.data, None, args.limit)
    if args.sharegpt:
        turns = th.read_prompts(args.sharegpt, th.parse_range("80-99"), first_turn=True)
        rows += [dict(task="sharegpt", id=f"sharegpt-{i}", prompt=t) for i, t in enumerate(turns)]
    ids = [tok.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]
    # (the order benchmark.py tasks uses at batch > 1, so that its groups come again)
    order = random.Random(0).sample(range(len(rows)), len(rows)) if args.batch > 1 else list(range(len(rows)))
    ar = hl.Generator(model, tok)
    spec = hl.Generator(model, tok, hl.load_heads(args.heads, model), context_drafts=args.context)
    parted = 0
    for i in range(0, len(order), args.batch):
        group = order[i:i + args.batch]
        prompts = [ids[j] for j in group]
        a, _ = ar.generate(prompts, args.max_new_tokens)
        s, stats = spec.generate(prompts, args.max_new_tokens)
        for b, j in enumerate(group):
            if a[b] == s[b]:
                continue
            parted += 1
            n = bm.parting(s[b], a[b])
            a1, _ = ar.generate([ids[j]], args.max_new_tokens)
            s1, _ = spec.generate([ids[j]], args.max_new_tokens)
            print(f"{rows[j]['id']} (group {[rows[x]['id'] for x in group]}): parts at token {n} of {len(a[b])} / "
                  f"{len(s[b])}, prompt {len(ids[j])} tokens; alone: AR the same {a1[0] == a[b]}, speculative == AR "
                  f"{s1[0] == a1[0]}, speculative the same {s1[0] == s[b]}"
                  + (" (stopped short: no room left)" if b in stats.cut_short else ""))
            print("  AR  :", repr(tok.decode(a[b][max(0, n - 20):n + 10])))
            print("  spec:", repr(tok.decode(s[b][max(0, n - 20):n + 10])))
    print(f"{parted} of {len(rows)} outputs part from AR at batch {args.batch}, {spec.describe(args.batch)}")


if __name__ == "__main__":
    main()
