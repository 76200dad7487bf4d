"""A checkpoint with a real one's config and tokenizer but random weights: for timing on a machine the real
weights have not reached (prefill and step times do not depend on the weights' values), and for tests that need
a model shaped and tokenized like a real one but small (tests/conftest.py).

    python scripts/random_checkpoint.py checkpoints/smollm2-135m-instruct /tmp/random-smollm2
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hydra_lite as hl  # noqa: E402


def normal_init(model, std=0.02):
    for p in model.parameters():
        torch.nn.init.normal_(p, std=std)


def write_random_checkpoint(src, out, init=normal_init, **config):
    """src's config (with `config` overriding its fields) and tokenizer, weights from init(model), into out.
    Returns the model."""
    meta = hl.read_json(os.path.join(src, "config.json"))
    meta.pop("files", None)
    meta.update(config)
    os.makedirs(out, exist_ok=True)
    model = hl.Llama(hl.Config.from_dict(meta))
    init(model)
    save_file({hl.file_name(k): v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(meta, f)
    shutil.copy(os.path.join(src, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    return model


if __name__ == "__main__":
    model = write_random_checkpoint(*sys.argv[1:3])
    print(f"wrote {sys.argv[2]}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M random parameters")
