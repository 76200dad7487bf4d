import json
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SMOL_CKPT = os.path.join(ROOT, "checkpoints", "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_smol(tmp_path_factory):
    """(checkpoint dir, heads dir): SmolLM2's config, tokenizer and chat template with tiny random weights (dim 64,
    2 layers), and random Hydra++ heads with a draft vocabulary for it. For the CLIs' plumbing (reports, rows,
    flags), at a few percent of the real model's cost on the CPU; what the real weights do is tested elsewhere."""
    import torch
    from safetensors.torch import save_file

    import hydra_lite as hl

    if not os.path.isdir(SMOL_CKPT):
        pytest.skip("run scripts/test.sh to fetch and convert SmolLM2")
    out = tmp_path_factory.mktemp("tiny-smol")
    ckpt, heads_dir = out / "model", out / "heads"
    ckpt.mkdir()
    with open(os.path.join(SMOL_CKPT, "config.json")) as f:
        meta = json.load(f)
    meta.update(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, max_seq_len=2048)
    meta.pop("files", None)
    with open(ckpt / "config.json", "w") as f:
        json.dump(meta, f)
    shutil.copy(os.path.join(SMOL_CKPT, "tokenizer.json"), ckpt / "tokenizer.json")
    torch.manual_seed(0)
    model = hl.Llama(hl.Config.from_dict(meta))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5 if p.dim() == 2 else 0.1)  # sharp logits: no greedy near-ties in fp32
        if p.dim() == 1:
            p.data += 1.0
    save_file({hl.file_name(k): v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    hc = hl.HeadsConfig(n_heads=3, n_layers=1, dim=64, vocab_size=meta["vocab_size"], grounded=True, prefix=True,
                        lm_head="base", kind="hydra++", draft_vocab=512)
    heads = hl.DraftHeads(hc, model.cfg)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    heads.vocab.copy_(torch.arange(512))
    hl.save_heads(heads, str(heads_dir), model.cfg)
    return str(ckpt), str(heads_dir)
