"""Train draft heads (Medusa, Hydra, Hydra++) for a hydra-lite base model by self-distillation.

    python train_heads.py data   --checkpoint CKPT --prompts questions.jsonl --out runs/data.npz
    python train_heads.py train  --checkpoint CKPT --data runs/data.npz --kind hydra++ --out heads/my-heads

`data` lets the base model answer the prompts itself (batched, sampled at several temperatures), so the heads
learn the distribution they will be asked to predict. `train` freezes the base model and fits the heads with
the teacher loss of Hydra++: each head matches the base model's own next-token distribution at its offset
(soft cross-entropy), with uniform noise on the heads' inputs.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

import hydra_lite as hl


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def read_prompts(path, ids=None, first_turn=False):
    """A JSONL file of {"turns": [...]} (ShareGPT/MT-bench style), {"prompt": ...} or {"text": ...} rows.
    ids: keep rows whose index is in this set. Every turn becomes its own single-turn prompt (or only the
    first, with first_turn)."""
    prompts = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip() or (ids is not None and i not in ids):
                continue
            try:
                row = json.loads(line)
                turns = row.get("turns") or [row.get("prompt") or row["text"]]
            except (json.JSONDecodeError, AttributeError, KeyError):
                raise hl.HydraLiteError(f"{path} line {i + 1} is not a JSON object with turns, prompt or text") from None
            prompts += turns[:1] if first_turn else turns
    return prompts


def parse_range(spec):
    """'0-79' -> {0..79}; None -> None (all rows)."""
    if not spec:
        return None
    lo, hi = spec.split("-")
    return set(range(int(lo), int(hi) + 1))


# ----------------------------------------------------------------------------------------------------------
# Self-distillation data

# Synthetic prompts: templates x topics, for variety beyond a small prompt file. The answers are what the heads
# learn from, and any reasonable request makes the base model answer in its usual style.
TOPICS = """black holes; photosynthesis; the French Revolution; machine learning; Python decorators; SQL joins;
climate change; the stock market; sourdough bread; marathon training; sleep hygiene; the Roman Empire; quantum
computing; vaccines; electric cars; remote work; time management; public speaking; the water cycle; volcanoes;
JavaScript promises; Git branching; Docker containers; REST APIs; recursion; binary search; linked lists; hash
tables; the Pythagorean theorem; probability; compound interest; inflation; supply and demand; startups;
marketing on social media; writing a resume; job interviews; negotiating a salary; learning a new language;
meditation; healthy breakfast ideas; vegetarian cooking; coffee brewing; houseplants; gardening in small spaces;
dog training; cat behavior; bird migration; the ocean's tides; earthquakes; the solar system; Mars exploration;
the Moon landing; World War II; ancient Egypt; the Renaissance; Shakespeare; poetry; science fiction; the history
of jazz; learning the guitar; photography; video game design; chess openings; soccer tactics; basketball; the
Olympic Games; renewable energy; nuclear power; recycling; plastic pollution; rainforests; coral reefs; DNA;
the immune system; the human heart; nutrition; diabetes; mental health; stress; friendship; parenting; moving
to a new city; budgeting; saving for retirement; buying a house; small business accounting; customer service;
project management; teamwork; leadership; ethics of artificial intelligence; privacy online; passwords and
security; encryption; the internet; smartphones; 3D printing; robotics; self-driving cars; airplanes; trains;
bridges; skyscrapers; architecture; interior design; fashion; the history of money; cryptocurrencies; democracy;
the United Nations; human rights; philosophy of mind; Stoicism; happiness; creativity; writing a novel;
screenwriting; podcasts; YouTube channels; email etiquette; cover letters; unit testing; code review; regular
expressions; Linux command line; data visualization; spreadsheets; statistics; linear algebra; calculus;
prime numbers; the theory of evolution; dinosaurs; genetics; antibiotics; the brain; memory; habits; travel in
Japan; Italian food; the Amazon river; deserts; mountains; camping; road trips""".replace("\n", " ")
TEMPLATES = [
    "What is {}?", "Explain {} in simple terms.", "Can you explain {} to a ten-year-old?",
    "Give me five interesting facts about {}.", "Write a short poem about {}.", "Write a short story involving {}.",
    "What are the pros and cons of {}?", "How do I get started with {}?", "What are common mistakes people make with {}?",
    "Summarize the key ideas of {} in a few bullet points.", "Write a blog post introduction about {}.",
    "What is the history of {}?", "Why is {} important?", "Create a study plan for learning about {}.",
    "Write an email to a friend about {}.", "What are some good books or resources about {}?",
    "Give me tips for {}.", "What questions should I ask an expert on {}?", "Compare {} and {}.",
    "How is {} related to {}?", "Write a Python function related to {}, with comments.",
    "Write a tweet about {}.", "What are the biggest open problems in {}?", "Describe {} step by step.",
    "Write a dialogue between two people discussing {}.", "What would happen if {} suddenly disappeared?",
    "I am confused about {}. Can you help?", "Give me a quiz with three questions about {}.",
]


# Programming requests (a large share of real chat traffic, and of the ShareGPT prompts) and everyday tasks.
LANGUAGES = ["Python", "JavaScript", "TypeScript", "Java", "C++", "C#", "Go", "Rust", "Perl", "PHP", "Ruby", "SQL",
             "Bash", "Kotlin", "Swift", "R", "HTML and CSS", "React", "Node.js", "Django", "Flask", "Next.js"]
CODE_TASKS = """read a CSV file and print the average of a column; send a POST request with a JSON body; sort a list of
records by a field; scrape the titles from a web page; parse command-line arguments; connect to a database and
run a query; reverse a string; check whether a number is prime; count the words in a text file; merge two sorted
lists; find duplicates in a list; validate an email address; read and write JSON files; set a default value for a
function parameter; handle errors and exceptions; make a simple REST API; upload a file; resize an image; compute
Fibonacci numbers; implement binary search; define a class with a constructor; use a dictionary or map; write a
unit test; format a date; generate a random password; remove whitespace from a string; convert a string to a
number; loop over the lines of a file; call a function every few seconds; fetch data from an API and show it on
a page; add a button that changes color when clicked; center an element on a page; animate text on scroll; store
user settings; hash a password; log messages to a file; run tasks in parallel; paginate query results; build a
login form; make a countdown timer""".replace("\n", " ")
CODE_TEMPLATES = [
    "Write a {lang} script to {task}.", "How do I {task} in {lang}?", "Can you show me how to {task} with {lang}?",
    "write {lang} code to {task}", "What is the best way to {task} in {lang}?", "I want to {task} using {lang}. "
    "My code does not work. What should I check?", "Explain, with an example, how to {task} in {lang}.",
    "Give me a {lang} function that can {task}, and explain it.", "how to {task} {lang}",
]
EVERYDAY = [
    "Suggest five names for a {} business.", "Write a product description for {}.", "Write a short ad for {}.",
    "Suggest colors for a website about {}.", "Write a cover letter for a job in {}.", "Plan a one-day trip to {}.",
    "What should I know before starting a career in {}?", "Write an outline for a presentation on {}.",
    "Give me a weekly schedule to practice {}.", "Write a LinkedIn post about {}.", "Define {} and give an example.",
    "Make a list of terms and definitions about {}.", "Translate into French: I love learning about {}.",
]
MATH = ["What is {a} times {b}?", "What is {a} plus {b}?", "Find the last digit of {a}^{b}.", "Is {a} a prime number?",
        "What is {a} divided by {b}, rounded to two decimals?", "Given the numbers {a}, {b}, {c}, what comes next?",
        "Solve for x: {a}x + {b} = {c}.", "What is {b} percent of {a}?"]


def synthetic_prompts(n, seed=0):
    """n prompts: about half template x topic, a third programming requests, and everyday and math tasks."""
    topics = [t.strip() for t in TOPICS.split(";") if t.strip()]
    tasks = [t.strip() for t in CODE_TASKS.split(";") if t.strip()]
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            template = rng.choice(TEMPLATES)
            prompts.append(template.format(*rng.sample(topics, template.count("{}"))))
        elif kind < 0.8:
            prompts.append(rng.choice(CODE_TEMPLATES).format(lang=rng.choice(LANGUAGES), task=rng.choice(tasks)))
        elif kind < 0.93:
            prompts.append(rng.choice(EVERYDAY).format(rng.choice(topics)))
        else:
            a, b, c = (rng.randint(2, 999) for _ in range(3))
            prompts.append(rng.choice(MATH).format(a=a, b=b, c=c))
    return prompts


def imitated_prompts(model, tok, examples, n, batch, seed=0, shots=3, max_new_tokens=48, deadline=None):
    """n new requests in the style of `examples` (real user prompts). A small chat model cannot be asked to
    write requests (it answers the instruction instead), but as a plain language model it continues a list of
    them: "Question: <example>" x shots, then "Question:", sampled; the first line is the new request. These
    are closer to real traffic (terse, informal, odd) than template prompts. Fewer if time.time() passes
    `deadline`."""
    pool = [e.strip() for e in examples if "\n" not in e.strip() and 0 < len(e.strip()) < 300]
    if len(pool) < shots:
        raise hl.HydraLiteError(f"need at least {shots} single-line example prompts to imitate, got {len(pool)}")
    rng, gen, seen, out = random.Random(seed), hl.Generator(model, tok), set(pool), []
    for _ in range(max(4 * n // batch, 4)):  # (bounded: a model that never writes a usable line stops here)
        metas = ["".join(f"Question: {e}\n" for e in rng.sample(pool, shots)) + "Question:" for _ in range(batch)]
        outs, _ = gen.generate([tok.encode(m) for m in metas], max_new_tokens,  # (only the first line is kept)
                               hl.SamplingParams(temperature=1.0, top_p=0.95), stop_at_eos=True, stop=["\n"])
        for o in outs:
            line = tok.decode(o).split("\n")[0].strip()
            if 8 <= len(line) <= 300 and line not in seen:
                seen.add(line)
                out.append(line)
        log(f"imitated prompts: {min(len(out), n)}/{n}")
        if len(out) >= n:
            break
        if deadline is not None and time.time() > deadline:
            log(f"imitated prompts: time is up at {len(out)} of {n}")
            break
    return out[:n]


def make_data(model, tok, prompts, samples, temperatures, max_new_tokens, batch, extra_prompts=(), seed=0,
              deadline=None):
    """Each prompt answered `samples` times by the base model, temperatures cycling (extra_prompts: once
    each, temperatures cycling over them); greedy (temperature 0) at most once per prompt, since it would
    give the same answer again. Stops early, before a batch that would end past time.time() = `deadline`.
    Returns a list of (token ids, index where the answer starts)."""
    gen = hl.Generator(model, tok)
    jobs = [(p, temperatures[s % len(temperatures)]) for p in prompts for s in range(samples)]
    jobs += [(p, temperatures[i % len(temperatures)]) for i, p in enumerate(extra_prompts)]
    kept, greedy_seen = [], set()
    for job in jobs:
        if job[1] == 0:  # greedy: the same answer again
            if job in greedy_seen:
                continue
            greedy_seen.add(job)
        kept.append(job)
    jobs = kept
    by_temp = {}
    for job in jobs:
        by_temp.setdefault(job[1], []).append(job)
    chunks = [js[i:i + batch] for js in by_temp.values() for i in range(0, len(js), batch)]  # one temperature each
    random.Random(seed).shuffle(chunks)  # so that a time limit keeps a mix of prompts and temperatures
    rows, t0, done_tokens, longest = [], time.time(), 0, 0.0
    for chunk in chunks:
        if deadline is not None and time.time() + 1.2 * longest > deadline:
            log(f"data: time is up, {len(rows)} of {len(jobs)} answers")
            break
        t_chunk = time.time()
        temp = chunk[0][1]
        ids = [tok.encode_chat([{"role": "user", "content": p}]) for p, _ in chunk]
        outs, _ = gen.generate(ids, max_new_tokens, hl.SamplingParams(temperature=temp, top_p=0.95 if temp else 1.0),
                               stop_at_eos=True)
        eos = model.cfg.eos_ids[:1]
        for p, o in zip(ids, outs):
            rows.append((p + o + (eos if len(o) < max_new_tokens else []), len(p)))
            done_tokens += len(o)
        longest = max(longest, time.time() - t_chunk)
        log(f"data: {len(rows)}/{len(jobs)} answers, {done_tokens} tokens, {done_tokens / (time.time() - t0):.0f} tokens/s")
    return rows


# ----------------------------------------------------------------------------------------------------------
# Training


def answer_counts(rows, vocab_size):
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids, start in rows:
        counts += torch.bincount(torch.tensor(ids[start:], dtype=torch.long), minlength=vocab_size)
    return counts


def coverage(counts, vocab):
    """The share of the counted answer tokens that are in vocab."""
    return (counts[vocab].sum() / counts.sum().clamp(min=1)).item()


def top_tokens(counts, size):
    """The `size` most counted token ids, sorted; None when that is every token (or size is 0)."""
    return None if not size or size >= len(counts) else counts.topk(size).indices.sort().values


VOCAB_SIZES = (8192, 16384, 24576, 32768, 40960)
VOCAB_COVERAGE = 0.995


def pick_vocab_size(asked, train_counts, held_counts):
    """The draft vocabulary size: asked (a number), None (not asked), or "auto": the smallest of VOCAB_SIZES whose
    most frequent training-answer tokens (train_counts, answer_counts) cover VOCAB_COVERAGE of the held-out
    answers' tokens (held_counts) (logged for each)."""
    if asked != "auto":
        return None if asked is None else int(asked)
    order = train_counts.argsort(descending=True)
    shares = {n: coverage(held_counts, order[:n]) for n in VOCAB_SIZES}
    log("draft vocabulary coverage of held-out answer tokens: " + ", ".join(f"{n}: {c:.4f}" for n, c in shares.items()))
    return next((n for n, c in shares.items() if c >= VOCAB_COVERAGE), 0)


def with_draft_vocab(heads, vocab, base_cfg):
    """The same heads proposing from another draft vocabulary (None: all tokens). The vocabulary only says which
    rows of the output projection a head's top-k looks at, so the trained weights carry over."""
    hc = dataclasses.replace(heads.hc, draft_vocab=0 if vocab is None else len(vocab))
    param = next(heads.parameters())
    new = hl.DraftHeads(hc, base_cfg).to(param.device, param.dtype)
    result = new.load_state_dict({k: v for k, v in heads.state_dict().items() if k != "vocab"}, strict=False)
    assert set(result.missing_keys) <= {"vocab"} and not result.unexpected_keys, result
    if vocab is not None:
        new.vocab.copy_(vocab)
    return new.train().requires_grad_(True)


def deeper_heads(heads, n_layers, base_cfg):
    """The same heads with n_layers blocks each: the trained blocks first, then new ones that start as the
    identity (w = 0: y = x + silu(0) = x), so the heads propose exactly what they did and training goes on from
    there instead of from scratch."""
    hc = dataclasses.replace(heads.hc, n_layers=n_layers)
    param = next(heads.parameters())
    new = hl.DraftHeads(hc, base_cfg).to(param.device, param.dtype)
    for head in new.heads:
        for block in head.blocks:
            block.w.weight.data.zero_(), block.w.bias.data.zero_()
    result = new.load_state_dict(heads.state_dict(), strict=False)
    assert not result.unexpected_keys and all(".blocks." in k for k in result.missing_keys), result
    return new.train().requires_grad_(True)


def more_heads(heads, n_heads, base_cfg):
    """The same heads and more after them, up to n_heads: one more tree level each. A new head starts as a copy
    of the last trained one, moved on by the tokens it gains: a grounded head reads h and the embeddings of the
    path so far, and the copy reads h, the same first embeddings, and the path's last token where the last head
    read its own last one (the token just before the one predicted), the slots in between at zero. So it
    proposes from the start what the last head would after a path with tokens skipped, and training goes on
    from there instead of from scratch."""
    old = len(heads.heads)
    hc = dataclasses.replace(heads.hc, n_heads=n_heads)
    param = next(heads.parameters())
    new = hl.DraftHeads(hc, base_cfg).to(param.device, param.dtype)
    state, last, dim = heads.state_dict(), f"heads.{old - 1}.", hc.dim
    for k in range(old, n_heads):
        for name, t in list(state.items()):
            if not name.startswith(last):
                continue
            if hc.grounded and name.endswith(("blocks.0.w.weight", "blocks.0.res.weight")):  # [dim, (old + 1) * dim]
                t = torch.cat([t[:, :old * dim], t.new_zeros(t.shape[0], (k - old + 1) * dim), t[:, old * dim:]], 1)
            state[f"heads.{k}." + name[len(last):]] = t.clone()
    new.load_state_dict(state)
    return new.train().requires_grad_(True)


def fewer_heads(heads, n_heads, base_cfg):
    """The first n_heads of heads, unchanged (a head reads only the levels above it): trained as six, their first
    four draft as the six do to depth four, at the step cost of four."""
    hc = dataclasses.replace(heads.hc, n_heads=n_heads)
    param = next(heads.parameters())
    new = hl.DraftHeads(hc, base_cfg).to(param.device, param.dtype)
    state = {k: v for k, v in heads.state_dict().items()
             if not k.startswith("heads.") or int(k.split(".")[1]) < n_heads}
    new.load_state_dict(state)
    return new.eval().requires_grad_(False)


def new_heads(model, kind, n_heads, n_layers, vocab=None, source="train_heads.py"):
    c = model.cfg
    grounded, prefix = kind in ("hydra", "hydra++"), kind == "hydra++"
    hc = hl.HeadsConfig(n_heads=n_heads, n_layers=n_layers, dim=c.dim, vocab_size=c.vocab_size, grounded=grounded,
                        prefix=prefix, lm_head="base", lm_bias=False, kind=kind, source=source,
                        draft_vocab=0 if vocab is None else len(vocab))
    heads = hl.DraftHeads(hc, c)
    if vocab is not None:
        heads.vocab.copy_(vocab)
    with torch.no_grad():  # start near "predict what the base model would from h": residual blocks at identity
        for head in heads.heads:
            for block in head.blocks:
                block.w.weight.zero_(), block.w.bias.zero_()
                if block.res is not None:
                    block.res.weight.normal_(std=0.01)
                    block.res.weight[:, :c.dim] += torch.eye(c.dim)
                    block.res.bias.zero_()
        if prefix:  # the extra layer starts as the identity (zero output projections) before its norm
            p = heads.prefix
            p.attn_norm.weight.fill_(1), p.ffn_norm.weight.fill_(1), heads.prefix_norm.fill_(1)
            p.wqkv.weight.normal_(std=0.02), p.w13.weight.normal_(std=0.02), p.wo.weight.zero_(), p.w2.weight.zero_()
    return heads


def batches(rows, max_tokens, rng):
    """Length-bucketed batches of about max_tokens padded tokens."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(rows[i][0]) > max_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    out.append(cur)
    rng.shuffle(out)
    return out


def teacher_forced_inputs(heads, h, emb, k, n, noise=lambda x: x):
    """Head k's inputs at positions 0..n-1 of a sequence: h_t, and for grounded heads concat(h_t, embed(x_{t+1}),
    ..., embed(x_{t+k+1})) -- the answer's own tokens standing in for the drafted ones."""
    x = h[:, :n]
    if heads.hc.grounded:
        x = torch.cat([x] + [noise(emb[:, j + 1:j + 1 + n]) for j in range(k + 1)], dim=-1)
    return x


def head_losses(model, heads, tokens, valid, noise_alpha):
    """tokens [B, T] (right-padded), valid [B, T] (positions in an answer). Returns per-head (loss, top-1 acc)."""
    B, T = tokens.shape
    dim, lm_w = model.cfg.dim, model.output_weight
    with torch.no_grad():
        cache = model.new_cache(B, T)
        h = model(tokens, cache)  # base hidden states after the final norm
        teacher = F.softmax(model.logits(h).float(), -1).to(h.dtype)  # the base model's next-token distribution
        emb = model.embed(tokens)
    noise = lambda x: x + (torch.rand_like(x) * 2 - 1) * noise_alpha / math.sqrt(T * dim) if noise_alpha else x
    h = noise(h)
    if heads.prefix is not None:
        h = heads.run_prefix(h, cache.rope)  # (no cache: causal over the sequence, differentiable)
    results = []
    for k, head in enumerate(heads.heads):
        n = T - k - 2  # head k at position t predicts token t+k+2: the base's distribution at t+k+1
        if n <= 0:
            results.append((torch.zeros((), device=tokens.device), 0.0, [0.0] * 10, 0))
            continue
        x = teacher_forced_inputs(heads, h, emb, k, n, noise)
        mask = valid[:, :n] & valid[:, k + 2:k + 2 + n]
        # With a draft vocabulary the head is scored only there (all it can propose): the teacher's mass on
        # those tokens, against the head's softmax over them. Also 3x less work than the whole vocabulary.
        w, b = heads.proposal_weights(k, lm_w, cached=False)
        logits = F.linear(head.features(x[mask]), w, b).float()
        target = teacher[:, k + 1:k + 1 + n][mask]
        target = (target if heads.vocab is None else target[:, heads.vocab]).float()
        loss = -(target * F.log_softmax(logits, -1)).sum(-1).mean()
        hits = (logits.topk(10, -1).indices == target.argmax(-1, keepdim=True)).float().mean(0)  # per rank
        results.append((loss, hits[0].item(), hits.tolist(), len(target)))
    return results


def draft_ranks(model, heads, rows, max_tokens, per_answer=False):
    """Where the base model's greedy path would rank among the heads' proposals, teacher-forced on answers.
    Returns ranks [positions, n_heads] (int64): ranks[t, k] = the rank (0-9, 10: not proposed) of the base
    model's greedy token among head k's top 10, given that the answer up to there is the base model's greedy
    path (as in a drafted tree); -1 where it is not (sampled answers leave greedy paths), or past the end.
    per_answer: a list of each answer's ranks in order instead ([n_i, n_heads], from its last prompt token on),
    for replay_decoding."""
    dev, K = model.embed.weight.device, len(heads.heads)
    lm_w, out = model.output_weight, []
    with torch.no_grad():
        for idx in batches(rows, max_tokens, random.Random(0)):
            tokens, valid = pad([rows[i] for i in idx], dev)
            B, T = tokens.shape
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                cache = model.new_cache(B, T)
                h = model(tokens, cache)
                greedy = model.logits(h).argmax(-1)  # greedy[:, t]: the base model's choice for token t+1
                if heads.prefix is not None:
                    h = heads.run_prefix(h, cache.rope)  # (no cache: causal over the sequence, differentiable)
                emb = model.embed(tokens)
                on_path = torch.zeros(B, T, dtype=torch.bool, device=dev)  # token t+1 is the greedy one
                on_path[:, :-1] = tokens[:, 1:] == greedy[:, :-1]
                ranks = torch.full((B, T, K), -1, dtype=torch.long, device=dev)
                ok = valid.clone()
                for k in range(K):
                    n = T - k - 2  # head k at t reads tokens t+1..t+k+1 and proposes token t+k+2
                    if n <= 0:
                        break
                    ok = ok[:, :n] & on_path[:, k:k + n] & valid[:, k + 2:k + 2 + n]
                    x = teacher_forced_inputs(heads, h, emb, k, n)
                    top = heads.propose(k, x[ok], lm_w, 10)  # [m, 10]
                    hit = top == greedy[:, k + 1:k + 1 + n][ok][:, None]
                    r = torch.where(hit.any(-1), hit.float().argmax(-1), 10)
                    ranks[:, :n, k][ok] = r
            out += [r[v] for r, v in zip(ranks.cpu(), valid.cpu())] if per_answer else [ranks[valid].cpu()]
    return out if per_answer else torch.cat(out)


def replay_decoding(answers, tree):
    """Greedy speculative decoding replayed on draft ranks (draft_ranks(..., per_answer=True)): the first step
    starts at an answer's first position, a step at position i accepts the root and the deepest tree path that
    ranks[i] follows, and the next step starts where it ended. An answer is replayed up to where it leaves the
    base model's greedy path (a sampled token). Unlike tree_accept, which averages over every position, this
    counts only the positions where steps start, as decoding does: those after a long accepted run are
    often where the heads were wrong, so they are harder than the average position.
    Returns (tokens, steps, starts): starts, a bool mask per answer of the positions where steps started."""
    paths = {tuple(p) for p in tree}
    tokens = steps = 0
    starts = []
    for r in answers:
        rows = r.tolist()
        n = next((i for i, row in enumerate(rows[:-2]) if row[0] < 0), len(rows) - 1)  # greedy up to n
        mask = torch.zeros(len(rows), dtype=torch.bool)
        i = 0
        while i < n:
            d = 0
            while d < len(rows[i]) and tuple(rows[i][:d + 1]) in paths:
                d += 1
            mask[i] = True
            tokens, steps, i = tokens + min(1 + d, n - i), steps + 1, i + 1 + d
        starts.append(mask)
    return tokens, steps, starts


def fit_tree(ranks, size=63):
    """The `size` tree paths most often accepted, counted on draft_ranks: a path [r0, r1, ...] is accepted
    where ranks[t, :len] equals it. Chance of a path = chance of its parent x how often its last rank is right
    among the positions that reach it (positions that leave the greedy path drop out at that depth), so
    heads' errors that come together (hard spans) are counted as they are. Returns (tree, expected acceptance
    length)."""
    K = ranks.shape[1]

    def child_chances(path):  # the share of each rank among the positions where the path so far is right
        if len(path) == K:
            return []
        reach = (ranks[:, :len(path)] == torch.tensor(path, dtype=ranks.dtype)).all(-1)
        return rank_shares(ranks[reach, len(path)])  # (unseen ranks: 0, picked last)

    return hl.grow_tree(child_chances, size)


def tree_accept(ranks, tree):
    """Expected acceptance length of a tree: 1 (the root) + the chance of each path."""
    return 1.0 + sum(path_chance(ranks, p) for p in tree)


def path_chance(ranks, path):
    """How often a tree path is accepted, counted on draft_ranks as fit_tree counts it."""
    p, reach = 1.0, torch.ones(len(ranks), dtype=torch.bool)
    for d, r in enumerate(path):
        seen = reach & (ranks[:, d] >= 0)
        reach = seen & (ranks[:, d] == r)
        p *= reach.sum().item() / max(seen.sum().item(), 1)
    return p


def rank_accuracies(ranks):
    """rank_acc[k][r]: how often head k's rank-r proposal is the greedy token (on the greedy path), for
    hydra_lite.build_tree (which treats heads as independent)."""
    return [rank_shares(ranks[:, k]) for k in range(ranks.shape[1])]


def rank_shares(r):
    """The share of each rank 0-9 among the positions in r that are on the greedy path (r >= 0)."""
    r = r[r >= 0]
    return (torch.bincount(r, minlength=11)[:10].double() / max(len(r), 1)).tolist()


def train(model, heads, rows, steps, lr, max_tokens, noise_alpha, seed=0, time_limit=0):
    """AdamW with warm-up and cosine decay over `steps`. time_limit (seconds, 0: none): from step 50 on, every 50
    steps, fit the run (and the decay with it) to the steps that the time left allows at the rate since step 10."""
    rng = random.Random(seed)
    params = [p for p in heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    horizon = [steps]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (
        1 + math.cos(math.pi * min(s, horizon[0]) / max(horizon[0], 1))))
    dev = model.embed.weight.device
    step, t0, plan = 0, time.time(), []
    heads.train().requires_grad_(True)
    while step < horizon[0]:
        if step == 10:
            t10 = time.time()  # the first steps are slow (allocator, kernel selection): time the rate after them
        if time_limit and step >= 50 and step % 50 == 0:  # re-planned as the rate settles (it did: 0.2 -> 0.1 s)
            rate = (time.time() - t10) / (step - 10)
            fit = min(steps, step + 1 + int((time_limit - (time.time() - t0)) / rate))
            if abs(fit - horizon[0]) > 0.05 * horizon[0]:
                log(f"time limit {time_limit}s: training for {fit} steps ({steps} asked)")
            horizon[0] = fit
        if not plan:
            plan = batches(rows, max_tokens, rng)
        idx = plan.pop()
        tokens, valid = pad([rows[i] for i in idx], dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            results = head_losses(model, heads, tokens, valid, noise_alpha)
        loss = sum(r[0] for r in results)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % 25 == 0 or step == horizon[0] or step == 1:
            accs = " ".join(f"{r[1]:.3f}" for r in results)
            log(f"step {step}/{horizon[0]} loss {loss.item():.3f} top-1 per head {accs} lr {sched.get_last_lr()[0]:.2e} "
                f"({time.time() - t0:.0f}s)")
    heads.eval().requires_grad_(False)
    return step


def fit_heads_tree(model, heads, rows, size, info, max_tokens=4096):
    """Fit the tree to the heads' draft ranks on rows. Returns the contents of tree.json and train.json."""
    t0 = time.time()
    answers = draft_ranks(model, heads, rows, max_tokens, per_answer=True)
    ranks = torch.cat(answers)
    rank_acc = rank_accuracies(ranks)
    log("held-out top-1 per head (on the greedy path): " + " ".join(f"{a[0]:.3f}" for a in rank_acc)
        + f" ({len(ranks)} positions, {time.time() - t0:.0f}s)")
    tree, expected = fit_tree(ranks, size)
    independent = hl.build_tree(rank_acc, size)
    log(f"tree of {len(tree) + 1} nodes: expected acceptance length {expected:.3f} "
        f"(the tree fitted as if heads were independent: {tree_accept(ranks, independent):.3f})")
    tokens, steps, _ = replay_decoding(answers, tree)
    replayed = tokens / max(steps, 1)
    log(f"decoding replayed on the greedy parts of those answers: {replayed:.3f} tokens per step ({steps} steps)")
    return {"tree.json": tree, "train.json": info | {"held_out_rank_acc": rank_acc, "expected_accept": expected,
                                                     "replayed_accept": replayed}}


def read_json_or_empty(path):
    return hl.read_json(path) if os.path.exists(path) else {}


def held_out_split(rows, seed):
    """(held-out answers, training answers): a seeded shuffle, 2% held out (at least one)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n = max(1, len(rows) // 50)
    return rows[:n], rows[n:]


def save_rows(rows, path):
    """Answers as one flat uint16/int32 id array plus lengths and answer starts (.npz: small enough to carry)."""
    import numpy as np

    if not path.endswith(".npz"):
        raise hl.HydraLiteError(f"data files are .npz: {path}")
    if not rows:
        raise hl.HydraLiteError(f"no answers to write to {path} (is --time-limit too short?)")
    dtype = np.uint16 if max(max(ids) for ids, _ in rows) < 65536 else np.int32
    tmp = f"{path[:-4]}.tmp-{os.getpid()}.npz"  # whole or not at all: written beside it, then renamed
    np.savez(tmp, ids=np.concatenate([np.asarray(ids, dtype=dtype) for ids, _ in rows]),
             lens=np.asarray([len(ids) for ids, _ in rows], dtype=np.int32),
             starts=np.asarray([start for _, start in rows], dtype=np.int32))
    os.replace(tmp, path)


def load_rows(path):
    """Answers from a data file, or from several (comma-separated)."""
    import numpy as np

    if "," in path:
        return [row for p in path.split(",") for row in load_rows(p)]
    if not path.endswith(".npz"):  # older files: torch.save({"rows": [(ids, start), ...]})
        return torch.load(path, weights_only=True)["rows"]
    d = np.load(path)
    ids, lens, starts = d["ids"].astype(np.int64), d["lens"], d["starts"]  # (each d[key] reads the file again)
    ends = np.cumsum(lens)
    return [(ids[e - n:e].tolist(), int(s)) for e, n, s in zip(ends, lens, starts)]


def pad(rows, device):
    T = max(len(r[0]) for r in rows)
    tokens = torch.zeros(len(rows), T, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (ids, start) in enumerate(rows):
        tokens[b, :len(ids)] = torch.tensor(ids)
        valid[b, max(start - 1, 0):len(ids)] = True  # from the last prompt token on: where drafting happens
    return tokens.to(device), valid.to(device)


def build_parser():
    ap = hl.ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data", help="generate self-distillation data", formatter_class=hl.HelpWithDefaults)
    d.add_argument("--prompts", required=True, help="JSONL prompts")
    d.add_argument("--rows", default=None, help="row range to use, e.g. 0-79 (keep the rest for evaluation)")
    d.add_argument("--samples", type=int, default=8, help="answers per prompt")
    d.add_argument("--temperatures", default="0,0.7,1.0")
    d.add_argument("--max-new-tokens", type=int, default=384)
    d.add_argument("--batch", type=int, default=64)
    d.add_argument("--synthetic", type=int, default=0, help="also answer this many template prompts (once each)")
    d.add_argument("--imitate", type=int, default=0,
                   help="also answer this many prompts the base model writes in the style of the --prompts rows")
    d.add_argument("--time-limit", type=float, default=0,
                   help="seconds: answer fewer prompts if it would take longer (writing --imitate prompts takes up to 40%%)")
    t = sub.add_parser("train", help="train heads on generated data", formatter_class=hl.HelpWithDefaults)
    t.add_argument("--data", required=True, help="data file(s), comma-separated")
    t.add_argument("--kind", choices=["medusa", "hydra", "hydra++"], default="hydra++")
    t.add_argument("--n-heads", type=int, default=None,
                   help="heads, one per tree level (default 4; with --init the heads' own, or more: each new one starts "
                        "as a copy of the last)")
    t.add_argument("--n-layers", type=int, default=None,
                   help="blocks per head (default 1; with --init the heads' own, or more: new blocks start as the identity)")
    t.add_argument("--steps", type=int, default=1000)
    t.add_argument("--time-limit", type=float, default=0, help="seconds: fewer steps if they would take longer")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--max-tokens", type=int, default=8192, help="padded tokens per batch")
    t.add_argument("--noise", type=float, default=5.0, help="uniform input noise scale (0: off)")
    t.add_argument("--tree-size", type=int, default=63, help="tree nodes besides the root, fitted to held-out accuracies")
    t.add_argument("--draft-vocab", default=None,
                   help="heads propose only the N tokens most frequent in the answers (0: the whole vocabulary; auto: the "
                        f"smallest of {', '.join(map(str, VOCAB_SIZES))} covering {VOCAB_COVERAGE:.1%} of the held-out "
                        "answers' tokens); default 16384, or with --init the heads' own")
    t.add_argument("--init", default=None, help="go on training these heads (their kind, size and draft vocabulary)")
    f = sub.add_parser("tree", help="fit the tree of trained heads (in --out) to data, e.g. after changing its size",
                       formatter_class=hl.HelpWithDefaults)
    f.add_argument("--data", required=True, help="answers to count on (train's held-out answers: --held-out)")
    f.add_argument("--held-out", action="store_true", help="use the answers train held out (same --seed)")
    f.add_argument("--tree-size", type=int, default=63)
    f.add_argument("--max-tokens", type=int, default=4096)
    k = sub.add_parser("keep", help="the first --n-heads of --init's heads, with a tree of that depth",
                       formatter_class=hl.HelpWithDefaults)
    k.add_argument("--init", required=True, help="heads to take from")
    k.add_argument("--n-heads", type=int, required=True)
    k.add_argument("--tree-from", default=None,
                   help="heads whose tree.json to use (default: --init's tree cut to --n-heads levels; refit with: tree)")
    k.add_argument("--context-tree-from", default=None,
                   help="heads whose tree beside context drafts (their tree_context.json, else tree.json) becomes "
                        "tree_context.json (e.g. four levels of six heads: the six draft only four deep there)")
    for p in (d, t, f, k):
        p.add_argument("--checkpoint", default=hl.DEFAULT_CHECKPOINT)
        p.add_argument("--out", required=True)
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="overwrite the heads shipped in this repo's heads/")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    exact_before = hl.EXACT
    try:
        check_args(args)
        model = hl.load_model(args.checkpoint, args.device, dtype)
        # Throughput work whose results are compared with nothing bit for bit: cuBLAS and the tiled attention
        # (data: ~20% more tokens/s on the GPU than the batch-invariant kernels, BENCHMARKS.md run 13; training's
        # base-model forward over 8,192-token batches wants cuBLAS's large tiles, not one tile shape for all).
        hl.EXACT = False
        {"data": run_data, "tree": run_tree, "train": run_train, "keep": run_keep}[args.cmd](args, model, dtype)
    except hl.HydraLiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (outputs are written whole or not at all)
        print("\ninterrupted: nothing was written", file=sys.stderr)
        return 130
    finally:
        hl.EXACT = exact_before  # (a caller in the same process keeps its kernels)
    return 0


def run_data(args, model, dtype):
    """train_heads.py data: the base model's answers to the prompts (and to template / imitated ones) -> --out."""
    tok = hl.Tokenizer(args.checkpoint, model.cfg)
    prompts = read_prompts(args.prompts, parse_range(args.rows))
    if not prompts:
        raise hl.HydraLiteError(f"no prompts in {args.prompts} (rows {args.rows})")
    temps = parse_temperatures(args.temperatures)
    t0, limit = time.time(), args.time_limit or float("inf")
    extra = synthetic_prompts(args.synthetic, args.seed)
    if args.imitate:
        extra += imitated_prompts(model, tok, prompts, args.imitate, args.batch, args.seed, deadline=t0 + 0.4 * limit)
    rows = make_data(model, tok, prompts, args.samples, temps, args.max_new_tokens, args.batch, extra, args.seed,
                     deadline=t0 + limit)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_rows(rows, args.out)
    log(f"wrote {len(rows)} answers ({sum(len(r[0]) - r[1] for r in rows)} answer tokens) to {args.out}")


def run_tree(args, model, dtype):
    """train_heads.py tree: refit the tree of the heads in --out to the answers in --data."""
    heads = hl.load_heads(args.out, model)
    rows = load_rows(args.data)
    if args.held_out:
        rows = held_out_split(rows, args.seed)[0]
    info = read_json_or_empty(os.path.join(args.out, "train.json"))
    files = fit_heads_tree(model, heads, rows, args.tree_size,
                           info | {"tree_data": args.data, "tree_answers": len(rows)}, args.max_tokens)
    for name, obj in files.items():
        hl.write_json_atomically(os.path.join(args.out, name), obj)


def run_train(args, model, dtype):
    """train_heads.py train: new heads, or --init's going on, trained on --data; saved with their fitted tree."""
    held_out, train_rows = held_out_split(load_rows(args.data), args.seed)
    counts = [answer_counts(r, model.cfg.vocab_size) for r in (train_rows, held_out)]  # (counted once)
    size = pick_vocab_size(args.draft_vocab, *counts)
    heads = heads_to_train(args, model, counts, size)
    vocab, args.draft_vocab = heads.vocab, heads.hc.draft_vocab
    if vocab is not None:
        log(f"draft vocabulary: {len(vocab)} tokens cover {coverage(counts[0], vocab.cpu()):.4f} of the training "
            f"answers' tokens, {coverage(counts[1], vocab.cpu()):.4f} of the held-out ones")
    n_params = sum(p.numel() for p in heads.parameters())
    log(f"training {args.kind} heads ({n_params / 1e6:.1f}M parameters) on {len(train_rows)} answers")
    steps = train(model, heads, train_rows, args.steps, args.lr, args.max_tokens, args.noise, args.seed, args.time_limit)
    info = vars(args) | {"answers": len(held_out) + len(train_rows), "steps_run": steps}
    if args.init:  # the heads' history: how the ones it went on from were trained
        info["init_train"] = read_json_or_empty(os.path.join(args.init, "train.json"))
    heads = heads.to(dtype)
    hl.save_heads(heads, args.out, model.cfg, fit_heads_tree(model, heads, held_out, args.tree_size, info))
    log(f"saved heads to {args.out}")


def run_keep(args, model, dtype):
    """train_heads.py keep: the first --n-heads of --init's heads into --out, with --tree-from's tree (or --init's
    cut to that depth) and, with --context-tree-from, that heads' tree as tree_context.json (used beside context
    drafts); train.json keeps --init's history and its held-out accuracies of the heads kept."""
    heads = hl.load_heads(args.init, model)
    if not 1 <= args.n_heads <= heads.hc.n_heads:
        raise hl.HydraLiteError(f"--n-heads {args.n_heads}: {args.init} has {heads.hc.n_heads} heads")

    def tree_of(path, name="tree.json"):  # another heads' tree, for these: no deeper than the heads kept
        tree = hl.read_json(os.path.join(path, name))
        if max(map(len, tree)) > args.n_heads:
            raise hl.HydraLiteError(f"the tree of {path} is {max(map(len, tree))} levels deep: more than {args.n_heads} heads")
        return tree

    source = args.tree_from or args.init
    tree = tree_of(source) if args.tree_from else hl.read_json(os.path.join(source, "tree.json"))
    tree = list(dict.fromkeys(tuple(p) for p in tree if len(p) <= args.n_heads))  # (a cut tree stays a tree)
    files = {"tree.json": [list(p) for p in tree]}
    if args.context_tree_from:
        has_own = os.path.exists(os.path.join(args.context_tree_from, "tree_context.json"))
        files["tree_context.json"] = tree_of(args.context_tree_from, "tree_context.json" if has_own else "tree.json")
    info = read_json_or_empty(os.path.join(args.init, "train.json"))
    files["train.json"] = {"cmd": "keep", "init": args.init, "kept_heads": args.n_heads, "tree_from": source,
                           "context_tree_from": args.context_tree_from,
                           "held_out_rank_acc": (info.get("held_out_rank_acc") or [])[:args.n_heads], "init_train": info}
    stored = next(t.dtype for t in hl.load_safetensors(hl.shard_files(args.init, "heads")).values()
                  if t.is_floating_point())  # (written as stored)
    hl.save_heads(fewer_heads(heads, args.n_heads, model.cfg).to(stored), args.out, model.cfg, files)
    log(f"wrote the first {args.n_heads} of {heads.hc.n_heads} heads, with a tree of {len(tree) + 1} nodes, to {args.out}")


def heads_to_train(args, model, counts, size):
    """New heads (--kind, --n-heads, --n-layers), or --init's: their shape and draft vocabulary unless asked
    otherwise (--n-layers may grow them; --draft-vocab moves them to another vocabulary). Sets args' kind,
    n_heads and n_layers to what is trained, for train.json."""
    if not args.init:
        args.n_layers, args.n_heads = args.n_layers or 1, args.n_heads or 4
        vocab = top_tokens(counts[0], 16384 if size is None else size)
        return new_heads(model, args.kind, args.n_heads, args.n_layers, vocab,
                         f"train_heads.py on {args.checkpoint}").to(args.device)
    heads = hl.load_heads(args.init, model).float().train().requires_grad_(True)  # fp32 master weights
    hc = heads.hc
    if args.n_layers is not None and args.n_layers < hc.n_layers:
        raise hl.HydraLiteError(f"--n-layers {args.n_layers}: {args.init} has {hc.n_layers} blocks per head "
                                "(heads can grow, not shrink)")
    if args.n_heads is not None and args.n_heads < hc.n_heads:
        raise hl.HydraLiteError(f"--n-heads {args.n_heads}: {args.init} has {hc.n_heads} heads (they can grow, not shrink)")
    if args.n_layers is not None and args.n_layers > hc.n_layers:
        heads = deeper_heads(heads, args.n_layers, model.cfg)
        log(f"{hc.n_layers} -> {args.n_layers} blocks per head (the new ones start as the identity)")
    if args.n_heads is not None and args.n_heads > hc.n_heads:
        heads = more_heads(heads, args.n_heads, model.cfg)
        log(f"{hc.n_heads} -> {args.n_heads} heads (the new ones start as copies of the last)")
    args.kind, args.n_heads, args.n_layers = hc.kind, heads.hc.n_heads, heads.hc.n_layers
    if size is not None:
        heads = with_draft_vocab(heads, top_tokens(counts[0], size), model.cfg)
    heads.hc.source = f"train_heads.py on {args.checkpoint}: {args.init} fine-tuned on {args.data}"
    log(f"going on from {args.init} ({hc.kind}, {hc.n_heads} heads of {hc.n_layers} blocks)")
    return heads


def parse_temperatures(text):
    """--temperatures "0,0.7" -> [0.0, 0.7], each 0 (greedy) or positive."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise hl.HydraLiteError(f"--temperatures is a comma-separated list of numbers (e.g. 0,0.7), not {text!r}") from None
    return [hl.check_temperature("--temperatures", x) for x in values]


def check_args(args):
    """What can be checked before the model loads: a mistake costs a line, not a run."""
    hl.check_device(args.device)
    if args.cmd == "data":
        if not args.out.endswith(".npz"):
            raise hl.HydraLiteError(f"data files are .npz: {args.out}")
        if not os.path.isfile(args.prompts):
            raise hl.HydraLiteError(f"prompts file {args.prompts} not found")
        parse_temperatures(args.temperatures)
        try:
            parse_range(args.rows)
        except ValueError:
            raise hl.HydraLiteError(f"--rows is a range like 0-79, not {args.rows!r}") from None
        for name in ("samples", "synthetic", "imitate"):
            hl.check_int(f"--{name}", getattr(args, name), 0)
        hl.check_int("--max-new-tokens", args.max_new_tokens, 1)
        hl.check_int("--batch", args.batch, 1)
    if args.cmd in ("train", "tree"):
        for path in args.data.split(","):
            if not os.path.isfile(path):
                raise hl.HydraLiteError(f"data file {path} not found (make one with: train_heads.py data)")
    if args.cmd == "train":
        hl.check_int("--steps", args.steps, 1)
        if args.n_heads is not None:
            hl.check_int("--n-heads", args.n_heads, 1, 16)
        if args.n_layers is not None:
            hl.check_int("--n-layers", args.n_layers, 1, 16)
        hl.check_int("--max-tokens", args.max_tokens, 16)
        if not 0 < args.lr < 1:
            raise hl.HydraLiteError(f"--lr must be between 0 and 1, not {args.lr}")
        if args.draft_vocab not in (None, "auto") and not args.draft_vocab.isdigit():
            raise hl.HydraLiteError(f"--draft-vocab is a number of tokens or auto, not {args.draft_vocab!r}")
        if args.init and not os.path.isdir(args.init):
            raise hl.HydraLiteError(f"--init heads {args.init} not found")
        shipped = os.path.join(hl.HERE, "heads")
        if os.path.isdir(args.out) and os.path.commonpath([shipped, os.path.abspath(args.out)]) == shipped and not args.force:
            raise hl.HydraLiteError(f"{args.out} holds heads shipped with hydra-lite; write elsewhere, or add --force")
    if args.cmd == "keep":
        for path in filter(None, (args.init, args.tree_from, args.context_tree_from)):
            if not os.path.isfile(os.path.join(path, "heads.json")):
                raise hl.HydraLiteError(f"no heads in {path}")
        hl.check_int("--n-heads", args.n_heads, 1, 16)
    if args.cmd == "tree" and not os.path.isfile(os.path.join(args.out, "heads.json")):
        raise hl.HydraLiteError(f"no heads in {args.out} to fit a tree for")


if __name__ == "__main__":
    sys.exit(main())
