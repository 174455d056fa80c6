"""`lightspeed generate --json-schema FILE` (and --regex / --choice): valid output, clean errors."""
import json

import jsonschema

from lightspeed.cli import main

from tests.structured.schemas import SCHEMAS
from tests.test_cli import run_cli
from tests.tiny import make_tiny_checkpoint


def test_generate_json_schema_file_and_errors(tmp_path, capsys):
    make_tiny_checkpoint(tmp_path / "m", "llama")
    model = ["--model", str(tmp_path / "m"), "--device", "cpu"]
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["nested"]))
    r = run_cli("generate", "user:", *model, "--max-tokens", "48", "--json", "--json-schema", str(schema),
                "--speculative", "ngram")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["finish_reason"] in ("stop", "length")
    if out["finish_reason"] == "stop":
        jsonschema.validate(json.loads(out["text"]), SCHEMAS["nested"])

    # in process (no model load for these): one line on stderr, exit status 2
    schema.write_text('{"type": "object", "properties": {"a": {"type": "string", "minLength": "x"}}}')
    capsys.readouterr()
    for args in (["--json-schema", str(schema)], ["--json-schema", str(tmp_path / "missing.json")],
                 ["--regex", "a", "--choice", "a"], ["--json-object", "--json-schema", str(schema)]):
        assert main(["generate", "hi", *model, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("\n") == 1, err
