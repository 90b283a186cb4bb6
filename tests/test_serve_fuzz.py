"""Schema fuzzing: schemathesis generates requests for every route of the service's own OpenAPI
document (valid and invalid bodies: JSON and multipart, query, headers) and checks each answer:
no 5xx, no traceback in any body, the status documented, the body valid against the documented
schema and content type (the documented examples are valid requests: their 200 answers, streamed
ones too, are checked the same way); afterwards /health is still 200 and a real caption is still served.
Bounded: a fixed number of examples per route and mode, and a time limit for the whole run."""
from __future__ import annotations

import time

import pytest

from .conftest import make_model_dir
from .serve_support import b64, build, jpeg_bytes, serve_in_thread

EXAMPLES = 25  # per route and generation mode
BUDGET_S = 25.0  # the whole run; past it the remaining routes are not fuzzed and the test fails


@pytest.mark.slow
def test_every_route_survives_schema_fuzzing(tmp_path):
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (content_type_conformance, response_headers_conformance,
                                                   response_schema_conformance, status_code_conformance)

    from paddle_caption.predict.predictor import load_predictor
    from paddle_caption.serve.service import ServiceLimits

    def no_traceback(ctx, response, case):
        text = response.content.decode("utf-8", "replace")
        assert "Traceback" not in text and 'File "' not in text, f"a traceback in the body: {text[:300]}"
        return True

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
              response_schema_conformance, no_traceback]
    # small limits: a generated request that happens to be valid stays cheap
    limits = ServiceLimits(max_tokens_cap=8, default_max_tokens=4, max_num_beams=2, max_n=2, request_timeout_s=20)
    _, _, app = build(load_predictor(make_model_dir(tmp_path / "model")), limits)
    start, ran, statuses = time.monotonic(), {}, {}
    with serve_in_thread(app) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        paths = {op.path for op in operations}
        assert {"/v1/chat/completions", "/v1/captions", "/v1/models", "/health", "/metrics"} <= paths
        captions = next(op for op in operations if op.path == "/v1/captions")
        assert {"application/json", "multipart/form-data"} <= set(captions.definition.raw["requestBody"]["content"])

        for op in operations:
            takes_input = "requestBody" in op.definition.raw or op.definition.raw.get("parameters")
            # a route without input has no invalid request to generate
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if takes_input else (GenerationMode.POSITIVE,):
                assert time.monotonic() - start < BUDGET_S, f"fuzzing over {BUDGET_S} s; done: {ran}"

                @given(case=op.as_strategy(generation_mode=mode))
                @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                          phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=list(HealthCheck))
                def fuzz(case):
                    response = case.call_and_validate(base_url=url, checks=checks, timeout=30)
                    statuses.setdefault(op.path, set()).add(response.status_code)

                fuzz()
                ran[f"{op.method.upper()} {op.path} {mode.value}"] = EXAMPLES
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("/health").status_code == 200
            r = client.post("/v1/captions", json={"image": b64(jpeg_bytes(1)), "max_new_tokens": 2})
            assert r.status_code == 200 and r.json()[0]["tokens"] == 2
    assert len(ran) >= len(operations) + 2  # every route, and invalid bodies for both POST routes
    # the documented examples are valid requests: answered 200 (streamed too) and checked like the rest
    assert 200 in statuses["/v1/chat/completions"] and 200 in statuses["/v1/captions"]
    assert 400 in statuses["/v1/chat/completions"] and 400 in statuses["/v1/captions"], statuses
