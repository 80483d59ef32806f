"""Fixtures for escape tests: one shared sandbox per module, host canaries."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.escape.escape_support import HostCanary, start_host_canary


@pytest.fixture(scope="module")
def shared_sb(daemon, base) -> Iterator[object]:  # type: ignore[no-untyped-def]
    """One sandbox for the attacks of a module that leave nothing behind for the next test."""
    from corral import Sandbox

    sb = Sandbox.create(template=base)
    yield sb
    sb.kill()


@pytest.fixture
def host_canary() -> Iterator[HostCanary]:
    c = start_host_canary()
    yield c
    c.stop()
