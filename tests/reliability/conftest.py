"""Shared settings of the reliability tests: deterministic fuzzing and a hang guard."""

import faulthandler
import sys

import pytest

hypothesis = pytest.importorskip("hypothesis")

# Derandomized: the same examples on every run and machine (CI is deterministic); no example
# database. The example counts are in the tests (fuzz_seeds.examples, scaled by MOON3_FUZZ_SCALE).
hypothesis.settings.register_profile(
    "moon3-fuzz",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large],
)

HANG_S = 240  # far above any test here; a hang dumps every thread's stack and ends the run


@pytest.fixture(autouse=True)
def hang_guard():
    """A test that deadlocks or spins is killed with a traceback instead of stalling CI."""
    faulthandler.dump_traceback_later(HANG_S, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()
