import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SMOL_CKPT = os.path.join(ROOT, "checkpoints", "smollm2-135m-instruct")


def sharp_init(model):
    """Large random weights: sharp logits, so no greedy near-ties in float32."""
    import torch

    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5 if p.dim() == 2 else 0.1)
        if p.dim() == 1:
            p.data += 1.0


@pytest.fixture(scope="session")
def tiny_smol(tmp_path_factory):
    """(checkpoint dir, heads dir): SmolLM2's config, tokenizer and chat template with tiny random weights (dim 64,
    2 layers), and random Hydra++ heads with a draft vocabulary for it. For the CLIs' plumbing (reports, rows,
    flags), at a few percent of the real model's cost on the CPU; what the real weights do is tested elsewhere."""
    import torch

    import hydra_lite as hl

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from random_checkpoint import write_random_checkpoint

    if not os.path.isdir(SMOL_CKPT):
        pytest.skip("run scripts/test.sh to fetch and convert SmolLM2")
    out = tmp_path_factory.mktemp("tiny-smol")
    torch.manual_seed(0)
    model = write_random_checkpoint(SMOL_CKPT, str(out / "model"), sharp_init, dim=64, n_layers=2, n_heads=4,
                                    n_kv_heads=2, head_dim=16, hidden_dim=96, max_seq_len=2048)
    hc = hl.HeadsConfig(n_heads=3, n_layers=1, dim=64, vocab_size=model.cfg.vocab_size, grounded=True, prefix=True,
                        lm_head="base", kind="hydra++", draft_vocab=512)
    heads = hl.DraftHeads(hc, model.cfg)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    heads.vocab.copy_(torch.arange(512))
    hl.save_heads(heads, str(out / "heads"), model.cfg)
    return str(out / "model"), str(out / "heads")
