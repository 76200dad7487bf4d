"""Replay the context drafts' prompt lookup on greedy answers, on the CPU: tokens per step of the context chain
alone (a chain of `--chain` tokens under the root), by chain length and by the match length the lookup considers
(ngram).

    python scripts/context_replay.py --prompts runs/tasks_train.jsonl --per-task 6 --chain 10 16 --ngrams 2 4 8

Answers come from plain greedy decoding of training-split prompts (build_tasks.py --split train; never the
held-out benchmark): a step accepts the chain's tokens while they equal the answer's next ones, then the base
model's own token, as the runtime does."""
import argparse
import collections
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hydra_lite as hl  # noqa: E402


def greedy_answers(args):
    """[(task, prompt ids, answer ids)]: per_task prompts of each family, answered greedily."""
    rows = [json.loads(line) for line in open(args.prompts) if line.strip()]
    by_task = collections.defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    rng = random.Random(args.seed)
    picked = [r for t in sorted(by_task) for r in rng.sample(by_task[t], min(args.per_task, len(by_task[t])))]
    model = hl.load_model(args.checkpoint, torch.device("cpu"), torch.float32)
    tok = hl.Tokenizer(args.checkpoint, model.cfg)
    gen, out = hl.Generator(model, tok), []
    for i in range(0, len(picked), args.batch):
        group = picked[i:i + args.batch]
        prompts = [tok.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in group]
        answers, _ = gen.generate(prompts, args.max_new_tokens, mode="ar")
        out += [(r["task"], p, a) for r, p, a in zip(group, prompts, answers)]
        print(f"answered {len(out)}/{len(picked)}", file=sys.stderr, flush=True)
    return out


def chain_steps(prompt, answer, ngram, k):
    """Steps the context chain alone takes over the answer (each: the accepted chain tokens + one of the model's)."""
    text = prompt + answer
    history = torch.tensor([text + [0] * (k + 2)])
    pos, steps = len(prompt), 0
    while pos < len(text):
        chain = hl.context_match_ref(history, torch.tensor([pos]), k, ngram)[0][0].tolist()
        a = 0
        while a < k and pos + 1 + a < len(text) and chain[a] == text[pos + 1 + a]:
            a += 1
        pos, steps = pos + a + 1, steps + 1
    return steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", required=True, help="training-split prompts (tasks/build_tasks.py --split train)")
    p.add_argument("--checkpoint", default="checkpoints/smollm2-135m-instruct")
    p.add_argument("--per-task", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--chain", type=int, nargs="+", default=[10],
                   help="context chain lengths (the runtime's defaults on a GPU: 24 at batch 1, 16 at batch 2, 10 above)")
    p.add_argument("--ngrams", type=int, nargs="+", default=[2, 4, 8])
    args = p.parse_args(argv)
    answers = greedy_answers(args)
    for chain in args.chain:
        for ngram in args.ngrams:
            tokens, steps = collections.Counter(), collections.Counter()
            for task, prompt, answer in answers:
                tokens[task] += len(answer)
                steps[task] += chain_steps(prompt, answer, ngram, chain)
            print(f"chain {chain}, ngram {ngram}: all {sum(tokens.values()) / sum(steps.values()):.3f} tokens a step | "
                  + " ".join(f"{t} {tokens[t] / steps[t]:.2f}" for t in sorted(tokens)))


if __name__ == "__main__":
    main()
