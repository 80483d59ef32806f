"""Long or heavy runs: `pytest -m stress` (not part of the default test command)."""

from __future__ import annotations

import pytest

from corral import Sandbox

pytestmark = pytest.mark.stress


def test_100_sandboxes_at_once_each_answer_exec(daemon, busybox):
    made: list[Sandbox] = []
    try:
        for _ in range(100):
            made.append(Sandbox.create(template=busybox, resources={"memory_mib": 64}))
        assert sum(1 for s in Sandbox.list() if s.status == "running") >= 100
        for sb in made:
            assert sb.commands.run(f"echo {sb.id}").stdout == f"{sb.id}\n"
    finally:
        for sb in made:
            sb.kill()
