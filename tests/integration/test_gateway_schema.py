"""schemathesis against the gateway's served OpenAPI: whatever it generates, the gateway
answers without a 5xx and as its schema says (a bounded number of examples per route, with
a client's token, the operator's, or none)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.gateway_env import OPERATOR, gateway_env

pytestmark = [pytest.mark.timeout(120)]

EXAMPLES = 8  # per route


def test_generated_requests_get_no_5xx_and_answers_that_match_the_schema(tmp_path: Path) -> None:
    with gateway_env(tmp_path) as env:
        cid, auth = env.register("fuzz")
        tokens = itertools.cycle([auth["Authorization"], f"Bearer {OPERATOR}", None])
        real = itertools.cycle([True, False])  # half the cases name the real run and client
        known = {"run_id": env.run_id, "client_id": cid, "name": cid, "version": 0}
        schema = schemathesis.openapi.from_asgi("/openapi.json", env.http.app)
        failures: list[str] = []
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 19

        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: schemathesis.Case) -> None:
                token = next(tokens)
                if next(real) and case.path_parameters:
                    for key in case.path_parameters.keys() & known.keys():
                        case.path_parameters[key] = known[key]
                case.call_and_validate(
                    headers={"Authorization": token} if token else {},
                    checks=[
                        not_a_server_error,
                        status_code_conformance,
                        response_schema_conformance,
                    ],
                )

            try:
                check()
            except Exception as e:  # collect every route's failure, not just the first
                failures.append(f"{operation.label}: {e}")
        assert not failures, "\n\n".join(failures)
