"""A training run killed with SIGKILL at random points and resumed each time ends bit for bit where an
uninterrupted run ends (final weights; metrics.jsonl without timings). benchmarks/kill_resume.py does 20."""

import pytest

from tests.kill_resume_harness import kill_and_resume

pytestmark = pytest.mark.slow  # tens of seconds to minutes: `pytest -m "not slow"` skips it (make test runs all)


def test_sigkill_five_times_then_resume_equals_straight_run(tmp_path):
    result = kill_and_resume(tmp_path, kills=5, seed=0, log=lambda *_: None)
    assert result["kills"] == 5
    assert result["equal_weights"], result
    assert result["equal_metrics"], result
