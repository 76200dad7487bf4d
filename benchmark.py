"""Benchmarks for hydra-lite (run on a GPU; results go to BENCHMARKS.md by hand, with device, date, command).

    python benchmark.py e2e --heads medusa=heads/m hydra=heads/h hydra++=heads/hpp --prompts q.jsonl --rows 80-99
        AR vs speculative decoding with each set of heads (plus Hugging Face generate() as the baseline a user
        would otherwise pick; --hf-limit N: on the first N prompts only), batch 1 and larger, greedy: tokens/s,
        mean acceptance length, speedup over AR, output match with AR. Writes JSON, a markdown table and a plot.
    python benchmark.py steps --shape 7b
        Step times of one model forward under CUDA graphs: an autoregressive step (1 token per row) vs a
        64-token tree verification, batch 1 and 8, against the HBM roofline (weights + KV cache read once).
    python benchmark.py check
        On a GPU: every Triton kernel of kernels.py against its reference in hydra_lite.py, then their times.
    python benchmark.py latency --heads heads/smollm2-135m-hydra++ [--warmup]
        Time to first token, per-token latency (p50/p99) and per-call overhead by prompt length and batch size,
        first call vs the same call repeated. JSON, a table and a plot.
    python benchmark.py tasks --heads shipped=heads/smollm2-135m-hydra++ --sharegpt questions.jsonl
        The multi-task held-out prompts (tasks/heldout.jsonl: chat, translation, summarization, QA, RAG, math,
        code completion and editing): AR vs each heads with and without context drafts, wall clock per call
        (prefill included), first and repeated call, per task and overall. JSON, a markdown table and a plot.
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import random
import statistics
import sys
import time

import torch

import hydra_lite as hl
import train_heads as th


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# End to end


def run_mode(gen, prompts, batch, max_new, mode, sampling=None):
    """Generate for every prompt in groups of `batch`. Returns outputs and totals."""
    outs, new_tokens, decode_s, total_s, accepted, row_steps, steps = [], 0, 0.0, 0.0, 0, 0, 0
    for i in range(0, len(prompts), batch):
        group = prompts[i:i + batch]
        t0 = time.perf_counter()
        o, s = gen.generate(group, max_new, sampling, mode=mode, stop_at_eos=True)
        total_s += time.perf_counter() - t0
        outs += o
        new_tokens, decode_s = new_tokens + s.new_tokens, decode_s + s.decode_s
        accepted, row_steps, steps = accepted + s.accepted, row_steps + s.row_steps, steps + s.steps
    return outs, dict(new_tokens=new_tokens, decode_s=decode_s, total_s=total_s,
                      tokens_per_s=new_tokens / decode_s, e2e_tokens_per_s=new_tokens / total_s,
                      mean_accept=accepted / max(row_steps, 1),
                      ms_per_step=1000 * decode_s / max(steps, 1))  # (one step advances every live row of a batch)


def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def match_stats(outs, ref):
    """Exact-sequence match rate, and the fraction of reference tokens reproduced before the first mismatch."""
    exact = sum(a == b for a, b in zip(outs, ref)) / len(ref)
    prefix = sum(common_prefix(a, b) for a, b in zip(outs, ref))
    return exact, prefix / max(sum(len(r) for r in ref), 1)


def divergence_margins(model, prompts, outs, ref):
    """Where an output parts from the reference: the reference model's top-2 logit margin at that token (a
    margin near rounding size means a near-tie, not a decoding bug)."""
    margins = []
    for p, a, b in zip(prompts, outs, ref):
        n = common_prefix(a, b)
        if a != b:
            top = model.forward_logits(torch.tensor([p + b[:n]], device=model.embed.weight.device))[0, -1].topk(2).values
            margins.append(dict(at=n, margin=(top[0] - top[1]).item()))
    return margins


def export_hf(model, out_dir):
    """The runtime checkpoint as a Hugging Face Llama dir (for the transformers baseline only)."""
    from safetensors.torch import save_file

    c = model.cfg
    os.makedirs(out_dir, exist_ok=True)
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm}
    if model.lm_head is not None:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, L in enumerate(model.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = L.wqkv.weight.split([q, kv, kv])
        gate, up = L.w13.weight.chunk(2)
        sd.update({p + "input_layernorm.weight": L.attn_norm.weight, p + "post_attention_layernorm.weight": L.ffn_norm.weight,
                   p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk, p + "self_attn.v_proj.weight": wv,
                   p + "self_attn.o_proj.weight": L.wo.weight, p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": L.w2.weight})
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, os.path.join(out_dir, "model.safetensors"))
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=c.dim, intermediate_size=c.hidden_dim,
               num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
               head_dim=c.head_dim, vocab_size=c.vocab_size, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
               rope_scaling=c.rope_scaling, max_position_embeddings=c.max_seq_len, tie_word_embeddings=c.tie_embeddings,
               bos_token_id=c.bos_id, eos_token_id=c.eos_ids, torch_dtype=str(model.embed.weight.dtype).replace("torch.", ""))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f)


def run_hf(model, prompts, max_new):
    """transformers generate(), greedy, batch 1, same weights and dtype."""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as d:
        export_hf(model, d)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=model.embed.weight.dtype).to(model.embed.weight.device).eval()
    eos = model.cfg.eos_ids
    outs, new_tokens, secs = [], 0, 0.0
    hf.generate(torch.tensor([prompts[0]], device=hf.device), max_new_tokens=8, do_sample=False)  # warm-up
    for p in prompts:
        x = torch.tensor([p], device=hf.device)
        hl.sync(hf.device)
        t0 = time.perf_counter()
        y = hf.generate(x, max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        hl.sync(hf.device)
        secs += time.perf_counter() - t0
        o = y[0, len(p):].tolist()
        o = o[:next((i for i, t in enumerate(o) if t in eos), len(o))]
        outs.append(o)
        new_tokens += len(o)
    return outs, dict(new_tokens=new_tokens, decode_s=secs, total_s=secs, tokens_per_s=new_tokens / secs,
                      e2e_tokens_per_s=new_tokens / secs, mean_accept=1.0)


def tree_for(heads_path, args, size=0):
    """--tree JSON, or a tree of `size` nodes fitted to the heads' held-out accuracies, or the heads' own."""
    if args.tree:
        return json.loads(args.tree)
    if size:
        with open(os.path.join(heads_path, "train.json")) as f:
            return hl.build_tree(json.load(f)["held_out_rank_acc"], size - 1)
    return None


def profile_step(gen, prompts, path):
    """GPU time of one speculative step over a batch of prompts, by kernel (the step's graph is bypassed so
    kernels show up); CPU time by op on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = gen.device.type == "cuda"

    gen.generate(prompts, 16 if cuda else 1)  # (compiles and captures on the GPU)
    ws = gen.workspace
    with torch.inference_mode():
        logits, h = gen._prefill(ws, prompts)
        root = logits.argmax(-1)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(5 if cuda else 1):  # (a CPU step is thousands of op events: one is plenty)
                out, h = ws.step.fn(root, h, torch.ones_like(root, dtype=torch.int32))
                root = out[:, -1]
            hl.sync(gen.device)
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total", row_limit=60)
    with open(path, "w") as f:
        f.write(table)
    log(table)


def e2e(args):
    dev, dtype = args.device, getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)  # profiles are written as the run goes
    model = hl.load_model(args.checkpoint, dev, dtype)
    tok = hl.Tokenizer(args.checkpoint, model.cfg)
    texts = th.read_prompts(args.prompts, th.parse_range(args.rows), first_turn=True)[:args.limit or None]
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    heads = dict(h.split("=", 1) for h in args.heads)
    # sampled: outputs are not expected to match AR's token for token (exact acceptance samples the same
    # distribution, typical acceptance a nearby one); each acceptance rule runs as its own row
    sp = hl.SamplingParams(temperature=args.temperature)
    rules = args.acceptance if args.temperature > 0 else ["exact"]  # (greedy verification ignores the rule)
    if args.temperature > 0 and args.hf:
        log("temperature > 0: no transformers generate() baseline")
        args.hf = False
    log(f"{len(prompts)} prompts, max {args.max_new_tokens} new tokens, {dev} {args.dtype}, heads {heads}")
    results, outputs = [], {}
    for batch in args.batch:
        ar_gen = hl.Generator(model, tok)
        ar_gen.generate(prompts[:batch], 16, sp, mode="ar")  # capture graphs outside the timing
        ar_out, ar = run_mode(ar_gen, prompts, batch, args.max_new_tokens, "ar", sp)
        outputs[f"ar/b{batch}"] = ar_out
        results.append(dict(mode="ar", batch=batch, **ar, speedup=1.0, exact_match=1.0, token_match=1.0))
        log(f"b{batch} ar: {ar['tokens_per_s']:.1f} tokens/s")
        if batch == 1 and args.hf:
            n_hf = args.hf_limit or len(prompts)  # (generate() is 30-50x slower: a few prompts give its rate)
            hf_out, hf = run_hf(model, prompts[:n_hf], args.max_new_tokens)
            exact, tm = match_stats(hf_out, ar_out[:n_hf])
            results.append(dict(mode="hf-generate", batch=1, **hf, speedup=hf["tokens_per_s"] / ar["tokens_per_s"],
                                exact_match=exact, token_match=tm))
            log(f"b1 hf generate: {hf['tokens_per_s']:.1f} tokens/s")
        for (name, spec), rule in ((h, r) for h in heads.items() for r in rules):
            path, _, size = spec.partition(":")  # DIR[:TREE_NODES]
            sizes = {} if not args.tree_nodes else dict(tree_nodes_by_batch=((1 << 30, args.tree_nodes),))
            gen = hl.Generator(model, tok, hl.load_heads(path, model), tree_for(path, args, int(size or 0)), acceptance=rule,
                               context_drafts=args.context, **sizes)
            name = name if len(rules) == 1 else f"{name} ({rule})"
            gen.generate(prompts[:batch], 16, sp)
            out, r = run_mode(gen, prompts, batch, args.max_new_tokens, "spec", sp)
            exact, tm = match_stats(out, ar_out)
            outputs[f"{name}/b{batch}"] = out
            results.append(dict(mode=name, batch=batch, **r, speedup=r["tokens_per_s"] / ar["tokens_per_s"],
                                exact_match=exact, token_match=tm))
            if dtype == torch.float32 and exact < 1 and not args.temperature:
                results[-1]["divergences"] = divergence_margins(model, prompts, out, ar_out)
                log(f"b{batch} {name} divergences (token index, top-2 logit margin there): {results[-1]['divergences']}")
            if args.profile:
                profile_step(gen, prompts[:batch], os.path.join(args.out, f"profile_{name}{f'_b{batch}' * (batch > 1)}.txt"))
            log(f"b{batch} {name}: {r['tokens_per_s']:.1f} tokens/s, accept {r['mean_accept']:.2f}, "
                f"x{r['tokens_per_s'] / ar['tokens_per_s']:.2f}, match {exact:.2f}/{tm:.3f}")
    meta = dict(device=torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu", date=time.strftime("%Y-%m-%d"),
                command=" ".join(sys.argv), torch=torch.__version__, dtype=args.dtype, prompts=len(prompts),
                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                acceptance=rules if args.temperature > 0 else None)
    with open(os.path.join(args.out, "e2e_outputs.json"), "w") as f:
        json.dump({k: [tok.decode(o) for o in v[:5]] for k, v in outputs.items()}, f, indent=1)
    table = ["| mode | batch | tokens/s | speedup vs AR | mean accept | ms/step | exact match with AR | token match |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['mode']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['mean_accept']:.2f} | "
              f"{r.get('ms_per_step', float('nan')):.3f} | {r['exact_match']:.2f} | {r['token_match']:.3f} |" for r in results]
    write_report(args.out, "e2e", meta, dict(meta=meta, results=results), "\n".join(table), lambda path: plot(results, path))


def write_report(out, name, meta, data, table, plot_to):
    """name.json (data), name.md (the table), name.png (plot_to(path)); then the meta and the table on stdout."""
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=1)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(table + "\n")
    plot_to(os.path.join(out, f"{name}.png"))
    print(json.dumps(meta))
    print(table)


def pyplot():
    """matplotlib's pyplot on a file backend, or None where matplotlib is not installed (no plot then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(results, path):
    plt = pyplot()
    if plt is None:
        return
    batches = sorted({r["batch"] for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.5), squeeze=False)
    for ax, b in zip(axes[0], batches):
        rs = [r for r in results if r["batch"] == b]
        ax.bar([r["mode"] for r in rs], [r["tokens_per_s"] for r in rs], color="tab:blue")
        for i, r in enumerate(rs):
            ax.text(i, r["tokens_per_s"], f"{r['speedup']:.2f}x\n{r['mean_accept']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"batch {b}: tokens/s (speedup, mean accept)")
        ax.set_ylim(0, max(r["tokens_per_s"] for r in rs) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------------
# Step times against the roofline

SHAPES = {
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152, tie_embeddings=True),
}


def time_graph(fn, reps=50):
    """Median milliseconds of fn replayed as a CUDA graph."""
    g = hl.StepGraph(fn, [], True)
    for _ in range(3):
        g()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def hbm_bandwidth(device="cuda"):
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(10):
        y.copy_(x)
    b.record()
    b.synchronize()
    return 2 * x.numel() * 2 * 10 / (a.elapsed_time(b) / 1000)


def parse_tiles(text):
    """--path-tiles 16x256 -> (16, 256): tile rows (a power of two, 16-128) x split length (a multiple of 64)."""
    rows, _, split = text.partition("x")
    ok = rows.isdigit() and split.isdigit() and int(rows) in (16, 32, 64, 128)
    if not ok or int(split) % 64 or not 64 <= int(split) <= 4096:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROWSxSPLIT (rows 16, 32, 64 or 128; split a multiple of 64)")
    return int(rows), int(split)


def steps(args):
    """Step times of a random-weight model of --shape, as CUDA graphs, for each kernel set (step_kernel_sets),
    against the HBM and FLOP floors."""
    import kernels as K

    args.path_tiles = args.path_tiles or [(K.PATH_TILE_ROWS, K.PATH_SPLIT_LEN)]
    choices = hl.prune_tree(hl.default_tree(), args.tree_nodes) if args.tree_nodes else hl.default_tree()
    model, tree = random_model(SHAPES[args.shape], args.device), hl.Tree(choices, args.device, context=args.tree_chain)
    n_params = sum(p.numel() for p in model.parameters())
    bw = hbm_bandwidth(args.device)
    log(f"{args.shape}: {n_params / 1e9:.2f}B parameters, HBM copy bandwidth {bw / 1e12:.2f} TB/s")
    before, rows = kernel_settings(K), []
    try:
        with torch.inference_mode():
            first = dict(exact=True, tiles=args.path_tiles[0])
            checks = [dict(first, tiles=t) for t in args.path_tiles] + ([dict(first, merge=True)] if args.unfused else [])
            checks += [dict(first, programs=n) for n in args.path_programs] + [dict(first, warps=w) for w in args.path_warps]
            for change in checks:  # each path_attention setting: a tree node == decoding its path
                use_kernel_settings(K, **before | change)
                log(f"path_attention {change}: tree node == decoding, bit for bit: {path_tiles_invariant(K, model.cfg, tree)}")
            use_kernel_settings(K, **before)  # (the kernel sets below start from the settings as they were)
            for B in args.batch:
                cache = model.new_cache(B, 4096)
                cache.k.normal_(), cache.v.normal_()
                cache.lens.fill_(args.context)
                sets = step_kernel_sets(args, K)
                for (suffix, settings), (name, T) in itertools.product(sets, (("AR step", 1), ("tree verify", tree.size))):
                    use_kernel_settings(K, **settings)  # (read at capture)
                    rows.append(time_step(model, cache, tree, B, T, bw, args) | dict(step=name + suffix))
                    r = rows[-1]
                    if args.profile and suffix in (sets[0][0], " (fast kernels)"):  # (the default set and the fast)
                        profile_kernels(model, cache, tree, B, T, os.path.join(args.out, f"profile_{args.shape}_b{B}_"
                                        f"{'ar' if T == 1 else 'verify'}{'_fast' if 'fast' in suffix else ''}.txt"))
                    log(f"b{B} {r['step']} ({B * T} tokens): {r['ms']:.3f} ms, HBM floor {r['hbm_floor_ms']:.3f} ms, "
                        f"bf16 FLOP floor {r['flop_floor_ms']:.3f} ms")
    finally:
        use_kernel_settings(K, **before)
    write_steps_report(args, rows, dict(hbm_tb_s=bw / 1e12, params=n_params, context=args.context))


def random_model(shape, device):
    """A Llama of the given shape with random bf16 weights (built in bf16: a 7B fp32 copy would waste 27 GB)."""
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = hl.Llama(hl.Config(**shape, max_seq_len=4096))
    finally:
        torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def kernel_setting(K, name, value):
    """K.name = value for the block, then as it was (the kernel check's A/B of one knob)."""
    before = getattr(K, name)
    setattr(K, name, value)
    try:
        yield
    finally:
        setattr(K, name, before)


# Each kernel setting a step can be timed with: its name here -> (module, attribute) that the kernels read when a
# graph is captured ("hl": hydra_lite, "K": kernels).
KERNEL_KNOBS = dict(exact=("hl", "EXACT"), fused=("hl", "FUSED"), merge=("K", "PATH_MERGE_IN_KERNEL"),
                    edge=("K", "PATH_EDGE_TOKENS"), pdl=("K", "PDL"), pdl_tokens=("K", "PDL_MAX_TOKENS"),
                    wide_n=("K", "MATMUL_WIDE_N"), programs=("K", "PATH_PROGRAMS"), warps=("K", "PATH_WARPS"),
                    k_tile=("K", "MATMUL_K_TILE"), merge_decode=("K", "PATH_MERGE_DECODE"), stages=("K", "MATMUL_STAGES"),
                    path_stages=("K", "PATH_STAGES"))


def kernel_settings(K):
    """Which kernels a forward runs (read when a graph is captured), as use_kernel_settings takes them."""
    modules = dict(hl=hl, K=K)
    return {name: getattr(modules[m], attr) for name, (m, attr) in KERNEL_KNOBS.items()} | dict(
        tiles=(K.PATH_TILE_ROWS, K.PATH_SPLIT_LEN))


def use_kernel_settings(K, tiles, **knobs):
    modules = dict(hl=hl, K=K)
    K.PATH_TILE_ROWS, K.PATH_SPLIT_LEN = tiles
    for name, value in knobs.items():
        m, attr = KERNEL_KNOBS[name]
        setattr(modules[m], attr, value)


def step_kernel_sets(args, K):
    """(name suffix, kernel settings) to time: the invariant kernels (the default: fused layers) with each
    --path-tiles and each further --edge-tokens, the previous ones, with --pdl the default without dependent launch
    and with it at every size, each --matmul-wide-n, and with --unfused the layers op by op and the merge in the
    kernel."""
    tiles, (edge, *more) = args.path_tiles, args.edge_tokens
    default = kernel_settings(K) | dict(exact=True, fused=True, merge=False, tiles=tiles[0], edge=edge)  # (launch: K's)
    sets = [(f" (path tiles {t[0]}x{t[1]})" if len(tiles) > 1 else "", default | dict(tiles=t)) for t in tiles]
    sets += [(f" (edge tokens {e})", default | dict(edge=e)) for e in more]
    if args.pdl:
        sets += [(" (no dependent launch)", default | dict(pdl=False)),
                 (" (dependent launch at every size)", default | dict(pdl=True, pdl_tokens=0))]
    sets += [(f" (matmul 64 columns from N={n})", default | dict(wide_n=n)) for n in args.matmul_wide_n]
    sets += [(f" (path_attention ~{n} programs)", default | dict(programs=n)) for n in args.path_programs]
    sets += [(f" (path_attention {w} warps)", default | dict(warps=w)) for w in args.path_warps]
    sets += [(f" (matmul K steps of {k})", default | dict(k_tile=k)) for k in args.matmul_k_tile]
    sets += [(f" (matmul {n} stages)", default | dict(stages=n)) for n in args.matmul_stages]
    sets += [(f" (path_attention {n} stages)", default | dict(path_stages=n)) for n in args.path_stages]
    if args.merge_decode:
        sets.append((" (merge in kernel for decoding)", default | dict(merge_decode=True)))
    sets.append((" (fast kernels)", default | dict(exact=False, fused=False)))
    if args.unfused:
        sets += [(" (unfused layers)", default | dict(fused=False)), (" (merge in kernel)", default | dict(merge=True))]
    return sets


def random_step(model, cache, tree, B, T):
    """One step of T random tokens a row (1: decoding; the tree's size: verification), as a function: the logits."""
    tokens = torch.randint(0, model.cfg.vocab_size, (B, T), device=cache.k.device)
    pos = cache.lens[:, None].long() + (tree.node_depth[None] if T > 1 else 0)
    return lambda: model.logits(model(tokens, cache, pos, tree.rows(B) if T > 1 else None))


def time_step(model, cache, tree, B, T, bw, args):
    """One step of T tokens a row (1: decoding; the tree's size: verification) timed as a graph, and its floors."""
    cfg, n_params = model.cfg, sum(p.numel() for p in model.parameters())
    ms = time_graph(random_step(model, cache, tree, B, T))
    kv_bytes = 2 * cfg.n_layers * B * (args.context + T) * cfg.n_kv_heads * cfg.head_dim * 2
    floor_ms = (n_params * 2 + kv_bytes) / bw * 1000
    flop_ms = 2 * n_params * B * T / 790e12 * 1000
    return dict(shape=args.shape, batch=B, tokens=B * T, ms=ms, roofline_ms=max(floor_ms, flop_ms), hbm_floor_ms=floor_ms,
                flop_floor_ms=flop_ms, fraction=max(floor_ms, flop_ms) / ms)


def profile_kernels(model, cache, tree, B, T, path):
    """GPU time by kernel of one step of T tokens a row, run eagerly (5 steps; a kernel's time on the GPU does
    not depend on how it was launched): where a step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    dev, step = cache.k.device, random_step(model, cache, tree, B, T)
    step()
    hl.sync(dev)
    cuda = dev.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(5 if cuda else 1):
            step()
        hl.sync(dev)
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(table)
    log(f"{os.path.basename(path)}:\n" + "\n".join(table.splitlines()[:14]))


def write_steps_report(args, rows, meta):
    table = ["| shape | batch | step | tokens | ms | roofline ms | of roofline |", "| --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['shape']} | {r['batch']} | {r['step']} | {r['tokens']} | {r['ms']:.3f} | {r['roofline_ms']:.3f} | "
              f"{r['fraction'] * 100:.0f}% |" for r in rows]
    device = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else args.device
    meta = dict(device=device, date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv)) | meta
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"steps_{args.shape}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(json.dumps(meta))
    print("\n".join(table))


# ----------------------------------------------------------------------------------------------------------
# Kernel check on a GPU: every Triton kernel against its reference (hydra_lite's *_ref ops) on fresh random
# inputs, then its time. (On the CPU, tests/test_kernels.py runs the same comparisons under the interpreter.)

# (Hq, Hkv, head_dim, dim, hidden_dim, layers); "d80": a non-power-of-2 head_dim
CHECK_SHAPES = {"smollm2": (9, 3, 64, 576, 1536, 30), "7b": (32, 32, 128, 4096, 11008, 32), "d80": (8, 2, 80, 640, 1024, 4)}
CHECK_SLOTS = 2048 + 512 + 64  # cache slots per row


class KernelCheck:
    """Collects PASS/FAIL lines and timings."""

    def __init__(self):
        import triton

        self.bench, self.bench_graph = triton.testing.do_bench, triton.testing.do_bench_cudagraph
        self.failures, self.timings = [], []

    def close(self, name, out, ref, dtype, tol=None):
        """tol: (rtol, atol) instead of the dtype's."""
        out, ref = out.float(), ref.float()
        abs_err = (out - ref).abs().max().item()
        rel_err = abs_err / max(ref.abs().max().item(), 1e-30)
        rtol, atol = tol or ((1e-4, 1e-4) if dtype == torch.float32 else (1.6e-2, 1e-2))
        self.verdict(name, bool(torch.isfinite(out).all()) and torch.allclose(out, ref, rtol=rtol, atol=atol),
                     f"max abs {abs_err:.2e}  rel {rel_err:.2e}")

    def verdict(self, name, ok, detail=""):
        print(f"{'PASS' if ok else 'FAIL'}  {name:58s} {detail}")
        if not ok:
            self.failures.append(name)

    def time(self, name, fn, ref_fn, ref_graph=False):
        """The kernel replayed in a CUDA graph (GPU time), called eagerly (+ host time), and its reference (called
        eagerly; ref_graph: replayed in a graph too)."""
        median = dict(return_mode="median")
        self.timings.append((name, self.bench_graph(fn, **median) * 1e3, self.bench(fn, **median) * 1e3,
                             (self.bench_graph if ref_graph else self.bench)(ref_fn, **median) * 1e3))

    def report(self):
        print("\n== timings (median, us; graph: the kernel replayed in a CUDA graph, eager: one call from Python)")
        print(f"{'kernel':52s} {'graph':>8s} {'eager':>8s} {'reference':>10s} {'ref/graph':>9s}")
        for name, t_g, t_e, t_r in self.timings:
            print(f"{name:52s} {t_g:8.1f} {t_e:8.1f} {t_r:10.1f} {t_r / t_g:8.1f}x")
        if self.failures:
            print(f"\n{len(self.failures)} FAILED: {self.failures}")
            return 1
        print("\nall PASS")
        return 0


def check_elementwise(c, K, shape, B, timed):
    """RMSNorm (+ residual), SwiGLU, silu_add (whole and strided halves), the grounded heads' input."""
    (_, _, _, dim, hidden, _), name, dev, bf16 = CHECK_SHAPES[shape], shape, "cuda", torch.bfloat16
    rows = B * 64
    x = torch.randn(B, 64, dim, device=dev, dtype=bf16)
    r, w = torch.randn_like(x), torch.randn(dim, device=dev, dtype=bf16)
    c.close(f"rms_norm {name} [{rows},{dim}]", K.rms_norm(x, w, 1e-5), hl.rms_norm_ref(x, w, 1e-5), bf16)
    c.close(f"rms_norm+residual {name} [{rows},{dim}]", torch.cat(K.rms_norm(x, w, 1e-5, r)),
            torch.cat(hl.rms_norm_ref(x, w, 1e-5, r)), bf16)
    gu = torch.randn(B, 64, 2 * hidden, device=dev, dtype=bf16)
    c.close(f"swiglu {name} [{rows},{2 * hidden}]", K.swiglu(gu), hl.swiglu_ref(gu), bf16)
    if timed:
        c.time(f"rms_norm+res {name} [{rows},{dim}]", lambda: K.rms_norm(x, w, 1e-5, r), lambda: hl.rms_norm_ref(x, w, 1e-5, r))
        c.time(f"swiglu {name} [{rows},{2 * hidden}]", lambda: K.swiglu(gu), lambda: hl.swiglu_ref(gu))
    r, z = torch.randn(B, 64, dim, device=dev, dtype=bf16), torch.randn(B, 64, dim, device=dev, dtype=bf16)
    c.close(f"silu_add {name} [{rows},{dim}]", K.silu_add(r, z), hl.silu_add_ref(r, z), bf16)
    y = torch.randn(B, 64, 2 * dim, device=dev, dtype=bf16)  # the heads' fused projection: two halves
    c.close(f"silu_add halves {name} [{rows},{dim}]", K.silu_add(y[..., :dim], y[..., dim:]),
            hl.silu_add_ref(y[..., :dim], y[..., dim:]), bf16)
    emb = torch.randn(1000, dim, device=dev, dtype=bf16)
    toks, path = torch.randint(0, 1000, (B, 64), device=dev), torch.randint(0, 64, (10, 4), device=dev)
    h = torch.randn(B, dim, device=dev, dtype=bf16)
    c.close(f"head_input {name} [{B}x10,{5 * dim}]", K.head_input(h, toks, path, emb), hl.head_input_ref(h, toks, path, emb),
            bf16)
    paths = torch.randint(0, 64, (B, 10, 4), device=dev)  # a path table per row (dynamic trees)
    c.close(f"head_input per-row path {name} [{B}x10,{5 * dim}]", K.head_input(h, toks, paths, emb),
            hl.head_input_ref(h, toks, paths, emb), bf16)


def check_attention(c, K, shape, B, dtype, tree):
    """RoPE + cache write, then decoding (T=1, split-K and not), tree verification (T=64; the shared tree's
    [T, T] mask, a [B, T, T] mask with a tree per row, and the shared one expanded to [B, T, T]) and causal
    prefill (T=512) attention, over ragged rows up to 2000 cached slots."""
    Hq, Hkv, D, _, _, _ = CHECK_SHAPES[shape]
    dev, S, timed = "cuda", CHECK_SLOTS, dtype == torch.bfloat16 and shape != "d80"
    cfg = hl.Config(dim=Hq * D, n_layers=1, n_heads=Hq, n_kv_heads=Hkv, hidden_dim=8, vocab_size=8, head_dim=D)
    cos, sin = hl.rope_tables(cfg, S, dev)
    k_cache = torch.randn(2, B, S, Hkv, D, device=dev, dtype=dtype)[1]  # a layer's view of a 2-layer cache
    v_cache = torch.randn(2, B, S, Hkv, D, device=dev, dtype=dtype)[1]
    for T in (1, 64, 512):
        if T == 512 and B == 8 and dtype == torch.float32:
            continue
        lens = torch.randint(0, 2000, (B,), device=dev, dtype=torch.int32)
        lens[0] = 2000 if T < 512 else 0
        tag = f"{shape} B={B} T={T} {str(dtype)[6:]}"
        q, k, v = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=dev, dtype=dtype).split([Hq * D, Hkv * D, Hkv * D], -1)
        q, k, v = q.view(B, T, Hq, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        pos = lens[:, None].long() + (tree.node_depth[None] if T == 64 else torch.arange(T, device=dev))
        kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
        q_ref = hl.rope_cache_write_ref(q, k, v, cos, sin, pos, kc_ref, vc_ref, lens)
        q_rot = K.rope_cache_write(q, k, v, cos, sin, pos, k_cache, v_cache, lens)
        c.close(f"rope_cache_write {tag}", torch.cat([q_rot.flatten(), k_cache.flatten(), v_cache.flatten()]),
                torch.cat([q_ref.flatten(), kc_ref.flatten(), vc_ref.flatten()]), dtype)
        if T in (1, 64) and timed:
            c.time(f"rope_cache_write {tag}", lambda: K.rope_cache_write(q, k, v, cos, sin, pos, k_cache, v_cache, lens),
                   lambda: hl.rope_cache_write_ref(q, k, v, cos, sin, pos, kc_ref, vc_ref, lens))
        mask = tree.mask if T == 64 else None
        ref = hl.attention_ref(q_rot, k_cache, v_cache, lens, mask)
        if T == 1:
            fn = lambda: K.decode_attention(q_rot, k_cache, v_cache, lens)  # noqa: E731
            c.close(f"decode_attention {tag}", fn(), ref, dtype)
            no_split = K.decode_attention(q_rot, k_cache, v_cache, lens, num_splits=1)
            c.close(f"decode_attention no-split {tag}", no_split, ref, dtype)
        else:
            fn = lambda: K.tree_attention(q_rot, k_cache, v_cache, lens, mask)  # noqa: E731
            c.close(f"tree_attention {'tree' if T == 64 else 'causal'} {tag}", fn(), ref, dtype)
        if T == 64:  # per row: each row sees its own random part of its ancestors (itself always)
            masks = (tree.mask & (torch.rand(B, T, T, device=dev) < 0.5)) | torch.eye(T, dtype=torch.bool, device=dev)
            c.close(f"tree_attention per-row mask {tag}", K.tree_attention(q_rot, k_cache, v_cache, lens, masks),
                    hl.attention_ref(q_rot, k_cache, v_cache, lens, masks), dtype)
            c.close(f"tree_attention expanded mask {tag}",
                    K.tree_attention(q_rot, k_cache, v_cache, lens, mask.expand(B, T, T)), ref, dtype)
            if timed:
                c.time(f"tree_attention per-row mask {tag}", lambda: K.tree_attention(q_rot, k_cache, v_cache, lens, masks),
                       lambda: hl.attention_ref(q_rot, k_cache, v_cache, lens, masks))
        if timed:
            c.time(f"{'decode' if T == 1 else 'tree'}_attention {tag}", fn,
                   lambda: hl.attention_ref(q_rot, k_cache, v_cache, lens, mask))


def check_bookkeeping(c, K, shape, B, tree, timed):
    """Greedy acceptance on the 64-node tree (shared, and a table per row), and the KV compaction of its paths
    over all layers."""
    _, Hkv, D, _, _, L = CHECK_SHAPES[shape]
    dev = "cuda"
    tokens = torch.randint(0, 3, (B, tree.size), device=dev)
    pred = torch.randint(0, 3, (B, tree.size), device=dev)
    n, path, out = K.accept_greedy(tokens, pred, tree.retrieve)
    expected = hl.accept_greedy_ref(tokens, pred, tree.retrieve)
    c.verdict(f"accept_greedy {shape} B={B}", all(map(torch.equal, (n, path, out), expected)),
              f"(mean accepted {n.float().mean():.2f})")
    per_row = torch.stack([tree.retrieve[torch.randperm(len(tree.retrieve), device=dev)] for _ in range(B)])
    c.verdict(f"accept_greedy per-row retrieve {shape} B={B}",
              all(map(torch.equal, K.accept_greedy(tokens, pred, per_row), hl.accept_greedy_ref(tokens, pred, per_row))))
    k_all = torch.randn(L, B, CHECK_SLOTS, Hkv, D, device=dev, dtype=torch.bfloat16)
    v_all = torch.randn_like(k_all)
    lens = torch.randint(0, 2000, (B,), device=dev, dtype=torch.int32)
    k_ref, v_ref = k_all.clone(), v_all.clone()
    K.kv_compact(k_all, v_all, lens, path)
    hl.kv_compact_ref(k_ref, v_ref, lens, path)
    c.verdict(f"kv_compact {shape} L={L} B={B}", torch.equal(k_all, k_ref) and torch.equal(v_all, v_ref))
    history = torch.randint(0, 4, (B, CHECK_SLOTS), device=dev)  # prompt lookup over long texts (many matches)
    c.verdict(f"context_match {shape} B={B} S={CHECK_SLOTS}", all(map(torch.equal, K.context_match(history, lens, 10, 8),
                                                                   hl.context_match_ref(history, lens, 10, 8))))
    if timed:
        c.time(f"context_match B={B} S={CHECK_SLOTS}", lambda: K.context_match(history, lens, 10, 8),
               lambda: hl.context_match_ref(history, lens, 10, 8))
        c.time(f"accept_greedy B={B} tree=64", lambda: K.accept_greedy(tokens, pred, tree.retrieve),
               lambda: hl.accept_greedy_ref(tokens, pred, tree.retrieve))
        c.time(f"kv_compact {shape} L={L} B={B}", lambda: K.kv_compact(k_all, v_all, lens, path),
               lambda: hl.kv_compact_ref(k_ref, v_ref, lens, path))


def check_proposals(c, K):
    """Output projection + top-k: draft proposals (SmolLM2's vocabulary, a draft vocabulary with a head bias,
    7B's), with the log-sum-exp of all logits too (lse=True), and greedy verification's argmax at every node
    (k=1), fused against logits + argmax."""
    dev, bf16 = "cuda", torch.bfloat16
    for N, D, V in [(1, 576, 49152), (10, 576, 49152), (80, 576, 49152), (1, 576, 16384), (10, 576, 16384),
                    (80, 576, 16384), (10, 4096, 32000)]:
        x = torch.randn(N, D, device=dev, dtype=bf16)
        w = torch.randn(V, D, device=dev, dtype=bf16) / math.sqrt(D)
        bias = torch.randn(V, device=dev, dtype=bf16) if V == 16384 else None
        values, indices = K.lm_topk(x, w, 10, bias)
        ref_v, _ = hl.lm_topk_ref(x, w, 10, bias)
        # ties may order differently: compare the values, and the reference logits of the chosen tokens
        chosen = torch.nn.functional.linear(x, w, bias).float().gather(-1, indices)
        tag = f"N={N} D={D} V={V}{' +bias' if bias is not None else ''} k=10"
        c.close(f"lm_topk {tag}", torch.cat([values, chosen]), torch.cat([ref_v, ref_v]), bf16)
        c.time(f"lm_topk {tag}", lambda: K.lm_topk(x, w, 10, bias), lambda: hl.lm_topk_ref(x, w, 10, bias))
        values_l, indices_l, lse = K.lm_topk(x, w, 10, bias, lse=True)
        c.close(f"lm_topk lse {tag}", lse, hl.lm_topk_ref(x, w, 10, bias, lse=True)[2], bf16)
        c.verdict(f"lm_topk lse=True: same top-k {tag}", torch.equal(values_l, values) and torch.equal(indices_l, indices))
        c.time(f"lm_topk +lse {tag}", lambda: K.lm_topk(x, w, 10, bias, lse=True),
               lambda: hl.lm_topk_ref(x, w, 10, bias, lse=True))
    tree = hl.Tree(hl.default_tree(63), dev)  # each depth's proposals written into the tree by the merge, as drafting does
    w = torch.randn(16384, 576, device=dev, dtype=bf16) / math.sqrt(576)
    vocab = torch.randperm(49152, device=dev)[:16384]
    for lv in tree.levels:
        P, k = lv["node_of"].shape
        x = torch.randn(4, P, 576, device=dev, dtype=bf16)
        tokens = torch.randint(0, 49152, (4, tree.size), device=dev)
        ids = K.lm_topk(x, w, k, None, vocab)[1]  # (the kernel's own ids: this checks where they are written)
        fill = (lv["node_of"] >= 0).flatten()
        want, got = tokens.clone(), tokens.clone()
        want[:, lv["node_of"].flatten()[fill]] = ids.reshape(4, -1)[:, fill]
        K.lm_topk(x, w, k, None, vocab, into=(got, lv["node_of"]))
        c.verdict(f"lm_topk into the tree: depth {lv['node_of'].shape} == the ids scattered by hand", torch.equal(got, want))
    for N in (64, 512):
        x = torch.randn(N, 576, device=dev, dtype=bf16)
        w = torch.randn(49152, 576, device=dev, dtype=bf16) / math.sqrt(576)
        logits = torch.nn.functional.linear(x, w)
        chosen = logits.float().gather(-1, K.lm_topk(x, w, 1)[1])[:, 0]
        c.close(f"lm_topk N={N} D=576 V=49152 k=1 (verification)", chosen, logits.float().amax(-1), bf16)
        c.time(f"verify argmax N={N} V=49152 (fused; ref: logits+argmax)", lambda: K.lm_topk(x, w, 1),
               lambda: torch.nn.functional.linear(x, w).argmax(-1))


def check_graph_replay(c, K, tree):
    """Attention captured once in a CUDA graph, replayed with new lengths, inputs and per-row masks (no host reads
    inside)."""
    Hq, Hkv, D, B, T, dev, bf16 = 9, 3, 64, 4, tree.size, "cuda", torch.bfloat16
    k_cache = torch.randn(B, CHECK_SLOTS, Hkv, D, device=dev, dtype=bf16)
    v_cache = torch.randn_like(k_cache)
    lens = torch.zeros(B, device=dev, dtype=torch.int32)
    q = torch.randn(B, T, Hq, D, device=dev, dtype=bf16)
    masks = tree.mask.expand(B, T, T).clone()
    graph = hl.StepGraph(lambda: (K.tree_attention(q, k_cache, v_cache, lens, tree.mask),
                                  K.decode_attention(q[:, :1], k_cache, v_cache, lens),
                                  K.tree_attention(q, k_cache, v_cache, lens, masks)), [], True)
    lens.copy_(torch.tensor([5, 1999, 0, 777], device=dev))
    q.normal_()
    masks &= torch.rand(B, T, T, device=dev) < 0.5
    masks |= torch.eye(T, dtype=torch.bool, device=dev)
    out, out_dec, out_rows = graph()
    c.close("tree_attention under CUDA graph replay", out, hl.attention_ref(q, k_cache, v_cache, lens, tree.mask), bf16)
    c.close("tree_attention per-row mask under CUDA graph replay", out_rows,
            hl.attention_ref(q, k_cache, v_cache, lens, masks), bf16)
    c.close("decode_attention under CUDA graph replay", out_dec, hl.attention_ref(q[:, :1], k_cache, v_cache, lens), bf16)


def check_invariant(c, K, shape, tree):
    """The batch-invariant kernels: matmul against F.linear, and a row's bits the same whatever the number of
    rows (1, a tree, a batch of trees, a prefill); path_attention against the reference, and a tree node's bits
    equal to decoding over its path laid out in the cache (ragged rows, paths across block and split bounds)."""
    Hq, Hkv, D, dim, hidden, _ = CHECK_SHAPES[shape]
    dev, bf16 = "cuda", torch.bfloat16
    for N, Kd in ((Hq * D + 2 * Hkv * D, dim), (dim, hidden), (2 * hidden, dim), (49152 if shape == "smollm2" else 32000, dim)):
        w = torch.randn(N, Kd, device=dev, dtype=bf16) / math.sqrt(Kd)
        x = torch.randn(600, Kd, device=dev, dtype=bf16)
        y = K.matmul(x, w)
        c.close(f"matmul {shape} [600,{Kd}]x[{N},{Kd}]", y, hl.matmul_ref(x, w), bf16)
        same = all(torch.equal(K.matmul(x[:m], w), y[:m]) for m in (1, 2, 74, 257))
        same &= torch.equal(K.matmul(x[300:301], w)[0], y[300])
        c.verdict(f"matmul rows invariant {shape} N={N} K={Kd} (M = 1, 2, 74, 257, 600)", same)
        c.time(f"matmul {shape} M=1 [{N},{Kd}] (ref: cuBLAS)", lambda: K.matmul(x[:1], w), lambda: hl.matmul_ref(x[:1], w))
        c.time(f"matmul {shape} M=74 [{N},{Kd}] (ref: cuBLAS)", lambda: K.matmul(x[:74], w), lambda: hl.matmul_ref(x[:74], w))
    check_fused_matmuls(c, K, shape)
    check_qkv_rope(c, K, shape)
    B, T, S = 4, tree.size, CHECK_SLOTS
    k_cache = torch.randn(B, S, Hkv, D, device=dev, dtype=bf16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(B, T, Hq, D, device=dev, dtype=bf16)
    lens = torch.tensor([2000, 5, 255, 1000], device=dev, dtype=torch.int32)
    rows = tree.rows(B)
    out = K.path_attention(q, k_cache, v_cache, lens, rows.node_path, rows.node_depth)
    c.close(f"path_attention {shape} B={B} T={T}", out, hl.path_attention_ref(q, k_cache, v_cache, lens, rows.node_path,
                                                                         rows.node_depth), bf16)
    c.verdict(f"path_attention tree node == decoding its path {shape}", node_is_decoding(K, q, k_cache, v_cache, lens, rows,
                                                                                          out, tree))
    with kernel_setting(K, "PATH_MERGE_IN_KERNEL", True):  # 20 calls: the merge races no one
        same = all(torch.equal(K.path_attention(q, k_cache, v_cache, lens, rows.node_path, rows.node_depth), out)
                   for _ in range(20))
    c.verdict(f"path_attention merge in kernel == combine kernel, 20 calls {shape}",
              same and not K._MERGE_COUNTS[q.device].any())
    c.time(f"path_attention {shape} B=1 T=1 (ref: decode_attention)",
           lambda: K.path_attention(q[:1, :1], k_cache[:1], v_cache[:1], lens[:1]),
           lambda: K.decode_attention(q[:1, :1], k_cache[:1], v_cache[:1], lens[:1]))
    c.time(f"path_attention {shape} B=1 T={T} (ref: tree_attention)",
           lambda: K.path_attention(q[:1], k_cache[:1], v_cache[:1], lens[:1], rows.node_path[:1], rows.node_depth[:1]),
           lambda: K.tree_attention(q[:1], k_cache[:1], v_cache[:1], lens[:1], tree.mask))


def check_fused_matmuls(c, K, shape):
    """The matmuls with a decoder layer's neighbours inside (hl.FUSED) against PyTorch's ops, a row's bits alone
    == in the batch, and their time at 1 and 64 rows, as forward_fused calls them (the norm's scale from the
    sums of squares that the previous matmul left), against the unfused kernels that they replace."""
    Hq, Hkv, D, dim, hidden, _ = CHECK_SHAPES[shape]
    dev, bf16 = "cuda", torch.bfloat16
    nw = (torch.rand(dim, device=dev) + 0.5).to(bf16)
    sumsq = torch.rand(600, dim // 16, device=dev) * 16  # (the parts of an output of width dim)
    for label, N, Kd, kw in (("norm -> qkv", Hq * D + 2 * Hkv * D, dim, dict(rms_eps=1e-5)),
                             ("norm -> gate/up -> swiglu", 2 * hidden, dim, dict(rms_eps=1e-5, swiglu=True)),
                             ("down + residual", dim, hidden, dict(residual=True))):
        w = torch.randn(N, Kd, device=dev, dtype=bf16) / math.sqrt(Kd)
        x = torch.randn(600, Kd, device=dev, dtype=bf16)
        if kw.get("residual"):
            kw = dict(residual=torch.randn(600, N, device=dev, dtype=bf16))
        y = K.matmul(x, w, **kw)
        ref = hl.matmul_ref(x, w, **kw)  # (SwiGLU: a gate one bf16 ulp apart, times a large up, is 3% apart)
        c.close(f"matmul fused {label} {shape} (ref: PyTorch)", y, ref, bf16, (3e-2, 2e-2 * ref.abs().max().item()))
        if c.failures and c.failures[-1].startswith(f"matmul fused {label} {shape}"):  # which side is off
            truth = hl.matmul_ref(x.double(), w.double(), **kw)
            worst = (y.float() - ref.float()).abs().argmax()
            print(f"      worst element {divmod(worst.item(), y.shape[-1])}: kernel {y.flatten()[worst].item():.4f} "
                  f"ref {ref.flatten()[worst].item():.4f} float64 {truth.flatten()[worst].item():.4f}; max |kernel - "
                  f"float64| {(y.double() - truth).abs().max().item():.3e}, "
                  f"max |ref - float64| {(ref.double() - truth).abs().max().item():.3e}")
        some = lambda m, kw=kw: dict(kw, residual=kw["residual"][:m]) if "residual" in kw else kw
        c.verdict(f"matmul fused {label} rows invariant {shape}", torch.equal(K.matmul(x[:1], w, **some(1))[0], y[0]))
        wf = hl.fold_norm(w, nw) if "rms_eps" in kw else w
        fused = lambda m, kw=kw, wf=wf, x=x, some=some: K.matmul(x[:m], wf, **(
            dict(kw, sumsq=sumsq[:m]) if "rms_eps" in kw else dict(some(m), sumsq_out=True)))

        def unfused(m, w=w, kw=kw, x=x):  # the kernels that the fused one replaces
            h = K.rms_norm(x[:m], nw, 1e-5) if "rms_eps" in kw else x[:m]
            y = K.matmul(h, w)
            return K.swiglu(y) if kw.get("swiglu") else y + kw["residual"][:m] if "residual" in kw else y
        for m in (1, 64):
            c.time(f"matmul fused {label} {shape} M={m} (ref: unfused, graph)", lambda m=m, fused=fused: fused(m),
                   lambda m=m, unfused=unfused: unfused(m), ref_graph=True)


def check_qkv_rope(c, K, shape):
    """The fused norm -> qkv -> RoPE -> cache write (hl.FUSED) against the ops one by one, and a token's q and
    cache entries the same bits alone as in a batch of ragged rows."""
    Hq, Hkv, D, dim, _, _ = CHECK_SHAPES[shape]
    dev, bf16, B, T, S = "cuda", torch.bfloat16, 4, 64, 512
    x = torch.randn(B, T, dim, device=dev, dtype=bf16)
    w = torch.randn((Hq + 2 * Hkv) * D, dim, device=dev, dtype=bf16) / math.sqrt(dim)
    cfg = hl.Config(dim=Hq * D, n_layers=1, n_heads=Hq, n_kv_heads=Hkv, hidden_dim=8, vocab_size=8, head_dim=D)
    cos, sin = hl.rope_tables(cfg, 1024, dev)
    lens = torch.tensor([0, 5, 300, 400], device=dev, dtype=torch.int32)
    pos = lens[:, None].long() + torch.arange(T, device=dev)
    caches = [torch.randn(2, B, S, Hkv, D, device=dev, dtype=bf16) for _ in range(2)]
    refs = [t.clone() for t in caches]
    q = K.qkv_rope(x, w, 1e-5, cos, sin, pos, caches[0][1], caches[1][1], lens, Hq)
    q_ref = hl.qkv_rope_ref(x, w, 1e-5, cos, sin, pos, refs[0][1], refs[1][1], lens, Hq)
    # RoPE mixes two rounded inputs (q cos - q' sin): a small result carries its inputs' rounding, up to an ulp
    # of the largest, so the absolute tolerance is one bf16 ulp of the largest value (run 22: a max error of
    # 0.0156, one ulp at 2-4, failed the fixed 0.01 on random inputs, where run 21's 0.031 had passed).
    ulp = 2.0 ** (math.floor(math.log2(q_ref.float().abs().max().item())) - 7)
    c.close(f"qkv_rope {shape} B={B} T={T} (ref: the ops one by one)", q, q_ref, bf16, tol=(1.6e-2, max(1e-2, ulp)))
    c.close(f"qkv_rope {shape} keys written", caches[0], refs[0], bf16)
    c.close(f"qkv_rope {shape} values written", caches[1], refs[1], bf16)
    k1, v1 = (torch.zeros(1, S, Hkv, D, device=dev, dtype=bf16) for _ in range(2))
    q1 = K.qkv_rope(x[2:3, 7:8], w, 1e-5, cos, sin, pos[2:3, 7:8], k1, v1, lens[2:3] + 7, Hq)
    same = torch.equal(q1[0, 0], q[2, 7]) and torch.equal(k1[0, 307], caches[0][1, 2, 307])
    c.verdict(f"qkv_rope {shape} token alone == in the batch", same and torch.equal(v1[0, 307], caches[1][1, 2, 307]))
    nw = (torch.rand(dim, device=dev) + 0.5).to(bf16)
    wf = hl.fold_norm(w, nw)
    kc, vc = caches[0][0], caches[1][0]
    sumsq = torch.rand(B, T, dim // 16, device=dev) * 16  # (as the previous layer's matmul leaves them)

    def unfused(t):  # the kernels that qkv_rope replaces
        qkv = K.matmul(K.rms_norm(x[:1, :t], nw, 1e-5), w)
        q, k, v = qkv.split([Hq * D, Hkv * D, Hkv * D], -1)
        return K.rope_cache_write(q.view(1, t, Hq, D), k.view(1, t, Hkv, D), v.view(1, t, Hkv, D), cos, sin, pos[:1, :t],
                                  kc[:1], vc[:1], lens[:1])
    for t in (1, 64):
        c.time(f"qkv_rope {shape} B=1 T={t} (ref: unfused, graph)", lambda t=t: K.qkv_rope(
            x[:1, :t], wf, 1e-5, cos, sin, pos[:1, :t], kc[:1], vc[:1], lens[:1], Hq, sumsq[:1, :t]),
            lambda t=t: unfused(t), ref_graph=True)


def node_is_decoding(K, q, k_cache, v_cache, lens, rows, out, tree):
    """Whether path_attention's output `out` for some tree nodes (the root, the deepest, a few) equals, bit for bit,
    one-token decoding over a cache of another size that holds the node's path after the row's cached slots."""
    ok, (B, T), S = True, q.shape[:2], k_cache.shape[1]
    for b in range(B):
        for t in (0, 1, 5, T - 1, int(tree.node_depth.argmax())):
            n = int(lens[b])
            slots = torch.cat([torch.arange(n, device=q.device), n + rows.node_path[b, t, :int(rows.node_depth[b, t]) + 1]])
            k1, v1 = (torch.randn(1, S + 300, *k_cache.shape[2:], device=q.device, dtype=k_cache.dtype) for _ in range(2))
            k1[0, :len(slots)], v1[0, :len(slots)] = k_cache[b, slots], v_cache[b, slots]
            last = torch.tensor([len(slots) - 1], device=q.device, dtype=torch.int32)
            one = K.path_attention(q[b:b + 1, t:t + 1], k1, v1, last)
            ok &= torch.equal(one[0, 0], out[b, t])
    return ok


def path_tiles_invariant(K, cfg, tree):
    """node_is_decoding with the current path_attention tiles, on the model's head shape, ragged rows."""
    B, T, S = 4, tree.size, CHECK_SLOTS
    k_cache = torch.randn(B, S, cfg.n_kv_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(B, T, cfg.n_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    lens = torch.tensor([2000, 5, 255, 1000], device="cuda", dtype=torch.int32)
    rows = tree.rows(B)
    out = K.path_attention(q, k_cache, v_cache, lens, rows.node_path, rows.node_depth)
    close = (out.float() - hl.path_attention_ref(q, k_cache, v_cache, lens, rows.node_path, rows.node_depth).float()).abs().max()
    return node_is_decoding(K, q, k_cache, v_cache, lens, rows, out, tree) and close.item() < 0.02


def check(args):
    import kernels as K

    torch.manual_seed(0)
    c, tree = KernelCheck(), hl.Tree(hl.default_tree(), "cuda")  # the runtime's 64-node tree
    print("== correctness")
    for shape in CHECK_SHAPES:
        for B in (1, 8) if shape != "d80" else (4,):
            check_elementwise(c, K, shape, B, timed=B == 8)
            for dtype in (torch.bfloat16, torch.float32) if (shape, B) == ("smollm2", 8) else (torch.bfloat16,):
                check_attention(c, K, shape, B, dtype, tree)
            check_bookkeeping(c, K, shape, B, tree, timed=B == 8)
    check_proposals(c, K)
    check_graph_replay(c, K, tree)
    for shape in ("smollm2", "7b"):
        check_invariant(c, K, shape, tree)
    return c.report()


# ----------------------------------------------------------------------------------------------------------
# Multi-task benchmark: what a user sees on real work of several kinds (tasks/heldout.jsonl), per call.


def read_tasks(path, tasks=None, limit=0):
    """Rows {"task", "prompt", ...} of a tasks file (tasks/heldout.jsonl), optionally only some families, at
    most `limit` per family."""
    rows, seen = [], {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if (tasks is None or row["task"] in tasks) and (not limit or seen.get(row["task"], 0) < limit):
                    seen[row["task"]] = seen.get(row["task"], 0) + 1
                    rows.append(row)
    if not rows:
        raise hl.HydraLiteError(f"no prompts in {path}" + (f" for tasks {tasks}" if tasks else ""))
    return rows


def task_methods(args, model, tok, heads_sets):
    """(name, Generator factory) for every method compared: AR; each heads with each tree kind (--trees: static,
    dynamic) and each context-draft setting; context drafts alone. --tree-nodes: one head-tree size at every
    batch size instead of the default table."""
    sizes = {} if not args.tree_nodes else dict(tree_nodes_by_batch=((1 << 30, args.tree_nodes),))
    methods = [("ar", lambda: hl.Generator(model, tok))]
    for name, heads in heads_sets.items():
        for kind in args.trees:
            for k in args.context:
                chain = "" if k == 0 else " + context" + (f" {k}" if k is not None else "")
                label = name + (" dynamic" if kind == "dynamic" else "") + chain
                methods.append((label, lambda heads=heads, k=k, dyn=kind == "dynamic": hl.Generator(
                    model, tok, heads, context_drafts=k, dynamic=dyn, **sizes)))
    if args.context_only:
        methods.append((f"context {args.context_only} alone",
                        lambda: hl.Generator(model, tok, context_drafts=args.context_only)))
    return methods


def vocab_coverage(heads_sets, records, families):
    """Per heads and family: the share of AR's answer tokens in the heads' draft vocabulary (tokens outside it are
    never drafted by the heads)."""
    out = {}
    for name, heads in heads_sets.items():
        if heads.vocab is None:
            continue
        inside = torch.zeros(heads.hc.vocab_size, dtype=torch.bool)
        inside[heads.vocab.cpu()] = True
        out[name] = {}
        for family in families + ["all"]:
            toks = [t for r in records if family in ("all", r["task"]) for t in r["out"]]
            out[name][family] = inside[toks].float().mean().item() if toks else float("nan")
    return out


def time_calls(gen, rows, ids, batch, max_new, mode, repeat):
    """Each group of `batch` prompts as one generate() call, timed by the wall clock around the call (prefill,
    setup and decoding: what a caller waits for); with repeat, the same call again right after (warm). Returns
    per-row records, attempt "first" or "repeat"."""
    records = []
    for i in range(0, len(rows), batch):
        group = list(range(i, min(i + batch, len(rows))))
        for attempt in ("first", "repeat")[:1 + repeat]:
            hl.sync(gen.device)
            t0 = time.perf_counter()
            outs, stats = gen.generate([ids[j] for j in group], max_new, mode=mode)
            wall = time.perf_counter() - t0
            for b, j in enumerate(group):
                records.append(dict(task=rows[j]["task"], id=rows[j].get("id", str(j)), call=i // batch, attempt=attempt,
                                    new_tokens=len(outs[b]), accepted=stats.row_accepted[b], steps=stats.row_active[b],
                                    call_s=wall, call_tokens=stats.new_tokens, prefill_s=stats.prefill_s, out=outs[b],
                                    cut_short=b in stats.cut_short, call_steps=stats.steps, batches=stats.batches))
    return records


def parting(out, ref):
    """The first token where out differs from ref (the shorter's length if one is the other's start), None if
    they are equal."""
    if out == ref:
        return None
    return next((i for i, (x, y) in enumerate(zip(out, ref)) if x != y), min(len(out), len(ref)))


def mark_partings(records, ar_records, label):
    """Each record's parts_at: the first token where its output differs from AR's for the same prompt (None:
    identical), and a log line for each that differs: which prompt, in which call, where (issue 15)."""
    ar = {r["id"]: r["out"] for r in ar_records}
    for r in records:
        a = ar[r["id"]]
        r["parts_at"] = parting(r["out"], a)
        if r["parts_at"] is not None:
            log(f"{label}: {r['id']} (call {r['call']}, {r['attempt']}) parts from AR at token {r['parts_at']} of "
                f"{len(a)}" + (" (stopped short: no room left)" if r.get("cut_short") else ""))


def summarize(records, ar_records=None):
    """Mean acceptance, tokens/s by the wall clock per call (prefill included), the share of that clock spent in
    prefill, and exact match with AR."""
    calls = {r["call"]: (r["call_s"], r["call_tokens"], r["prefill_s"]) for r in records}  # (one attempt's records)
    secs, toks = sum(c[0] for c in calls.values()), sum(c[1] for c in calls.values())
    out = dict(prompts=len(records), new_tokens=sum(r["new_tokens"] for r in records), wall_s=secs,
               tokens_per_s=toks / secs if secs else 0.0,
               prefill_share=sum(c[2] for c in calls.values()) / secs if secs else 0.0,
               mean_accept=sum(r["accepted"] for r in records) / max(sum(r["steps"] for r in records), 1))
    if ar_records is not None:
        ar = {r["id"]: r["out"] for r in ar_records}
        out["exact_match"] = sum(r["out"] == ar[r["id"]] for r in records) / len(records)
    return out


def tasks_bench(args):
    dev, dtype = args.device, getattr(torch, args.dtype)
    os.makedirs(args.out, exist_ok=True)
    model = hl.load_model(args.checkpoint, dev, dtype)
    tok = hl.Tokenizer(args.checkpoint, model.cfg)
    rows = read_tasks(args.data, args.tasks, args.limit)
    if args.sharegpt:  # the chat prompts the shipped heads were fitted near: the regression check
        turns = th.read_prompts(args.sharegpt, th.parse_range(args.sharegpt_rows), first_turn=True)
        rows += [dict(task="sharegpt", id=f"sharegpt-{i}", prompt=t) for i, t in enumerate(turns)]
    ids = [tok.encode_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]
    families = sorted({r["task"] for r in rows}, key=lambda t: (t == "sharegpt", t))
    heads_sets = {name: hl.load_heads(path, model) for name, path in (h.split("=", 1) for h in args.heads)}
    coverage = {}
    log(f"{len(rows)} prompts ({', '.join(families)}), {args.max_new_tokens} new tokens, {dev} {args.dtype}")
    import kernels as K

    results, records = [], []
    kernels_before = (hl.EXACT, hl.FUSED, hl.FUSED_HEADS, K.PATH_MERGE_IN_KERNEL, hl.PREFILL_SKIP)
    for batch, kernels in itertools.product(args.batch, args.kernels):
        # (every method, AR included, with one set of kernels; read at capture)
        hl.EXACT, K.PATH_MERGE_IN_KERNEL = kernels != "fast", False
        hl.FUSED = kernels in ("exact", "fused-heads", "no-prefill-skip")
        hl.FUSED_HEADS, hl.PREFILL_SKIP = kernels == "fused-heads", kernels != "no-prefill-skip"
        order = sorted(range(len(rows)), key=lambda i: (rows[i]["task"], i)) if batch == 1 else \
            random.Random(0).sample(range(len(rows)), len(rows))  # larger batches mix the families, as traffic does
        b_rows, b_ids = [rows[i] for i in order], [ids[i] for i in order]
        ar_recs = None
        for name, make in task_methods(args, model, tok, heads_sets):
            gen, mode = make(), "ar" if name == "ar" else "spec"
            name += "" if kernels == "exact" else f" [{kernels} kernels]"
            t0 = time.perf_counter()
            gen.generate(b_ids[:1], 8, mode=mode)  # load and compile once
            sizes = sorted({min(batch, len(b_rows) - i) for i in range(0, len(b_rows), batch)})  # (a last, smaller call)
            warm = gen.warmup(sizes, modes=[mode], progress=log) if args.warmup else 0.0
            log(f"b{batch} {name}: first call and warm-up {time.perf_counter() - t0:.1f} s")
            recs = time_calls(gen, b_rows, b_ids, batch, args.max_new_tokens, mode, args.repeat)
            if mode == "spec":
                mark_partings(recs, ar_recs, f"b{batch} {name}")
            records += [dict(r, method=name, batch=batch) for r in recs]
            for attempt in ("first", "repeat")[:1 + args.repeat]:
                att = [r for r in recs if r["attempt"] == attempt]
                if mode == "ar" and attempt == "first":
                    ar_recs = att
                    coverage = coverage or vocab_coverage(heads_sets, att, families)
                for family in families + ["all"]:
                    fam = [r for r in att if family in ("all", r["task"])]
                    s = summarize(fam, [r for r in ar_recs if family in ("all", r["task"])])
                    if family != "all" and batch > 1:  # rows of a call share its time: acceptance only
                        s["tokens_per_s"] = float("nan")
                    results.append(dict(method=name, batch=batch, task=family, attempt=attempt, kernels=kernels,
                                        warmup_s=warm, **s))
                log(f"b{batch} {name} ({attempt} calls): {results[-1]['tokens_per_s']:.0f} tokens/s, "
                    f"accept {results[-1]['mean_accept']:.2f}, prefill {results[-1]['prefill_share']:.1%} of the wall clock")
    hl.EXACT, hl.FUSED, hl.FUSED_HEADS, K.PATH_MERGE_IN_KERNEL, hl.PREFILL_SKIP = kernels_before
    for r in results:  # against AR with the same kernels
        ar = next(a for a in results if a["method"].split(" ")[0] == "ar" and (a["batch"], a["task"], a["attempt"], a["kernels"])
                  == (r["batch"], r["task"], r["attempt"], r["kernels"]))
        r["speedup"] = r["tokens_per_s"] / ar["tokens_per_s"] if ar["tokens_per_s"] else float("nan")  # (NaN stays NaN)
    write_tasks_report(args, results, records, families, tok, coverage)


def write_tasks_report(args, results, records, families, tok, coverage):
    meta = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), torch=torch.__version__, dtype=args.dtype,
                data=args.data, max_new_tokens=args.max_new_tokens, families=families, vocab_coverage=coverage)
    parted = {(r["batch"], r["id"]) for r in records if r.get("parts_at") is not None}  # (with AR's answer beside)
    with open(os.path.join(args.out, "tasks_outputs.json"), "w") as f:  # a few answers to read, per method
        json.dump([dict(method=r["method"], batch=r["batch"], id=r["id"], parts_at=r.get("parts_at"),
                        text=tok.decode(r["out"])) for r in records
                   if r["attempt"] == "first" and (r["id"].endswith(("-01", "-02")) or (r["batch"], r["id"]) in parted)],
                  f, indent=1)
    data = dict(meta=meta, results=results, records=[{k: v for k, v in r.items() if k != "out"} for r in records])
    write_report(args.out, "tasks", meta, data, tasks_table(results, families),
                 lambda path: plot_tasks(results, families, path))


def tasks_table(results, families):
    """Per batch and call (first/repeat): a row per method, a column per family: speedup (batch 1) and mean
    acceptance; then overall speedup, tokens/s and exact match with AR."""
    lines = []
    for batch, attempt in sorted({(r["batch"], r["attempt"]) for r in results}):
        rs = [r for r in results if (r["batch"], r["attempt"]) == (batch, attempt)]
        lines += [f"\nbatch {batch}, {attempt} call: speedup over AR / mean acceptance per task" +
                  (" (batch > 1: acceptance only per task)" if batch > 1 else ""),
                  "| method | " + " | ".join(families) + " | all: speedup | all: tokens/s | all: accept | exact match |",
                  "| --- |" + " --- |" * (len(families) + 4)]
        for method in dict.fromkeys(r["method"] for r in rs):
            cell = {r["task"]: r for r in rs if r["method"] == method}
            per = [f"{cell[t]['speedup']:.2f}x / {cell[t]['mean_accept']:.2f}" if batch == 1
                   else f"{cell[t]['mean_accept']:.2f}" for t in families]
            a = cell["all"]
            overall = f"{a['speedup']:.2f}x | {a['tokens_per_s']:.0f} | {a['mean_accept']:.2f} | {a.get('exact_match', 1):.2f}"
            lines.append(f"| {method} | " + " | ".join(per) + f" | {overall} |")
    return "\n".join(lines)


def plot_tasks(results, families, path):
    """Speedup over AR per method: per task at batch 1, overall at larger batches (first calls)."""
    plt = pyplot()
    if plt is None:
        return
    batches = sorted({r["batch"] for r in results})
    fig, axes = plt.subplots(1, len(batches), figsize=(3 + 1.2 * len(families) + 3 * (len(batches) - 1), 4), squeeze=False,
                             gridspec_kw=dict(width_ratios=[len(families) + 1 if b == 1 else 2 for b in batches]))
    for ax, batch in zip(axes[0], batches):
        rs = [r for r in results if r["batch"] == batch and r["attempt"] == "first" and r["method"] != "ar"]
        methods, columns = list(dict.fromkeys(r["method"] for r in rs)), (families if batch == 1 else []) + ["all"]
        width = 0.8 / max(len(methods), 1)
        for m, method in enumerate(methods):
            vals = [next(r["speedup"] for r in rs if r["method"] == method and r["task"] == t) for t in columns]
            ax.bar([i + m * width for i in range(len(vals))], vals, width, label=method)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))], columns, rotation=20)
        ax.set_title(f"batch {batch}", fontsize=9)
    axes[0][0].set_ylabel("speedup over AR, greedy\n(wall clock per call)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------------
# Latency per call: what a caller that calls many times a second sees


def latency(args):
    """Per prompt length and batch size: time to first token (prefill, first token, setup), the latency of each
    later step (p50/p99), and the call's overhead (wall clock minus prefill minus decoding), for a first call of
    that shape (a new cache size: without warm-up it captures) and the same call repeated."""
    model = hl.load_model(args.checkpoint, args.device, getattr(torch, args.dtype))
    tok = hl.Tokenizer(args.checkpoint, model.cfg)
    heads = hl.load_heads(args.heads, model) if args.heads else None
    gen, rows, rng = hl.Generator(model, tok, heads), [], random.Random(0)
    if args.warmup:
        log(f"warm-up {gen.warmup(args.batch, progress=log):.1f} s")
    for batch in args.batch:
        for length in args.lengths:
            prompts = [[rng.randrange(model.cfg.vocab_size) for _ in range(length)] for _ in range(batch)]
            for attempt in ("first", "repeat"):
                hl.sync(gen.device)
                t0 = time.perf_counter()
                _, s = gen.generate(prompts, args.max_new_tokens, stop_at_eos=False)
                wall = time.perf_counter() - t0
                gaps = [b - a for a, b in zip(s.step_times, s.step_times[1:])]
                per_token = sorted(g / max(s.accepted / max(s.row_steps, 1), 1) for g in gaps) or [float("nan")]
                rows.append(dict(batch=batch, prompt=length, attempt=attempt, wall_ms=1000 * wall,
                                 ttft_ms=1000 * (wall - s.decode_s),  # from the call to its first token: setup, prefill
                                 overhead_ms=1000 * (wall - s.prefill_s - s.decode_s), mean_accept=s.mean_accept,
                                 token_p50_ms=1000 * per_token[len(per_token) // 2],
                                 token_p99_ms=1000 * per_token[min(len(per_token) - 1, int(0.99 * len(per_token)))]))
                log(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    write_latency_report(args, rows, gen.describe(1))


def write_latency_report(args, rows, method):
    meta = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", date=time.strftime("%Y-%m-%d"),
                command=" ".join(sys.argv), method=method, max_new_tokens=args.max_new_tokens, warmup=args.warmup)
    table = ["| batch | prompt tokens | call | time to first token ms | token p50 ms | token p99 ms | overhead ms | accept |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['batch']} | {r['prompt']} | {r['attempt']} | {r['ttft_ms']:.1f} | {r['token_p50_ms']:.2f} | "
              f"{r['token_p99_ms']:.2f} | {r['overhead_ms']:.1f} | {r['mean_accept']:.2f} |" for r in rows]
    os.makedirs(args.out, exist_ok=True)
    write_report(args.out, "latency", meta, dict(meta=meta, rows=rows), "\n".join(table), lambda path: plot_latency(rows, path))


def plot_latency(rows, path):
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r["batch"] for r in rows}):
        for attempt, style in (("first", "--"), ("repeat", "-")):
            rs = [r for r in rows if (r["batch"], r["attempt"]) == (batch, attempt)]
            ax.plot([r["prompt"] for r in rs], [r["ttft_ms"] for r in rs], style, marker="o",
                    label=f"batch {batch}, {attempt} call")
    ax.set_xscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token, ms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def context_length(text):
    """A --context value: a chain length, or 'default' (None: the Generator's, by batch)."""
    return None if text == "default" else int(text)


# The least each numeric option may be (those a subcommand has).
ARG_MINIMUMS = dict(batch=1, max_new_tokens=1, limit=0, hf_limit=0, context=0, context_only=0, tree_nodes=0, tree_chain=0,
                    lengths=1)


def check_args(args):
    """Bad values are one line before anything loads."""
    for name, lowest in ARG_MINIMUMS.items():
        for value in getattr(args, name, None) if isinstance(getattr(args, name, None), list) else [getattr(args, name, None)]:
            if value is not None:
                hl.check_int(f"--{name.replace('_', '-')}", value, lowest)
    if hasattr(args, "temperature"):
        hl.check_temperature("--temperature", args.temperature)
    if hasattr(args, "device"):
        hl.check_device(args.device)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        return {"e2e": e2e, "steps": steps, "check": check, "tasks": tasks_bench, "latency": latency}[args.cmd](args)
    except hl.HydraLiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file named on the command line that cannot be read or written
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2


def build_parser():
    ap = hl.ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    subs = [add_e2e_args(sub), add_latency_args(sub), add_tasks_args(sub), add_steps_args(sub)]
    sub.add_parser("check", help="on a GPU: every kernel against its reference, then their times")
    for p in subs:
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--out", default="runs/bench")
    return ap


def add_e2e_args(sub):
    """benchmark.py e2e: AR vs heads (and transformers) on a prompts file."""
    e = sub.add_parser("e2e", formatter_class=hl.HelpWithDefaults)
    e.add_argument("--checkpoint", default=hl.DEFAULT_CHECKPOINT)
    e.add_argument("--heads", nargs="*", default=[], help="NAME=DIR[:TREE_NODES] (TREE_NODES refits the heads' tree)")
    e.add_argument("--prompts", required=True)
    e.add_argument("--rows", default=None, help="row range of the prompts file, e.g. 80-99 (held out from training)")
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--tree", default=None, help="tree choices as JSON")
    e.add_argument("--context", type=int, default=None, help="context-draft chain length (default: the Generator's)")
    e.add_argument("--tree-nodes", type=int, default=0, help="head-tree nodes at every batch size (default: by batch)")
    e.add_argument("--profile", action="store_true", help="also write a per-kernel profile of one speculative step")
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--no-hf", dest="hf", action="store_false")
    e.add_argument("--hf-limit", type=int, default=0, help="run transformers generate() on the first N prompts only")
    e.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (default 0: greedy)")
    e.add_argument("--acceptance", nargs="+", choices=list(hl.ACCEPTANCE_RULES), default=["exact"],
                   help="sampled speculative decoding's acceptance rule(s), each as its own row (exact: the base "
                        "model's own distribution; typical: Medusa/Hydra's typical acceptance)")
    return e


def add_latency_args(sub):
    """benchmark.py latency: time to first token and per-token latency."""
    la = sub.add_parser("latency", help="time to first token and per-token latency by prompt length and batch",
                        formatter_class=hl.HelpWithDefaults)
    la.add_argument("--checkpoint", default=hl.DEFAULT_CHECKPOINT)
    la.add_argument("--heads", default=None, help="heads dir (default: none, plain decoding)")
    la.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1024, 4096], help="prompt lengths")
    la.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    la.add_argument("--max-new-tokens", type=int, default=64)
    la.add_argument("--warmup", action="store_true", help="Generator.warmup() first (else a first call may capture)")
    la.add_argument("--dtype", default="bfloat16")
    return la


def add_tasks_args(sub):
    """benchmark.py tasks: the multi-task benchmark."""
    t = sub.add_parser("tasks", help="AR vs speculative decoding on the multi-task held-out prompts (tasks/)",
                       formatter_class=hl.HelpWithDefaults)
    t.add_argument("--checkpoint", default=hl.DEFAULT_CHECKPOINT)
    t.add_argument("--data", default=os.path.join(hl.HERE, "tasks", "heldout.jsonl"))
    t.add_argument("--tasks", nargs="*", default=None, help="only these families")
    t.add_argument("--limit", type=int, default=0, help="at most N prompts per family")
    t.add_argument("--sharegpt", default=None, help="also ShareGPT prompts (a JSONL of turns), as family 'sharegpt'")
    t.add_argument("--sharegpt-rows", default="80-99", help="their rows (held out from the shipped heads' training)")
    t.add_argument("--heads", nargs="*", default=[], help="NAME=DIR: heads to compare, each with every --context")
    t.add_argument("--context", type=context_length, nargs="+", default=[0, None],
                   help="context-draft chain lengths to run with each heads (0: heads alone; 'default': the "
                        "Generator's, by batch)")
    t.add_argument("--context-only", type=int, default=0, help="also context drafts of this length without heads")
    t.add_argument("--trees", nargs="+", choices=["static", "dynamic"], default=["static"],
                   help="tree kinds to run with each heads: the heads' static tree, a dynamic tree (per step, per row)")
    t.add_argument("--tree-nodes", type=int, default=0, help="head-tree nodes at every batch size (default: by batch)")
    t.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    t.add_argument("--max-new-tokens", type=int, default=256)
    t.add_argument("--repeat", action="store_true", help="time every call twice: first, and repeated right after")
    t.add_argument("--warmup", action="store_true", help="Generator.warmup() before timing (no capture in a call)")
    t.add_argument("--dtype", default="bfloat16")
    t.add_argument("--kernels", nargs="+", choices=["exact", "unfused", "fast", "fused-heads",
                                                         "no-prefill-skip"], default=["exact"],
                   help="kernel sets to run every method with (exact: the batch-invariant ones with fused layers, the "
                        "default; unfused: the same with the layers op by op, HYDRA_LITE_FUSED=0; fast: cuBLAS and the "
                        "tiled attention, HYDRA_LITE_EXACT=0; fused-heads: exact with each draft-head block one matmul, "
                        "HYDRA_LITE_FUSED_HEADS=1; no-prefill-skip: exact, a batched prefill's padding computed "
                        "too, HYDRA_LITE_PREFILL_SKIP=0), each against AR with the same")
    return t


def add_steps_args(sub):
    """benchmark.py steps: step times of a random-weight model against the roofline."""
    s = sub.add_parser("steps", formatter_class=hl.HelpWithDefaults)
    s.add_argument("--shape", choices=list(SHAPES), default="7b")
    s.add_argument("--profile", action="store_true", help="also write GPU time by kernel of each step (default and fast kernels)")
    s.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    s.add_argument("--context", type=int, default=512)
    s.add_argument("--tree-nodes", type=int, default=0, help="verify the default tree cut to this many head nodes "
                   "(0: all 63), e.g. 16 for batch 8's default")
    s.add_argument("--tree-chain", type=int, default=0, help="and a context chain of this many tokens beside them "
                   "(e.g. 10 for batch 8's default)")
    s.add_argument("--path-tiles", type=parse_tiles, nargs="+", default=None,
                   help="path_attention tile rows x split length to time, e.g. 64x128 16x256 (default: the kernels' own)")
    s.add_argument("--unfused", action="store_true", help="also time the decoder layers op by op (HYDRA_LITE_FUSED=0) "
                   "and path_attention's merge in the kernel (kernels.PATH_MERGE_IN_KERNEL)")
    s.add_argument("--pdl", action="store_true", help="also time the default kernels without programmatic dependent "
                   "launch (kernels.PDL, HYDRA_LITE_PDL=0) and with it for calls of every size (kernels.PDL_MAX_TOKENS)")
    s.add_argument("--matmul-wide-n", type=int, nargs="*", default=[], help="also time the matmul taking 64 columns "
                   "a program from outputs this wide (kernels.MATMUL_WIDE_N; below: 32), e.g. 4097")
    s.add_argument("--path-programs", type=int, nargs="*", default=[], help="also time path_attention with about this "
                   "many programs for the splits below the cache length (kernels.PATH_PROGRAMS), e.g. 264 528")
    s.add_argument("--path-warps", type=int, nargs="*", default=[], help="also time path_attention with this many "
                   "warps a program (kernels.PATH_WARPS), e.g. 1 2")
    s.add_argument("--matmul-stages", type=int, nargs="*", default=[], help="also time the matmuls with this many "
                   "pipeline stages (kernels.MATMUL_STAGES), e.g. 4 5")
    s.add_argument("--path-stages", type=int, nargs="*", default=[], help="also time path_attention with this many "
                   "pipeline stages (kernels.PATH_STAGES), e.g. 3 4")
    s.add_argument("--merge-decode", action="store_true", help="also time path_attention merging its splits itself "
                   "in decode steps (kernels.PATH_MERGE_DECODE)")
    s.add_argument("--matmul-k-tile", type=int, nargs="*", default=[], help="also time the matmuls reducing K in steps "
                   "of this many (kernels.MATMUL_K_TILE), e.g. 256 512")
    s.add_argument("--edge-tokens", type=int, nargs="+", default=[0], help="path_attention's tokens per program at the "
                   "splits that reach past the cache (kernels.PATH_EDGE_TOKENS; 0: by batch), each timed")
    return s


if __name__ == "__main__":
    sys.exit(main())
