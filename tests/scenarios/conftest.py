"""The ``stack`` fixture: every scenario runs once per stack of tests/scenarios/stack.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.scenarios.stack import STACKS, Stack

# The full stack needs RabbitMQ and Postgres: marked integration, so that it is skipped
# where they are missing (and fails under CI=true), as every integration test is.
_PARAMS = [
    pytest.param(name, id=name, marks=[pytest.mark.integration] if needs else [])
    for name, (needs, _) in STACKS.items()
]


@pytest.fixture(params=_PARAMS)
def stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stack]:
    needs, factory = STACKS[request.param]
    args = [request.getfixturevalue(name) for name in needs]
    with factory(*args, tmp_path) as s:
        yield s
