"""Model registry: HF architecture name -> lightspeed model class."""
from __future__ import annotations

from lightspeed.config import ModelConfig
from lightspeed.errors import UnsupportedModelError

# architecture -> (module, class); imported lazily so the registry stays cheap to import.
_MODELS = {
    "LlamaForCausalLM": ("lightspeed.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("lightspeed.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("lightspeed.models.llama", "LlamaForCausalLM"),
    "Llama4ForCausalLM": ("lightspeed.models.llama4", "Llama4ForCausalLM"),
    "Llama4ForConditionalGeneration": ("lightspeed.models.llama4", "Llama4ForCausalLM"),
}


def get_model_class(config: ModelConfig) -> type:
    try:
        module_name, class_name = _MODELS[config.architecture]
    except KeyError:
        raise UnsupportedModelError(f"no model class for architecture {config.architecture!r}; "
                                    f"supported: {', '.join(_MODELS)}") from None
    import importlib
    return getattr(importlib.import_module(module_name), class_name)
