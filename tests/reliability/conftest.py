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

HANG_S = 240  # far above any default test here; a hang dumps every thread's stack and ends the run
HANG_SLOW_S = 3 * 3600  # tests marked slow (the 100k soak)


@pytest.fixture(autouse=True)
def hang_guard(request):
    """A test that deadlocks or spins is killed with a traceback instead of stalling CI."""
    limit = HANG_SLOW_S if request.node.get_closest_marker("slow") else HANG_S
    faulthandler.dump_traceback_later(limit, exit=True, file=sys.stderr)
    yield
    faulthandler.cancel_dump_traceback_later()
