from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Deterministic property tests: the same examples on every run, no flaky deadlines on a
# loaded 2-core CI machine.
settings.register_profile(
    "sealtrail",
    derandomize=True,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("sealtrail")

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT.parent / "shared" / "vectors"


@pytest.fixture(scope="session")
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"conformance vectors not found at {VECTORS} (../shared must sit beside the checkout)")
    return VECTORS
