"""rl.speculative=ngram reaches the rollout engine (posttrain/rl/workers.py make_engine) and the RL loop trains on
its samples with the first minibatch's ratio at 1 (the log-probs it returns are the policy's)."""

import pytest

from posttrain.errors import ConfigError
from posttrain.rl.loop import RLRun
from posttrain.rollout import engines, speculative
from posttrain.tasks.arithmetic import ArithmeticTask


def test_speculative_rollouts_train_with_the_ratio_at_one(make_config, tiny_model, tokenizer, tmp_path, monkeypatch):
    calls = []
    spec = speculative.speculative_generate
    monkeypatch.setattr(engines, "speculative_generate", lambda *a, **k: calls.append(k) or spec(*a, **k))
    cfg = make_config(tmp_path, "rl.speculative=ngram", "rl.speculative_tokens=3", "rl.speculative_ngram=2",
                      "rl.max_new_tokens=8")
    run = RLRun.local(cfg, tiny_model, tokenizer, ArithmeticTask(cfg.task, cfg.seed))
    for _ in range(2):
        metrics = run.step()
        assert metrics["first_log_ratio_max"] <= cfg.rl.ratio_tolerance
    assert calls and calls[0]["draft_tokens"] == 3 and calls[0]["ngram"] == 2


def test_speculative_with_the_vllm_engine_is_refused(make_config, tmp_path):
    with pytest.raises(ConfigError, match="rl.speculative"):
        make_config(tmp_path, "backend=ray", "ray.engine=vllm", "rl.speculative=ngram")
