import os
import sys
import zlib

import pytest
import torch
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

# Hypothesis profiles (tests/test_properties.py). "ci", the default: a fixed
# seed (derandomize) and a bounded number of examples, so every run draws the
# same examples and the suite's time is bounded; no example database is written.
# "dev": more examples from a fresh seed each run, to hunt for new failures:
#   HYPOTHESIS_PROFILE=dev .venv/bin/python -m pytest tests/test_properties.py
# A failure prints the drawn configuration and a @reproduce_failure blob.
_slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None, database=None,
                          print_blob=True, suppress_health_check=_slow_ok)
settings.register_profile("dev", max_examples=1000, deadline=None, print_blob=True,
                          suppress_health_check=_slow_ok)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed_each_test(request):
    """Every test starts from torch's RNG seeded by its own id, so its random
    inputs are the same in every run and whatever ran before it: without this,
    a test that draws without seeding drew from the state earlier tests left,
    and a float32 comparison failed in one order of the files and passed in
    another (an Elman relu h_n of max 3e-4, 1 in 3000 draws). Tests that seed
    themselves still do."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


# `make sanitize` names the folder its sanitized build lies in: the tests must
# not silently run against another rnnkern._C (the in-place build).
_expected_c = os.environ.get("RNNKERN_EXPECT_C_IN")
if _expected_c:
    import rnnkern._C

    if not os.path.abspath(rnnkern._C.__file__).startswith(_expected_c):
        raise RuntimeError(f"RNNKERN_EXPECT_C_IN={_expected_c} but rnnkern._C is "
                           f"{rnnkern._C.__file__}")
