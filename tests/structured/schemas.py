"""JSON schemas for structured-output tests: nested objects, arrays, enums, bounded
numbers, optional fields, $defs references, anyOf. Bounded so tiny random models finish."""

NESTED = {"type": "object", "properties": {
    "user": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                              "id": {"type": "integer", "minimum": 0, "maximum": 999}},
             "required": ["name", "id"]}}, "required": ["user"]}
ARRAY = {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 4}
ENUM_OPTIONAL = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                                  "note": {"type": "string", "maxLength": 4},
                                                  "ok": {"type": "boolean"}},
                 "required": ["color"]}
BOUNDED_NUMBER = {"type": "object", "properties": {"x": {"type": "number", "minimum": -1.5, "maximum": 2.5},
                                                   "n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20}},
                  "required": ["x", "n"]}
DEFS = {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                          "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["x", "y"]}},
        "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"},
                                         "path": {"type": "array", "items": {"$ref": "#/$defs/pt"}, "maxItems": 2}},
        "required": ["a", "path"]}
ANY_OF = {"anyOf": [{"type": "boolean"}, {"type": "null"}, {"type": "string", "maxLength": 3},
                    {"type": "array", "items": {"const": 7}, "maxItems": 2}]}

SCHEMAS = {"nested": NESTED, "array": ARRAY, "enum_optional": ENUM_OPTIONAL, "bounded_number": BOUNDED_NUMBER,
           "defs": DEFS, "any_of": ANY_OF}
