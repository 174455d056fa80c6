"""Structured outputs: JSON schema, JSON object, regex and choice constraints compiled by
xgrammar and applied as token bitmasks, exact under speculative decoding (matcher.py)."""
from lightspeed.structured.compiler import StructuredOutputs, structured_outputs
from lightspeed.structured.matcher import GrammarBatch
from lightspeed.structured.spec import GuidedSpec, check_json_schema, guided_spec

__all__ = ["GrammarBatch", "GuidedSpec", "StructuredOutputs", "check_json_schema", "guided_spec",
           "structured_outputs"]
