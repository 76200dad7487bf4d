"""Benchmarks for hydra-lite (run on a GPU; results go to BENCHMARKS.md by hand, with device, date, command).

    python benchmark.py e2e --heads medusa=heads/m hydra=heads/h hydra++=heads/hpp --prompts q.jsonl --rows 80-99
        AR vs speculative decoding with each set of heads (plus Hugging Face generate() as the baseline a user
        would otherwise pick; --hf-limit N: on the first N prompts only), batch 1 and larger, greedy: tokens/s, mean acceptance length, speedup over AR,
        output match with AR. Writes JSON, a markdown table and a plot.
    python benchmark.py steps --shape 7b
        Step times of one model forward under CUDA graphs: an autoregressive step (1 token per row) vs a
        64-token tree verification, batch 1 and 8, against the HBM roofline (weights + KV cache read once).
"""
import argparse
import json
import os
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
        sd["lm_head.weight"] = model.lm_head
    for i, L in enumerate(model.layers):
        p = f"model.layers.{i}."
        wq, wk, wv = L.wqkv.split([q, kv, kv])
        gate, up = L.w13.chunk(2)
        sd.update({p + "input_layernorm.weight": L.attn_norm, p + "post_attention_layernorm.weight": L.ffn_norm,
                   p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk, p + "self_attn.v_proj.weight": wv,
                   p + "self_attn.o_proj.weight": L.wo, p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                   p + "mlp.down_proj.weight": L.w2})
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
        hl._sync(hf.device)
        t0 = time.perf_counter()
        y = hf.generate(x, max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
        hl._sync(hf.device)
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


def profile_step(gen, prompt, path):
    """GPU time of one speculative step by kernel (the step's graph is bypassed so kernels show up); CPU time
    by op on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    cuda = gen.device.type == "cuda"

    gen.generate([prompt], 16)
    step = gen.step.fn
    with torch.inference_mode():
        logits, h = gen._prefill([prompt])
        root = logits.argmax(-1)
        with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                out, h = step(root, h, torch.ones_like(root, dtype=torch.int32))
                root = out[:, -1]
            hl._sync(gen.device)
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
            gen = hl.Generator(model, tok, hl.load_heads(path, model), tree_for(path, args, int(size or 0)), acceptance=rule)
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
            if args.profile and batch == 1:
                profile_step(gen, prompts[0], os.path.join(args.out, f"profile_{name}.txt"))
            log(f"b{batch} {name}: {r['tokens_per_s']:.1f} tokens/s, accept {r['mean_accept']:.2f}, "
                f"x{r['tokens_per_s'] / ar['tokens_per_s']:.2f}, match {exact:.2f}/{tm:.3f}")
    meta = dict(device=torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu", date=time.strftime("%Y-%m-%d"),
                command=" ".join(sys.argv), torch=torch.__version__, dtype=args.dtype, prompts=len(prompts),
                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                acceptance=rules if args.temperature > 0 else None)
    with open(os.path.join(args.out, "e2e.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    with open(os.path.join(args.out, "e2e_outputs.json"), "w") as f:
        json.dump({k: [tok.decode(o) for o in v[:5]] for k, v in outputs.items()}, f, indent=1)
    table = ["| mode | batch | tokens/s | speedup vs AR | mean accept | ms/step | exact match with AR | token match |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['mode']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {r['mean_accept']:.2f} | "
              f"{r.get('ms_per_step', float('nan')):.3f} | {r['exact_match']:.2f} | {r['token_match']:.3f} |" for r in results]
    with open(os.path.join(args.out, "e2e.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    plot(results, os.path.join(args.out, "e2e.png"))
    print(json.dumps(meta))
    print("\n".join(table))


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
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


def hbm_bandwidth():
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda")
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


def steps(args):
    cfg = hl.Config(**SHAPES[args.shape], max_seq_len=4096)
    dtype = torch.bfloat16
    torch.set_default_dtype(dtype)  # build the weights in bf16 directly (a 7B fp32 copy would waste 27 GB)
    with torch.device("cuda"):
        model = hl.Llama(cfg)
    torch.set_default_dtype(torch.float32)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    bw = hbm_bandwidth()
    tree = hl.Tree(hl.default_tree(), "cuda")
    rows = []
    log(f"{args.shape}: {n_params / 1e9:.2f}B parameters, HBM copy bandwidth {bw / 1e12:.2f} TB/s")
    with torch.inference_mode():
        for B in args.batch:
            cache = model.new_cache(B, 4096)
            cache.k.normal_(), cache.v.normal_()
            cache.lens.fill_(args.context)
            for name, T in (("AR step", 1), ("tree verify", tree.size)):
                tokens = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
                pos = cache.lens[:, None].long() + (tree.node_depth[None] if T > 1 else 0)
                mask = tree.mask if T > 1 else None
                fn = lambda: model.logits(model(tokens, cache, pos, mask))
                ms = time_graph(fn)
                kv_bytes = 2 * cfg.n_layers * B * (args.context + T) * cfg.n_kv_heads * cfg.head_dim * 2
                floor_ms = (n_params * 2 + kv_bytes) / bw * 1000
                flop_ms = 2 * n_params * B * T / 790e12 * 1000
                rows.append(dict(shape=args.shape, batch=B, step=name, tokens=B * T, ms=ms, roofline_ms=max(floor_ms, flop_ms),
                                 hbm_floor_ms=floor_ms, flop_floor_ms=flop_ms, fraction=max(floor_ms, flop_ms) / ms))
                log(f"b{B} {name} ({B * T} tokens): {ms:.3f} ms, HBM floor {floor_ms:.3f} ms, bf16 FLOP floor {flop_ms:.3f} ms")
    table = ["| shape | batch | step | tokens | ms | roofline ms | of roofline |", "| --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['shape']} | {r['batch']} | {r['step']} | {r['tokens']} | {r['ms']:.3f} | {r['roofline_ms']:.3f} | {r['fraction'] * 100:.0f}% |" for r in rows]
    meta = dict(device=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv),
                hbm_tb_s=bw / 1e12, params=n_params, context=args.context)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"steps_{args.shape}.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(json.dumps(meta))
    print("\n".join(table))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("e2e")
    e.add_argument("--checkpoint", default=hl.DEFAULT_CHECKPOINT)
    e.add_argument("--heads", nargs="*", default=[], help="NAME=DIR[:TREE_NODES] (TREE_NODES refits the heads' tree)")
    e.add_argument("--prompts", required=True)
    e.add_argument("--rows", default=None, help="row range of the prompts file, e.g. 80-99 (held out from training)")
    e.add_argument("--limit", type=int, default=0)
    e.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--tree", default=None, help="tree choices as JSON")
    e.add_argument("--profile", action="store_true", help="also write a per-kernel profile of one speculative step")
    e.add_argument("--dtype", default="bfloat16")
    e.add_argument("--no-hf", dest="hf", action="store_false")
    e.add_argument("--hf-limit", type=int, default=0, help="run transformers generate() on the first N prompts only")
    e.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (default 0: greedy)")
    e.add_argument("--acceptance", nargs="+", choices=hl.ACCEPTANCE_RULES, default=["exact"],
                   help="sampled speculative decoding's acceptance rule(s), each as its own row (exact: the base "
                        "model's own distribution; typical: Medusa/Hydra's typical acceptance)")
    s = sub.add_parser("steps")
    s.add_argument("--shape", choices=list(SHAPES), default="7b")
    s.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    s.add_argument("--context", type=int, default=512)
    for p in (e, s):
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--out", default="runs/bench")
    args = ap.parse_args(argv)
    return e2e(args) if args.cmd == "e2e" else steps(args)


if __name__ == "__main__":
    sys.exit(main())
