"""An untrained EAGLE-3 head for a target (train-eagle3's initialisation, no training), to time
the drafting path on the GPU without a trained head (its drafts are mostly rejected).

    python bench/device/random_head.py TARGET OUT_DIR [DRAFT_VOCAB]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from lightspeed import LLM
from lightspeed.models.eagle3 import default_aux_layer_ids
from lightspeed.train.head import build_head, head_hf_config, save_head


def main() -> None:
    target, out = sys.argv[1], Path(sys.argv[2])
    vocab = int(sys.argv[3]) if len(sys.argv) > 3 else 32000
    model = LLM(target, kv_cache_gb=1.0).engine.runner.model
    c = model.config
    cfg = head_hf_config(c, vocab, default_aux_layer_ids(c.num_hidden_layers))
    save_head(build_head(cfg, model, torch.arange(vocab), seed=0), cfg, out)
    print(f"untrained head for {target} in {out}")


if __name__ == "__main__":
    main()
