"""A training run killed with SIGKILL at random points and resumed each time ends bit for bit where an
uninterrupted run ends (final weights; metrics.jsonl without timings). benchmarks/kill_resume.py does 20."""

import importlib.util
from pathlib import Path


def test_sigkill_five_times_then_resume_equals_straight_run(tmp_path):
    spec = importlib.util.spec_from_file_location("kill_resume", Path(__file__).parents[1] / "benchmarks" / "kill_resume.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.kill_and_resume(tmp_path, kills=5, seed=0, log=lambda *_: None)
    assert result["kills"] == 5
    assert result["equal_weights"], result
    assert result["equal_metrics"], result
