"""What a request constrains its output to, validated before any compile: a JSON schema,
any JSON object, a regular expression or a choice of strings (SamplingParams' fields)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from lightspeed.errors import InvalidRequestError

# Keywords xgrammar does not enforce (it would ignore them and produce output the schema
# rejects). NOTE: oneOf is compiled as anyOf, which admits values matching two branches.
UNSUPPORTED_KEYWORDS = frozenset({
    "not", "if", "then", "else", "oneOf", "uniqueItems", "contains", "minContains", "maxContains",
    "maxProperties", "propertyNames", "dependentRequired", "dependentSchemas", "dependencies",
    "unevaluatedItems", "unevaluatedProperties", "$dynamicRef", "$recursiveRef"})
# Keywords whose value is a map of name -> subschema, or a list of subschemas / one subschema.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "allOf", "prefixItems")
_SCHEMA_ONES = ("items", "additionalProperties")


@dataclass(frozen=True)
class GuidedSpec:
    """One constraint: kind is "json_schema" | "json_object" | "regex" | "choice"; `source`
    is the text compiled (schema JSON, regex, or an EBNF grammar for a choice)."""

    kind: str
    source: str

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.source


def guided_spec(params) -> GuidedSpec | None:
    """SamplingParams -> the GuidedSpec of its constraint, or None; InvalidRequestError for a
    schema that is not valid JSON Schema or uses a keyword the grammar engine cannot enforce."""
    if params.json_schema is not None:
        schema = params.json_schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"json_schema is not valid JSON: {e}") from e
        check_json_schema(schema)
        return GuidedSpec("json_schema", json.dumps(schema, ensure_ascii=False))
    if params.json_object:
        return GuidedSpec("json_object", "")
    if params.regex is not None:
        return GuidedSpec("regex", params.regex)
    if params.choice is not None:
        return GuidedSpec("choice", "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice))
    return None


def check_json_schema(schema) -> None:
    """A valid JSON Schema (its draft's meta-schema) with only keywords xgrammar enforces."""
    if isinstance(schema, bool) or not isinstance(schema, dict):
        raise InvalidRequestError(f"json_schema must be a JSON object (a schema), got {type(schema).__name__}")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise InvalidRequestError(f"json_schema is not a valid JSON Schema at {where}: {e.message}") from e
    _check_keywords(schema, "#")


def _check_keywords(node, where: str) -> None:
    if not isinstance(node, dict):
        return
    bad = sorted(UNSUPPORTED_KEYWORDS & node.keys())
    if bad:
        raise InvalidRequestError(f"json_schema keyword {bad[0]!r} at {where} is not supported by structured "
                                  "outputs (it would not be enforced); supported: type, properties, required, "
                                  "additionalProperties, items, prefixItems, min/maxItems, enum, const, anyOf, "
                                  "allOf, $ref/$defs, minimum/maximum, min/maxLength, pattern, format")
    for key in _SCHEMA_MAPS:
        for name, sub in (node.get(key) or {}).items() if isinstance(node.get(key), dict) else ():
            _check_keywords(sub, f"{where}/{key}/{name}")
    for key in _SCHEMA_LISTS:
        for i, sub in enumerate(node.get(key) or ()) if isinstance(node.get(key), list) else ():
            _check_keywords(sub, f"{where}/{key}/{i}")
    for key in _SCHEMA_ONES:  # NOTE: `items` is a list of schemas in drafts before 2020-12
        sub = node.get(key)
        for i, one in enumerate(sub if isinstance(sub, list) else [sub]):
            _check_keywords(one, f"{where}/{key}" + (f"/{i}" if isinstance(sub, list) else ""))
