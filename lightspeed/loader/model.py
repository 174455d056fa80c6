"""Model loading: a model source string -> (model, tokenizer) on a device, in a dtype.

    model, tokenizer = load_model("smollm2-135m-instruct", torch.device("cpu"), torch.float32)

Sources: a local HF directory or .gguf file, a catalog name or an HF hub id (resolve_model),
or `shape:NAME` (a real model shape with random weights, for benchmarks: models/random.py,
imported only for that source; no tokenizer, prompts are token ids).

NOTE: every call loads a fresh model: a model is bound to the KernelSettings of the runner
that owns it (kernels/settings.py), so engines in one process never share one.
"""
from __future__ import annotations

import torch

from lightspeed.layers.linear import quantize_model_
from lightspeed.loader import open_checkpoint, resolve_model
from lightspeed.models import get_model_class

SHAPE_PREFIX = "shape:"


def load_model(model: str, device: torch.device, dtype: torch.dtype, quantization: str | None = None):
    """Resolve, open and load a checkpoint -> (model in eval mode, tokenizer or None)."""
    if model.startswith(SHAPE_PREFIX):
        from lightspeed.models.random import random_model  # NOTE: benchmark shapes, only for this source
        return random_model(model[len(SHAPE_PREFIX):], device, dtype, quantization=quantization), None
    ckpt = open_checkpoint(resolve_model(model))
    tokenizer = ckpt.tokenizer()
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = get_model_class(ckpt.config)(ckpt.config)
    finally:
        torch.set_default_dtype(prev)
    net.load_weights(ckpt.weights())
    quantize_model_(net, quantization)  # NOTE: every Linear but lm_head (embeddings are not Linear)
    return net.eval(), tokenizer
