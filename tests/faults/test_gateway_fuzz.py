"""Hypothesis-driven requests to every REST gateway route (paper routes and /api/v1):
random path parameters (including real ids), query strings, bodies (JSON of any shape, raw
bytes, blobs that are nearly right) and credentials (none, garbage, a client's, another
client's, the operator's). No answer is a 500: a refusal is a 4xx with a JSON reason (503/504
only if the bus or orchestrator is slow), and the gateway still serves a good client after.

Embedded (SQLite, in-process bus, the real orchestrator service): see gateway_env.py."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.codec import Encoding, encode
from tests.faults.support import REPORT_ENV
from tests.integration.gateway_env import OPERATOR, GatewayEnv, gateway_env

pytestmark = [pytest.mark.faults, pytest.mark.timeout(240)]

EXAMPLES = int(os.environ.get("FEDMQ_GATEWAY_FUZZ_EXAMPLES", "300"))
PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


def _routes(env: GatewayEnv) -> list[tuple[str, str]]:
    """(method, path template) of every documented route, from the OpenAPI schema."""
    paths = env.http.app.openapi()["paths"]  # type: ignore[attr-defined]
    return sorted((m.upper(), p) for p, ops in paths.items() for m in ops)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)


def test_no_gateway_route_answers_500_to_anything(tmp_path: Path) -> None:
    with gateway_env(tmp_path) as env:
        cid, auth = env.register("fuzz-a")
        other, other_auth = env.register("fuzz-b")
        routes = _routes(env)
        assert len(routes) >= 15, routes
        base = env.base
        near = {
            "delta": encode(
                {k: v + 0.01 for k, v in base.items()}, Encoding.BF16, base=base, base_version="0"
            ),
            "wrong shape": encode({"l1.weight": base["l1.weight"][:2]}, Encoding.FP32),
            "garbage": b"FMQT\x01" + b"\xff" * 64,
        }
        auths = {
            "none": {},
            "garbage": {"Authorization": "Bearer " + "x" * 40},
            "not bearer": {"Authorization": "Basic Zm9vOmJhcg=="},
            "client": auth,
            "other": other_auth,
            "operator": {"Authorization": f"Bearer {OPERATOR}"},
            "huge": {"Authorization": "Bearer " + "y" * 16_000, "X-Pad": "z" * 16_000},
        }
        values = st.sampled_from(
            [
                cid,
                other,
                env.run_id,
                "0",
                "1",
                "-1",
                "99999999999999999999",
                "nobody",
                "..",
                "%00",
                "a" * 300,
            ]
        ) | st.text(max_size=20)
        statuses: dict[int, int] = {}

        @settings(
            max_examples=EXAMPLES,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(
            route=st.sampled_from(routes),
            data=st.data(),
            who=st.sampled_from(sorted(auths)),
            body=st.none()
            | JSON.map(lambda j: json.dumps(j).encode())
            | st.binary(max_size=300)
            | st.sampled_from(sorted(near)).map(near.__getitem__),
            query=st.dictionaries(
                st.sampled_from(
                    ["round", "num_samples", "metrics", "wait", "after", "since", "version", "x"]
                ),
                st.text(max_size=12) | st.integers().map(str),
                max_size=3,
            ),
        )
        def call(
            route: tuple[str, str],
            data: st.DataObject,
            who: str,
            body: bytes | None,
            query: dict[str, str],
        ) -> None:
            method, template = route
            path = PARAM.sub(
                lambda m: quote(str(data.draw(values, label=m.group(1))), safe=""), template
            )
            headers: dict[str, Any] = dict(auths[who])
            if body is not None:
                headers["Content-Type"] = data.draw(
                    st.sampled_from(["application/json", "application/octet-stream", "text/x"])
                )
            res = env.http.request(method, path, params=query, content=body, headers=headers)
            statuses[res.status_code] = statuses.get(res.status_code, 0) + 1
            assert res.status_code != 500, (method, path, query, who, res.text)
            if res.status_code >= 400:
                answer = res.json()
                assert answer["status"] == res.status_code and answer["reason"], answer

        call()
        # Still serving: a fresh client registers and signals ready.
        _, fresh = env.register("after-fuzz")
        res = env.http.post("/client/signal", json={"state": "ready"}, headers=fresh)
        assert res.status_code == 202, res.text
        assert not any(s >= 500 and s not in (503, 504) for s in statuses), statuses
    path = os.environ.get(REPORT_ENV)
    if path:
        detail = (
            f"{EXAMPLES} hypothesis-generated requests over {len(routes)} gateway routes "
            f"(method x path); answers by status: {dict(sorted(statuses.items()))}; no 500"
        )
        with Path(path).open("a") as f:
            f.write(json.dumps({"scenario": "bad input: gateway", "detail": detail}) + "\n")
