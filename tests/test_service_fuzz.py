"""The reward service fuzzed from its own OpenAPI document (schemathesis), on a real ``cmerl serve`` process.

For every operation in ``GET /openapi.json``, schema-valid (positive) and schema-violating (negative)
requests are generated; every answer must be no 5xx, have a documented status and content type, match
the documented response schema, and, for negative requests, be refused with a 4xx. Afterwards the
server is still up and answers a normal request exactly as before. Bounded: ``CMERL_FUZZ_EXAMPLES``
examples per operation and mode (default 20, derandomized, so a CI run is reproducible), about 20 s.
"""

from __future__ import annotations

import os
from collections import Counter

import httpx
import pytest
from _reliability import record

pytest_plugins = ["_server_fixtures"]

EXAMPLES = int(os.environ.get("CMERL_FUZZ_EXAMPLES", "20"))


def test_schema_fuzzing_finds_no_server_error(tiny_server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis import checks as sc

    url = tiny_server.url
    reference = httpx.post(f"{url}/score", json={"items": [{"prompt": "Hi", "response": "Hello there."}]},
                           timeout=30).json()
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    base_checks = [sc.not_a_server_error, sc.status_code_conformance, sc.content_type_conformance,
                   sc.response_schema_conformance]
    tried: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /score", "POST /get_reward", "POST /v1/completions", "POST /tokenize", "GET /v1/models",
        "GET /health", "GET /metrics"}
    import requests

    with requests.Session() as session:
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                checks = base_checks + ([sc.negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])
                label = f"{op.method.upper()} {op.path} ({mode.value})"

                fuzz = _fuzzer(op, mode, checks, label, url, session, tried, statuses)
                try:
                    fuzz()
                except Unsatisfiable:  # no schema-violating request exists (a GET without parameters)
                    assert mode == GenerationMode.NEGATIVE and op.method.upper() == "GET", label
                    continue
                except Exception:
                    record("reward service (schemathesis)", label, tried[label], 1)
                    raise
                codes = sorted((k.split()[-1], v) for k, v in statuses.items() if k.startswith(f"{label} "))
                record("reward service (schemathesis)", label, tried[label], 0,
                       ", ".join(f"{v}x {c}" for c, v in codes))
    assert sum(tried.values()) >= len(operations) * 2  # every operation was exercised in both modes
    # Still up, and still scoring exactly as before the fuzzing.
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    again = httpx.post(f"{url}/score", json={"items": [{"prompt": "Hi", "response": "Hello there."}]},
                       timeout=30).json()
    assert again["scores"] == reference["scores"]
    assert "Traceback" not in tiny_server.output()



def _fuzzer(op, mode, checks, label, url, session, tried, statuses):
    """A hypothesis test sending ``EXAMPLES`` generated requests for one operation and mode."""
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def fuzz(case) -> None:
        response = case.call(base_url=url, session=session, timeout=60)
        tried[label] += 1
        statuses[f"{label} {response.status_code}"] += 1
        case.validate_response(response, checks=checks)

    return fuzz
