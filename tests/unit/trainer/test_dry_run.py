"""The arithmetic behind the dry-run checks (trainer/dry_run.py): OLMoE's parameter counts by hand, the numbers
tests/integration/test_dry_run.py expects the fake-backend dry runs to print."""
from __future__ import annotations

from tests.moe_helpers import OLMOE_1B_7B, OLMOE_232B


def test_olmoe_flavor_arithmetic():
    """The hand-written shapes of tests/moe_helpers.py give these counts (the dry run prints the model's own count,
    and tests/integration/test_dry_run.py checks it against them per case)."""
    # 16 x (64 x 6,291,456 + 16,916,480) + 2 x 103,022,592 + 2,048
    assert OLMOE_1B_7B.expert == 6_291_456 and OLMOE_1B_7B.dense_layer == 16_916_480
    assert OLMOE_1B_7B.total == 6_919_161_856
    # 94 x (128 x 18,874,368 + 38,285,824) + 2 x 622,329,856 + 4,096
    assert OLMOE_232B.expert == 18_874_368 and OLMOE_232B.dense_layer == 38_285_824
    assert OLMOE_232B.total == 231_939_927_040
