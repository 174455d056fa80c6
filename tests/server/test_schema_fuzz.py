"""Schemathesis against the server's own OpenAPI schema (bounded: a fixed number of
examples per operation, derandomized): no 5xx, and every response matches the schema."""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from tests.server.conftest import Server


@pytest.fixture(scope="module")
def fuzz_server(tiny_model):
    s = Server(tiny_model, "--max-model-len", "64", "--max-choices-per-request", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_server_error_and_responses_match_the_schema(case, fuzz_server):
    case.call_and_validate(base_url=fuzz_server.url, checks=[not_a_server_error, response_schema_conformance],
                           timeout=60)
