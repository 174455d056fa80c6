"""lightspeed: a latency-first LLM inference engine."""
from lightspeed.config import EngineConfig, ModelConfig, SamplingParams, SpeculativeConfig

__all__ = ["LLM", "SamplingParams", "EngineConfig", "ModelConfig", "SpeculativeConfig"]
__version__ = "0.1.0"


def __getattr__(name):  # keep `import lightspeed` light: torch loads on first use of LLM
    if name == "LLM":
        from lightspeed.engine.llm import LLM
        return LLM
    raise AttributeError(name)
