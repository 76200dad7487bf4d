"""Tests for convert.py (CPU). transformers, gguf and sentencepiece serve as independent oracles.

Logit parity checks go through hydra_lite.load_model(...).forward_logits and are skipped while the runtime
lacks it. The SmolLM2 tests need the GGUF: $HYDRA_LITE_GGUF or .models/SmolLM2-135M-Instruct.Q4_1.gguf.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import convert  # noqa: E402
from convert import ConvertError  # noqa: E402

SMOL = os.environ.get("HYDRA_LITE_GGUF") or os.path.join(ROOT, ".models", "SmolLM2-135M-Instruct.Q4_1.gguf")
needs_smol = pytest.mark.skipif(not os.path.isfile(SMOL), reason="SmolLM2 GGUF not found (set HYDRA_LITE_GGUF)")


def runtime():
    """hydra_lite.load_model if the runtime has it yet, else None."""
    try:
        import hydra_lite
    except Exception:
        return None
    return getattr(hydra_lite, "load_model", None)


def logits_diff(hf_model, out_dir, tokens):
    """max |runtime logits - transformers logits|, or skip while the runtime can't load models."""
    load_model = runtime()
    if load_model is None:
        pytest.skip("hydra_lite.load_model not available yet")
    model = load_model(str(out_dir), device="cpu", dtype=torch.float32)
    hf_model = hf_model if getattr(hf_model, "is_quantized", False) else hf_model.float()  # GGUF models are f32 already
    with torch.no_grad():
        ref = hf_model(tokens).logits.float()
    got = model.forward_logits(tokens)
    return (ref - got).abs().max().item(), ref, got


# ----------------------------------------------------------------------------------------------------------
# Tiny Hugging Face models

def tiny_hf(path, n_kv=2, tie=False, arch="llama", dtype=torch.float32, vocab=96, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=n_kv, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
              bos_token_id=1, eos_token_id=2,
              **{k: dict(v) if isinstance(v, dict) else v for k, v in extra.items()})  # transformers edits dicts in place
    if arch == "mistral":
        cfg, cls = MistralConfig(sliding_window=None, **kw), MistralForCausalLM
    else:
        cfg, cls = LlamaConfig(**kw), LlamaForCausalLM
    model = cls(cfg)
    with torch.no_grad():  # non-trivial norms, so a swapped or dropped norm shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = model.to(dtype).eval()
    model.save_pretrained(str(path))
    return model


def to_bin(path, shards=1):
    """Rewrite a saved model's safetensors as pytorch_model.bin (or sharded .bin with an index)."""
    sd = load_file(str(path / "model.safetensors"))
    os.remove(path / "model.safetensors")
    if shards == 1:
        torch.save(sd, path / "pytorch_model.bin")
        return
    names, weight_map = sorted(sd), {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: sd[n] for n in names[i::shards]}
        torch.save(part, path / fname)
        weight_map.update({n: fname for n in part})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def check_converted(model, out, dtype=None):
    """Every runtime tensor is the fused/renamed HF tensor, and config.json describes the model."""
    cfg, sd = model.config, model.state_dict()
    dtype = dtype or next(model.parameters()).dtype
    got = load_file(str(out / "model.safetensors"))
    c = json.loads((out / "config.json").read_text())
    hd = cfg.hidden_size // cfg.num_attention_heads
    assert c["format"] == "hydra-lite/1"
    assert (c["dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["hidden_dim"], c["vocab_size"]) == (
        cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, hd,
        cfg.intermediate_size, cfg.vocab_size)
    assert c["tie_embeddings"] == cfg.tie_word_embeddings and c["dtype"] == str(dtype).split(".")[1]
    assert c["norm_eps"] == pytest.approx(cfg.rms_norm_eps) and c["max_seq_len"] == cfg.max_position_embeddings
    assert c["bos_id"] == 1 and 2 in c["eos_ids"]
    same = lambda a, b: torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0)
    same(got["embed"], sd["model.embed_tokens.weight"])
    same(got["norm"], sd["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        same(got[f"layers.{i}.wqkv"], torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
        same(got[f"layers.{i}.w13"], torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]))
        same(got[f"layers.{i}.wo"], sd[p + "self_attn.o_proj.weight"])
        same(got[f"layers.{i}.w2"], sd[p + "mlp.down_proj.weight"])
        same(got[f"layers.{i}.attn_norm"], sd[p + "input_layernorm.weight"])
        same(got[f"layers.{i}.ffn_norm"], sd[p + "post_attention_layernorm.weight"])
    if cfg.tie_word_embeddings:
        assert "lm_head" not in got
    else:
        same(got["lm_head"], sd["lm_head.weight"])
    assert len(got) == 2 + 6 * cfg.num_hidden_layers + (not cfg.tie_word_embeddings)
    assert all(t.dtype == dtype for t in got.values())
    return c


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

HF_VARIANTS = {
    "mha": dict(n_kv=4),
    "gqa_tied": dict(n_kv=2, tie=True),
    "llama3_rope": dict(n_kv=2, rope_scaling=LLAMA3_ROPE, rope_theta=50000.0),
    "mistral": dict(n_kv=1, arch="mistral"),
}


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_hf_roundtrip_and_logits(tmp_path, variant):
    model = tiny_hf(tmp_path / "src", **HF_VARIANTS[variant])
    c = convert.convert_hf(str(tmp_path / "src"), str(tmp_path / "out"))
    check_converted(model, tmp_path / "out")
    if variant == "llama3_rope":
        assert c["rope_scaling"] == LLAMA3_ROPE and c["rope_theta"] == 50000.0
    else:
        assert c["rope_scaling"] is None
    tokens = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 > 32: llama3 scaling matters
    diff, ref, got = logits_diff(model, tmp_path / "out", tokens)
    print(f"{variant}: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("layout", ["sharded_safetensors", "bin", "sharded_bin"])
def test_hf_weight_layouts(tmp_path, layout):
    src = tmp_path / "src"
    model = tiny_hf(src, n_kv=2)
    if layout == "sharded_safetensors":
        model.save_pretrained(str(src), max_shard_size="40KB")
        os.remove(src / "model.safetensors") if (src / "model.safetensors").exists() else None
        assert (src / "model.safetensors.index.json").exists()
    else:
        to_bin(src, shards=1 if layout == "bin" else 3)
    convert.convert_hf(str(src), str(tmp_path / "out"))
    check_converted(model, tmp_path / "out")


def test_hf_dtype_and_legacy_config(tmp_path):
    """bf16 source keeps bf16; --dtype overrides; an old-style config (rope_theta + rope_scaling 'type') works."""
    src = tmp_path / "src"
    model = tiny_hf(src, dtype=torch.bfloat16)
    cfg = json.loads((src / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params["rope_theta"]
    cfg["rope_scaling"] = {"type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}}
    (src / "config.json").write_text(json.dumps(cfg))
    c = convert.convert_hf(str(src), str(tmp_path / "bf16"))
    assert c["dtype"] == "bfloat16" and c["rope_scaling"] == LLAMA3_ROPE
    check_converted(model, tmp_path / "bf16", torch.bfloat16)
    assert convert.main([str(src), str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    check_converted(model, tmp_path / "f32", torch.float32)


def test_hf_tokenizer_and_chat_template(tmp_path):
    """tokenizer files are copied; chatml adds <|im_end|> to eos_ids; add_bos follows tokenizer_config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    src = tmp_path / "chat-model"
    tiny_hf(src)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 3, "<|im_end|>": 4, "hello": 5}
    vocab.update({f"w{i}": i for i in range(6, 96)})  # as many tokens as embedding rows (convert checks they agree)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    gen = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 5]}))  # lists happen (Llama 3)
    c = convert.convert_hf(str(src), str(tmp_path / "out"))
    assert (c["chat_template"], c["default_system"], c["eos_ids"], c["add_bos"]) == ("chatml", None, [2, 5, 4], True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()


def test_vicuna_dir_without_template(tmp_path):
    tiny_hf(tmp_path / "vicuna-7b-v1.3")
    c = convert.convert_hf(str(tmp_path / "vicuna-7b-v1.3"), str(tmp_path / "out"))
    assert c["chat_template"] == "vicuna" and c["default_system"] == convert.VICUNA_SYSTEM


@pytest.mark.parametrize("template,family,system", [
    ("{{ '<|im_start|>system\nYou are SmolLM.<|im_end|>\n' }}{{'<|im_start|>' + m['role']}}", "chatml", "You are SmolLM."),
    ("{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}", "chatml", "Be brief."),
    ("{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'}}", "chatml", None),
    ("{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system_message + '<|eot_id|>' }}", "llama3", None),
    ("<|start_header_id|>system<|end_header_id|>\n\nYou are a pirate.<|eot_id|>", "llama3", "You are a pirate."),
    ("{% set system_message = 'Always answer in French.' %}{{ '[INST] <<SYS>>\\n' + system_message }}",
     "llama2", "Always answer in French."),
    ("{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}", "llama2", None),
    ("{{ 'A chat between a curious user and an AI. ' }}{% for m in messages %}USER: {{ m }} ASSISTANT:{% endfor %}",
     "vicuna", "A chat between a curious user and an AI."),
    ("{% set system_message = 'Don\\'t lie.' %}[INST] <<SYS>>\n' + system_message + '\n<</SYS>>", "llama2", "Don't lie."),
    ("{{ messages[0]['content'] }}", "none", None),
    (None, "none", None),
])
def test_chat_template_detection(template, family, system):
    assert convert.chat_family(template) == family
    assert convert.default_system(template, family) == system


# ----------------------------------------------------------------------------------------------------------
# GGUF: dequantization, reader, synthetic files

F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


@pytest.mark.parametrize("name", list(F16_FIELDS) + ["F16", "BF16", "F32"])
def test_dequantize_matches_gguf(name):
    """Random blocks (with finite fp16 scales) decode exactly as gguf.quants.dequantize does."""
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[name]
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(48, size), dtype=np.uint8)
    for pos in F16_FIELDS.get(name, []):
        raw[:, pos:pos + 2] = rng.standard_normal(48).astype(np.float16).view(np.uint8).reshape(48, 2)
    if name in ("F16", "F32", "BF16"):
        raw = gguf.quants.quantize(rng.standard_normal((48, 8)).astype(np.float32), qtype)
    raw = raw.reshape(4, -1)
    np.testing.assert_array_equal(convert.dequantize(raw, int(qtype)), gguf.quants.dequantize(raw, qtype))


def test_dequantize_unsupported_type():
    with pytest.raises(ConvertError, match="unsupported GGUF tensor type IQ2_XXS"):
        convert.dequantize(np.zeros((2, 66), np.uint8), 16)


def llama_cpp_permute(w, n_head):
    """What llama.cpp's converter does to q/k rows (HF rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


BYTE_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(set(convert.byte_alphabet().values()))
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "Ġw o"]
GGUF_VOCAB = 272  # the byte alphabet + a few merges + padding


def write_gguf(path, model, types=None, arch="llama", tokenizer=True, extra_meta=True, alignment=None):
    """A GGUF of a tiny HF llama, laid out like llama.cpp writes it; types: GGUF name suffix -> quant type."""
    import gguf
    q = gguf.GGMLQuantizationType
    types = types or {}
    cfg, sd = model.config, model.state_dict()
    w = gguf.GGUFWriter(str(path), arch)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    if extra_meta:  # one key of every value type, to exercise the reader
        for kind, value in (("uint8", 7), ("int8", -7), ("uint16", 700), ("int16", -700), ("uint32", 70000),
                            ("int32", -70000), ("uint64", 2**40), ("int64", -2**40), ("float32", 0.5),
                            ("float64", 0.25), ("bool", True), ("string", "héllo")):
            getattr(w, f"add_{kind}")(f"test.{kind}", value)
        w.add_array("test.ints", [1, 2, 3])
        w.add_array("test.strings", ["a", "bc", "日本"])
    if tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        words = ["he", "ll", "hell", "hello", "Ġw", "Ġwo"]
        w.add_token_list(BYTE_TOKENS + words + [f"pad{i}" for i in range(cfg.vocab_size - len(BYTE_TOKENS) - len(words))])
        w.add_token_types([3, 3, 3] + [1] * (cfg.vocab_size - 3))
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(0)
        w.add_add_bos_token(True)
        w.add_chat_template("{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}")
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for k, v in parts.items()})
    written = {}
    for hf_name, name in names.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        x = sd[hf_name].float().numpy()
        if name.endswith("attn_q.weight"):
            x = llama_cpp_permute(x, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            x = llama_cpp_permute(x, cfg.num_key_value_heads)
        qtype = next((t for suffix, t in types.items() if name.endswith(suffix)), q.F32)
        if x.ndim == 1:
            qtype = q.F32  # norms stay F32, as llama.cpp writes them
        data = gguf.quants.quantize(x, qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
        written[name] = (data, qtype)
    finish(w)
    return written


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


MIXED = {"attn_q.weight": "F16", "attn_k.weight": "Q8_0", "attn_v.weight": "Q4_0", "attn_output.weight": "Q4_1",
         "ffn_gate.weight": "Q5_0", "ffn_up.weight": "Q5_1", "ffn_down.weight": "BF16", "token_embd.weight": "Q8_0",
         "output.weight": "F16"}


def test_gguf_reader_and_mixed_types(tmp_path):
    gguf = pytest.importorskip("gguf")
    model = tiny_hf(tmp_path / "hf", n_kv=2, vocab=GGUF_VOCAB)
    types = {k: gguf.GGMLQuantizationType[v] for k, v in MIXED.items()}
    written = write_gguf(tmp_path / "m.gguf", model, types, alignment=64)
    meta, tensors = convert.read_gguf(str(tmp_path / "m.gguf"))
    assert meta["general.alignment"] == 64
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    expect = {"uint8": 7, "int8": -7, "uint16": 700, "int16": -700, "uint32": 70000, "int32": -70000,
              "uint64": 2**40, "int64": -2**40, "float32": 0.5, "float64": 0.25, "bool": True, "string": "héllo"}
    assert {k: meta[f"test.{k}"] for k in expect} == expect
    assert meta["test.ints"] == [1, 2, 3] and meta["test.strings"] == ["a", "bc", "日本"]
    assert meta["tokenizer.ggml.merges"] == MERGES
    assert set(tensors) == set(written)
    for name, (data, qtype) in written.items():
        t = tensors[name]
        assert t.type == int(qtype)
        np.testing.assert_array_equal(convert.dequantize(t), gguf.quants.dequantize(data, qtype).reshape(t.shape))

    # Converting undoes the q/k permutation: compare with the original HF rows (through the same quantization).
    c = convert.convert_gguf(str(tmp_path / "m.gguf"), str(tmp_path / "out"))
    got, sd = load_file(str(tmp_path / "out" / "model.safetensors")), model.state_dict()
    assert c["dtype"] == "float32" and c["tie_embeddings"] is False and c["eos_ids"] == [0, 2]
    wqkv = got["layers.0.wqkv"]
    torch.testing.assert_close(wqkv[:64], sd["model.layers.0.self_attn.q_proj.weight"].half().float(), rtol=0, atol=0)
    torch.testing.assert_close(wqkv[64:96], sd["model.layers.0.self_attn.k_proj.weight"], rtol=0, atol=0.02)
    k_ref = gguf.quants.dequantize(*written["blk.0.attn_k.weight"])
    np.testing.assert_array_equal(wqkv[64:96].numpy(), convert.unpermute_rope(k_ref, 2))


def test_gguf_logits_parity_and_tokenizer(tmp_path):
    """An all-F32 GGUF converts to the exact HF model: same logits through the runtime."""
    model = tiny_hf(tmp_path / "hf", n_kv=2, tie=True, vocab=GGUF_VOCAB)
    write_gguf(tmp_path / "tiny.gguf", model)
    assert convert.main([str(tmp_path / "tiny.gguf"), str(tmp_path / "out")]) == 0
    check_converted(model, tmp_path / "out")
    c = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (c["bos_id"], c["add_bos"], c["chat_template"]) == (1, True, "chatml")

    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    ids = tok.encode("hello<|im_end|> wo").ids
    assert ids == [len(BYTE_TOKENS) + 3, 2, len(BYTE_TOKENS) + 5]  # hello, <|im_end|> (special), Ġwo
    for text in ["hello world", "héllo 日本語 🤖\n\t  x", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text

    tokens = torch.randint(0, GGUF_VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    diff, _, _ = logits_diff(model, tmp_path / "out", tokens)
    print(f"tiny GGUF: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4


def test_spm_gguf_tokenizer_matches_sentencepiece():
    """A sentencepiece BPE vocab (as llama.cpp stores it) becomes a tokenizer.json that tokenizes like sentencepiece."""
    spm = pytest.importorskip("sentencepiece")
    import io
    import random
    random.seed(0)
    words = "the quick brown fox jumps over lazy dog hello world token merge llama hydra medusa draft head".split()
    lines = [" ".join(random.choice(words) for _ in range(12)) for _ in range(1000)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, vocab_size=300, model_type="bpe",
                                   byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    n = sp.get_piece_size()
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.token_type": [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
                                          for i in range(n)]}
    tok = convert.gguf_tokenizer(meta)
    for text in ["the quick brown fox", "hello  world", " leading space", "héllo wörld 日本 🤖", "llamahydra medusadraft",
                 "a\nb\tc", "", "thethethe quickquick", "The Quick"]:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False).ids == ids, text
        assert tok.decode(ids) == sp.decode(ids)


def test_llama3_rope_from_rope_freqs():
    head_dim, theta = 64, 500000.0
    freqs = theta ** (-np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = np.clip((8192 / wavelen - 1) / (4 - 1), 0, 1)
    factors = 1 / ((1 - smooth) / 32 + smooth)  # Llama 3.2 style: factor 32
    got = convert.llama3_from_rope_freqs(factors.astype(np.float32), head_dim, theta)
    assert got == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
    with pytest.raises(ConvertError, match="rope_freqs"):
        convert.llama3_from_rope_freqs(np.linspace(1, 3, 32), head_dim, theta)


# ----------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (Q4_1 GGUF) against transformers' own GGUF loader

@pytest.fixture(scope="module")
def smol_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "out"
    convert.convert_gguf(SMOL, str(out))
    return out


@pytest.fixture(scope="module")
def fast_gguf_oracle():
    """transformers' GGUF loader parses the whole file on every call (config, weights, tokenizer) and rebuilds gguf's
    tensor name map for every module: about half of this file's time on 2 CPU cores. Both are pure, so memoize
    them (the reader for the SmolLM2 file only) while the SmolLM2 oracles run."""
    import functools
    gguf = pytest.importorskip("gguf")
    real_reader, readers = gguf.GGUFReader, {}

    def reader(path, *args, **kw):
        if args or kw or os.path.abspath(path) != os.path.abspath(SMOL):
            return real_reader(path, *args, **kw)
        if SMOL not in readers:
            readers[SMOL] = real_reader(path)
        return readers[SMOL]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", reader)
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        yield


@pytest.fixture(scope="module")
def smol_hf(fast_gguf_oracle):
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(SMOL), gguf_file=os.path.basename(SMOL),
                                                dtype=torch.float32).eval()


@needs_smol
def test_smollm2_dequantize_every_type():
    gguf = pytest.importorskip("gguf")
    meta, tensors = convert.read_gguf(SMOL)
    seen = set()
    for name, t in tensors.items():
        ref = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType(t.type))
        np.testing.assert_array_equal(convert.dequantize(t), ref.reshape(t.shape), err_msg=name)
        seen.add(t.type_name)
    assert seen == {"F32", "Q4_1", "Q8_0"}


@needs_smol
def test_smollm2_config(smol_out):
    c = json.loads((smol_out / "config.json").read_text())
    assert (c["dim"], c["n_layers"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["hidden_dim"]) == (576, 30, 9, 3, 64, 1536)
    assert (c["vocab_size"], c["tie_embeddings"], c["rope_theta"], c["max_seq_len"]) == (49152, True, 100000.0, 8192)
    assert (c["bos_id"], c["eos_ids"], c["add_bos"], c["chat_template"]) == (1, [2], False, "chatml")
    assert c["default_system"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert c["dtype"] == "float32"


@needs_smol
def test_smollm2_weights_match_transformers(smol_out, smol_hf):
    """transformers dequantizes and un-permutes q/k on its own; every runtime tensor must agree with it."""
    got, sd = load_file(str(smol_out / "model.safetensors")), smol_hf.state_dict()
    q, kv, ff = 9 * 64, 3 * 64, 1536
    worst = 0.0
    pairs = [("embed", None, "model.embed_tokens.weight"), ("norm", None, "model.norm.weight")]
    for i in range(30):
        p, r = f"layers.{i}.", f"model.layers.{i}."
        pairs += [(p + "wqkv", slice(0, q), r + "self_attn.q_proj.weight"),
                  (p + "wqkv", slice(q, q + kv), r + "self_attn.k_proj.weight"),
                  (p + "wqkv", slice(q + kv, q + 2 * kv), r + "self_attn.v_proj.weight"),
                  (p + "wo", None, r + "self_attn.o_proj.weight"),
                  (p + "w13", slice(0, ff), r + "mlp.gate_proj.weight"),
                  (p + "w13", slice(ff, 2 * ff), r + "mlp.up_proj.weight"),
                  (p + "w2", None, r + "mlp.down_proj.weight"),
                  (p + "attn_norm", None, r + "input_layernorm.weight"),
                  (p + "ffn_norm", None, r + "post_attention_layernorm.weight")]
    for name, rows, ref in pairs:
        mine = got[name] if rows is None else got[name][rows]
        assert mine.shape == sd[ref].shape, ref
        if not torch.equal(mine, sd[ref]):
            worst = max(worst, (mine - sd[ref]).abs().max().item())
    print(f"SmolLM2: max |weight diff| vs transformers = {worst:.2e}")
    assert worst < 1e-6
    assert len(got) == 2 + 6 * 30


@needs_smol
def test_smollm2_logits_match_transformers(smol_out, smol_hf):
    tokens = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 198, 1, 4093, 198, 19556, 28, 638, 418, 346, 47]])
    diff, ref, got = logits_diff(smol_hf, smol_out, tokens)
    print(f"SmolLM2: max |logit diff| vs transformers = {diff:.2e} (logit range {ref.min():.1f}..{ref.max():.1f})")
    assert torch.equal(ref.argmax(-1), got.argmax(-1))
    assert diff < 1e-3


@needs_smol
def test_smollm2_tokenizer_matches_transformers(smol_out, fast_gguf_oracle):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(os.path.dirname(SMOL), gguf_file=os.path.basename(SMOL))
    tok = Tokenizer.from_file(str(smol_out / "tokenizer.json"))
    texts = ["Hello, world!", "12345 67 8.9e10 3,000,000", "  leading spaces\n\n\ttabs   and   runs  ",
             "héllo wörld — 日本語 🤖 emoji ﬁ Ǆ", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
             "def f(x):\n    return x**2  # comment\n", "I'm you're they'll WE'VE", "a" * 100, "", " ", "\n\n\n",
             "<|endoftext|><repo_name>hydra<file_sep>", "$$\\frac{1}{2}$$ <b>bold</b>", "\u00a0nbsp\u200bzw"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.token_to_id("<|im_end|>") == 2


@needs_smol
def test_smollm2_keyword_uses_verified_copy(tmp_path, monkeypatch):
    """`convert.py smollm2` finds the sha256-verified GGUF and converts it to <repo>/checkpoints/smollm2-135m-instruct,
    where the runtime looks, whatever the working directory."""
    calls = []
    monkeypatch.setenv("HYDRA_LITE_GGUF", SMOL)
    monkeypatch.setattr(convert, "convert_gguf", lambda path, out, dtype=None: calls.append((path, out, dtype)))
    monkeypatch.chdir(tmp_path)
    assert convert.main(["smollm2"]) == 0
    assert calls == [(SMOL, os.path.join(ROOT, "checkpoints", "smollm2-135m-instruct"), None)]


# ----------------------------------------------------------------------------------------------------------
# Draft heads. The modules below mirror the layouts of the Hydra and Medusa reference code (key names,
# Dropout interleaving, and `[ResBlock(H)] * n` sharing one module), so their state dicts look the same.

class RefResBlock(nn.Module):
    def __init__(self, h, n_cond=0):
        super().__init__()
        self.linear = nn.Linear(h * (n_cond + 1), h)
        self.res_connection = nn.Linear(h * (n_cond + 1), h) if n_cond else nn.Identity()

    def forward(self, x):
        return self.res_connection(x) + F.silu(self.linear(x))


def hydra_heads(dim, vocab, n_heads, n_layers, grounded, prefix):
    torch.manual_seed(3)
    m = nn.Module()
    mlps = []
    for k in range(n_heads):
        shared = RefResBlock(dim)
        if prefix:
            drop = nn.Dropout(0.0)
            mods = ([drop, RefResBlock(dim, k + 1)] + [drop, shared] * (n_layers - 1)) if grounded else [drop, shared] * n_layers
        else:
            mods = ([RefResBlock(dim, k + 1)] + [shared] * (n_layers - 1)) if grounded else [shared] * n_layers
        mlps.append(nn.Sequential(*mods))
    m.hydra_mlp = nn.ModuleList(mlps)
    m.hydra_lm_head = nn.ModuleList(nn.Sequential(nn.Dropout(0.0), nn.Linear(dim, vocab)) if prefix else nn.Linear(dim, vocab)
                                    for _ in range(n_heads))
    if prefix:
        from transformers import LlamaConfig, LlamaModel
        m.prefix_embeding_layer = LlamaModel(LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=128,
                                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def medusa_heads(dim, vocab, n_heads, n_layers):
    torch.manual_seed(4)
    heads = nn.ModuleList(nn.Sequential(*([RefResBlock(dim)] * n_layers), nn.Linear(dim, vocab, bias=False))
                          for _ in range(n_heads))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.1)
    return heads.eval()


def run_converted_head(t, k, x, n_layers, lm_bias):
    """FORMAT.md's head semantics, applied to converted tensors."""
    for j in range(n_layers):
        p = f"heads.{k}.blocks.{j}."
        res = F.linear(x, t[p + "res_w"], t[p + "res_b"]) if p + "res_w" in t else x
        x = res + F.silu(F.linear(x, t[p + "w"], t[p + "b"]))
    return F.linear(x, t[f"heads.{k}.lm_w"], t[f"heads.{k}.lm_b"] if lm_bias else None)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    tiny_hf(root / "hf", n_kv=2)
    convert.convert_hf(str(root / "hf"), str(root / "rt"))
    return root / "rt"


@pytest.mark.parametrize("arch,grounded", [("mlp", True), ("mlp", False), ("prefix-mlp", True)])
def test_hydra_heads(tmp_path, base_dir, arch, grounded):
    dim, vocab, n_heads, n_layers = 64, 96, 3, 2
    ref = hydra_heads(dim, vocab, n_heads, n_layers, grounded, prefix=arch == "prefix-mlp")
    src = tmp_path / "hydra"
    src.mkdir()
    torch.save(ref.state_dict(), src / "hydra_lm_head.pt")
    (src / "config.json").write_text(json.dumps({"hydra_num_heads": n_heads, "hydra_num_layers": n_layers,
                                                 "hydra_head_arch": arch, "grounded_heads": grounded,
                                                 "hidden_state_offset": 0, "base_model_name_or_path": "x"}))
    assert convert.main(["--heads", str(src), "--base", str(base_dir), str(tmp_path / "out")]) == 0
    info = json.loads((tmp_path / "out" / "heads.json").read_text())
    kind = {"prefix-mlp": "hydra++", "mlp": "hydra" if grounded else "medusa"}[arch]
    assert info == {**info, "format": "hydra-lite-heads/1", "kind": kind, "n_heads": n_heads, "n_layers": n_layers,
                    "dim": dim, "vocab_size": vocab, "grounded": grounded, "prefix": arch == "prefix-mlp",
                    "lm_head": "own", "lm_bias": True}
    t = load_file(str(tmp_path / "out" / "heads.safetensors"))
    for k in range(n_heads):
        x = torch.randn(5, (k + 2) * dim if grounded else dim)
        with torch.no_grad():
            want = ref.hydra_lm_head[k](ref.hydra_mlp[k](x))
        torch.testing.assert_close(run_converted_head(t, k, x, n_layers, True), want)
        in0 = (k + 2) * dim if grounded else dim
        assert t[f"heads.{k}.blocks.0.w"].shape == (dim, in0) and (f"heads.{k}.blocks.0.res_w" in t) == grounded
    if arch == "prefix-mlp":
        sd, p = ref.prefix_embeding_layer.state_dict(), "layers.0."
        torch.testing.assert_close(t["prefix.wqkv"], torch.cat([sd[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
                                   rtol=0, atol=0)
        torch.testing.assert_close(t["prefix.w13"], torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]),
                                   rtol=0, atol=0)
        for mine, theirs in (("wo", "self_attn.o_proj.weight"), ("w2", "mlp.down_proj.weight"),
                             ("attn_norm", "input_layernorm.weight"), ("ffn_norm", "post_attention_layernorm.weight")):
            torch.testing.assert_close(t["prefix." + mine], sd[p + theirs], rtol=0, atol=0)
        torch.testing.assert_close(t["prefix.norm"], sd["norm.weight"], rtol=0, atol=0)
    expected = n_heads * (2 * n_layers + 2) + (2 * n_heads if grounded else 0) + (7 if arch == "prefix-mlp" else 0)
    assert len(t) == expected


@pytest.mark.parametrize("fmt", ["pt_prefixed", "safetensors"])
def test_medusa_heads(tmp_path, base_dir, fmt):
    dim, vocab, n_heads, n_layers = 64, 96, 3, 2
    ref = medusa_heads(dim, vocab, n_heads, n_layers)
    src = tmp_path / "medusa"
    src.mkdir()
    if fmt == "pt_prefixed":  # a whole-model save: keys under medusa_head.
        torch.save({"medusa_head." + k: v for k, v in ref.state_dict().items()}, src / "medusa_lm_head.pt")
    else:  # safetensors can't hold the shared block twice: clone
        save_file({k: v.clone() for k, v in ref.state_dict().items()}, str(src / "medusa_lm_head.safetensors"))
    # upstream Medusa configs are known to disagree with their weights: the weights win
    (src / "config.json").write_text(json.dumps({"medusa_num_heads": 5, "medusa_num_layers": n_layers}))
    info = convert.convert_heads(str(src), str(base_dir), str(tmp_path / "out"))
    assert (info["kind"], info["n_heads"], info["n_layers"], info["grounded"], info["prefix"], info["lm_bias"]) == (
        "medusa", n_heads, n_layers, False, False, False)
    t = load_file(str(tmp_path / "out" / "heads.safetensors"))
    assert len(t) == n_heads * (2 * n_layers + 1)
    for k in range(n_heads):
        x = torch.randn(4, dim)
        with torch.no_grad():
            want = ref[k](x)
        torch.testing.assert_close(run_converted_head(t, k, x, n_layers, False), want)


def test_heads_load_in_runtime(tmp_path, base_dir):
    """The runtime accepts converted Hydra++ heads (names, shapes, prefix layer) when it can load heads."""
    try:
        import hydra_lite
    except Exception:
        pytest.skip("hydra_lite not importable")
    if not hasattr(hydra_lite, "load_heads"):
        pytest.skip("hydra_lite.load_heads not available yet")
    ref = hydra_heads(64, 96, 2, 2, grounded=True, prefix=True)
    src = tmp_path / "h"
    src.mkdir()
    torch.save(ref.state_dict(), src / "hydra_lm_head.pt")
    convert.convert_heads(str(src), str(base_dir), str(tmp_path / "out"))
    base = hydra_lite.load_model(str(base_dir), device="cpu", dtype=torch.float32)
    heads = hydra_lite.load_heads(str(tmp_path / "out"), base)
    x = torch.randn(3, 2 * 64)
    with torch.no_grad():
        want = ref.hydra_lm_head[0](ref.hydra_mlp[0](x))
        got = heads.heads[0](x, base.output_weight)
    torch.testing.assert_close(got, want)


def test_heads_errors(tmp_path, base_dir):
    src = tmp_path / "h"
    src.mkdir()
    torch.save(hydra_heads(64, 96, 2, 1, grounded=True, prefix=False).state_dict(), src / "hydra_lm_head.pt")
    (src / "config.json").write_text(json.dumps({"hydra_head_arch": "mlp", "hidden_state_offset": 1}))
    with pytest.raises(ConvertError, match="hidden_state_offset 1"):
        convert.convert_heads(str(src), str(base_dir), str(tmp_path / "out"))
    (src / "config.json").write_text(json.dumps({"hydra_head_arch": "cross-attn"}))
    with pytest.raises(ConvertError, match="cross-attn"):
        convert.convert_heads(str(src), str(base_dir), str(tmp_path / "out"))
    torch.save(hydra_heads(32, 96, 2, 1, grounded=True, prefix=False).state_dict(), src / "hydra_lm_head.pt")
    (src / "config.json").write_text("{}")
    with pytest.raises(ConvertError, match=r"are for vocab 96, dim 32; the base model .* has vocab 96, dim 64"):
        convert.convert_heads(str(src), str(base_dir), str(tmp_path / "out"))
    torch.save(medusa_heads(64, 50, 2, 1).state_dict(), src / "hydra_lm_head.pt")
    with pytest.raises(ConvertError, match=r"are for vocab 50, dim 64"):
        convert.convert_heads(str(src / "hydra_lm_head.pt"), str(base_dir), str(tmp_path / "out"))
    sd = hydra_heads(64, 96, 2, 1, grounded=True, prefix=False).state_dict()
    sd["hydra_mlp.1.0.linear.weight"] = torch.zeros(64, 128)  # head 1 sees 3 vectors: should be [64, 192]
    torch.save(sd, src / "hydra_lm_head.pt")
    with pytest.raises(ConvertError,
                       match=r"shape mismatch for hydra_mlp\.1\.0\.linear\.weight .*expected \[64, 192\], got \[64, 128\]"):
        convert.convert_heads(str(src), str(base_dir), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: clear ConvertErrors, and exit code 2 from the CLI

def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(ConvertError, match="no such file or directory"):
        convert.convert(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConvertError, match="missing config.json"):
        convert.convert(str(tmp_path / "empty"), str(tmp_path / "out"))
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(ConvertError, match=r"bad JSON in .*badjson.config\.json"):
        convert.convert(str(tmp_path / "badjson"), str(tmp_path / "out"))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConvertError, match="unsupported architecture GPT2LMHeadModel"):
        convert.convert(str(tmp_path / "gpt2"), str(tmp_path / "out"))

    src = tmp_path / "src"
    tiny_hf(src)
    sd = load_file(str(src / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(ConvertError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        convert.convert(str(src), str(tmp_path / "out"))
    tiny_hf(src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(ConvertError,
                       match=r"shape mismatch for model\.layers\.0\.mlp\.gate_proj\.weight"
                             r".*expected \[100, 64\], got \[128, 64\]"):
        convert.convert(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing is written before the checks pass

    (tmp_path / "bad.gguf").write_bytes(b"GGML" + bytes(64))
    with pytest.raises(ConvertError, match="bad magic"):
        convert.convert(str(tmp_path / "bad.gguf"))
    assert convert.main([str(tmp_path / "bad.gguf")]) == 2
    assert "error:" in capsys.readouterr().err


def test_bad_gguf_files(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    finish(w)
    with pytest.raises(ConvertError, match="unsupported GGUF architecture 'gpt2'"):
        convert.convert_gguf(str(tmp_path / "gpt2.gguf"), str(tmp_path / "out"))

    model = tiny_hf(tmp_path / "hf")
    write_gguf(tmp_path / "m.gguf", model, tokenizer=False, extra_meta=False)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) - 1000])
    with pytest.raises(ConvertError, match="truncated"):
        convert.read_gguf(str(tmp_path / "cut.gguf"))

    w = gguf.GGUFWriter(str(tmp_path / "iq.gguf"), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((2, 66), np.uint8), raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS)
    finish(w)
    _, tensors = convert.read_gguf(str(tmp_path / "iq.gguf"))
    src = convert.GGUFSource("iq.gguf", tensors, {"n_heads": 1, "n_kv_heads": 1})
    with pytest.raises(ConvertError, match=r"unsupported GGUF tensor type IQ2_XXS \(tensor blk\.0\.attn_q\.weight"):
        src.get("blk.0.attn_q.weight")


def test_cli_exit_code(tmp_path):
    """The real entry point: one line on stderr, no traceback, exit code 2 (test_convert_safety.py covers the
    many bad inputs in-process, through main())."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), str(tmp_path / "missing")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [f"error: no such file or directory: {tmp_path / 'missing'}"]
