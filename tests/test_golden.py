"""The fast golden check: every registered method, on two tiny digits tasks in float64, gives exactly the accuracy
matrix, GFLOPs and parameters stored in tests/golden.json (benchmarks/validation/parity.py `golden`). A change that
moves a number fails here; one meant to do so rewrites the file (`python -m benchmarks.validation.parity golden
--write`) and says so in its commit."""
import json

import pytest

from benchmarks.validation.parity import GOLDEN, golden_record
from methods import METHODS

with open(GOLDEN) as _f:
    STORED = json.load(_f)


@pytest.mark.parametrize("method", METHODS.keys())
def test_the_numbers_are_the_stored_ones(method, tmp_path):
    assert method in STORED, f"no golden numbers for {method}: python -m benchmarks.validation.parity golden --write"
    measured = golden_record(method, str(tmp_path))
    stored = STORED[method]
    assert measured["acc_matrix"] == stored["acc_matrix"]
    assert measured["params"] == stored["params"]
    assert measured["gflops"] == pytest.approx(stored["gflops"], rel=1e-9)
