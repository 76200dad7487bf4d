"""A checkpoint with a real one's config and tokenizer but random weights: for timing on a machine the real
weights have not reached (prefill and step times do not depend on the weights' values).

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


def main(src, out):
    meta = hl.read_json(os.path.join(src, "config.json"))
    meta.pop("files", None)
    os.makedirs(out, exist_ok=True)
    model = hl.Llama(hl.Config.from_dict(meta))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    save_file({hl.file_name(k): v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(meta, f)
    shutil.copy(os.path.join(src, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M random parameters")


if __name__ == "__main__":
    main(*sys.argv[1:3])
