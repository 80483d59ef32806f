"""Unit tests: pure and fast (no root, no daemon, no network)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# No example database: it would write .hypothesis/ into the checkout. No deadline: the development
# machines share their two cores with other work, and a slow example is not a failure.
settings.register_profile("corral", database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("corral")
