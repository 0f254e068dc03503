"""rl.speculative=ngram reaches the rollout engine (posttrain/rl/workers.py make_engine) and the RL loop trains on
its samples with the first minibatch's ratio at 1 (the log-probs it returns are the policy's); every step's
metrics carry the decoder's acceptance (rollout/spec_*), the ratios of the counts summed over every generate call
of the step, in this process and in the Ray layout (InlineRoles.like_ray, the batches pickled as Ray sends them);
without speculation the keys are absent."""

import pickle

import pytest
import torch

from posttrain.batch import left_pad
from posttrain.errors import ConfigError
from posttrain.rl.loop import RLRun
from posttrain.rl.roles import InlineRoles
from posttrain.rollout import engines, speculative
from posttrain.tasks.arithmetic import ArithmeticTask
from tests.rollout.helpers import likely_to_stop

SPEC_KEYS = ("rollout/spec_accepted_per_pass", "rollout/spec_acceptance", "rollout/spec_tokens_per_pass")


def repeater(model):
    """The tiny Llama made to mostly repeat its last token (the blocks' outputs scaled down, the head 10x the
    embeddings), so prompt lookup's drafts are accepted often but not always (about 3 in 4 on these prompts)."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.1)
            layer.mlp.down_proj.weight.mul_(0.1)
        model.lm_head.weight.copy_(10.0 * model.model.embed_tokens.weight)
    return model


def record_calls(monkeypatch) -> list[dict]:
    """Every speculative_generate call the rollout engines make from now on: its keyword arguments, with `stats`
    filled by the call itself (the direct counts the step's metrics must agree with)."""
    calls = []
    spec = speculative.speculative_generate

    def recorded(*a, **k):
        calls.append({**k, "stats": {}})
        return spec(*a, **{**k, "stats": calls[-1]["stats"]})

    monkeypatch.setattr(engines, "speculative_generate", recorded)
    return calls


def check_step(metrics: dict, calls: list[dict], k: int) -> dict:
    """The step's rollout/spec_* are the ratios of its calls' summed stats, and in range."""
    total = {key: sum(c["stats"][key] for c in calls) for key in ("rows", "row_passes", "drafted", "accepted", "tokens")}
    assert 0 < total["accepted"] < total["drafted"]  # some drafts accepted, some rejected
    expected = {"rollout/spec_accepted_per_pass": total["accepted"] / total["row_passes"],
                "rollout/spec_acceptance": total["accepted"] / total["drafted"],
                "rollout/spec_tokens_per_pass": (total["tokens"] - total["rows"]) / total["row_passes"]}
    assert {key: metrics[key] for key in SPEC_KEYS} == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(speculative.speculative_metrics(total))
    assert 0 <= metrics["rollout/spec_acceptance"] <= 1
    assert 0 <= metrics["rollout/spec_accepted_per_pass"] <= k
    assert 1 <= metrics["rollout/spec_tokens_per_pass"] <= 1 + metrics["rollout/spec_accepted_per_pass"] + 1e-12
    return total


def test_speculative_rollouts_train_with_the_ratio_at_one_and_log_acceptance(make_config, tiny_model, tokenizer,
                                                                             tmp_path, monkeypatch):
    calls = record_calls(monkeypatch)
    cfg = make_config(tmp_path, "rl.speculative=ngram", "rl.speculative_tokens=3", "rl.speculative_ngram=1",
                      "rl.max_new_tokens=8")
    run = RLRun.local(cfg, repeater(tiny_model), tokenizer, ArithmeticTask(cfg.task, cfg.seed))
    for _ in range(2):
        calls.clear()
        metrics = run.step()
        assert metrics["first_log_ratio_max"] <= cfg.rl.ratio_tolerance
        assert len(calls) == 1 and calls[0]["draft_tokens"] == 3 and calls[0]["ngram"] == 1
        total = check_step(metrics, calls, k=3)
        assert total["rows"] == cfg.rl.prompts_per_step * cfg.rl.group_size


def test_a_multi_turn_step_sums_every_turn(make_config, tiny_model, tokenizer, tmp_path, monkeypatch):
    """The reflection environment: a trajectory that ends its turn gets feedback and a second turn, one more
    generate call; its counts are summed over its turns (`rows` counts the calls it was in)."""
    calls = record_calls(monkeypatch)
    likely_to_stop(repeater(tiny_model), tokenizer.eos_token_id, logit=5.0)
    cfg = make_config(tmp_path, "env.name=reflection", "env.kwargs={feedback: wrong}", "rl.max_new_tokens=6",
                      "rl.speculative=ngram", "rl.speculative_tokens=3", "rl.speculative_ngram=1")
    metrics = RLRun.local(cfg, tiny_model, tokenizer, ArithmeticTask(cfg.task, cfg.seed)).step()
    assert len(calls) >= 2 and metrics["env/turns"] > 1.2  # a call per turn of the rows still going
    total = check_step(metrics, calls, k=3)
    assert total["rows"] == pytest.approx(metrics["env/turns"] * cfg.rl.prompts_per_step * cfg.rl.group_size)


def test_without_speculation_the_keys_are_absent(make_config, tiny_model, tokenizer, tmp_path):
    cfg = make_config(tmp_path, "rl.steps=1")
    metrics = RLRun.local(cfg, tiny_model, tokenizer, ArithmeticTask(cfg.task, cfg.seed)).step()
    assert "env/turns" in metrics and not [key for key in metrics if key.startswith("rollout/spec")]


def test_the_ray_layout_sums_the_shares_and_rounds(make_config, tiny_model, tokenizer, tmp_path, monkeypatch):
    """Two rollout workers, each with its own engine, and dynamic sampling's rounds (the tiny model's groups all
    score 0, so every round is spent): the step's metrics sum every call's counts. Each share comes back
    pickled, as from a Ray actor, so the counts can only have travelled with the batch."""
    calls = record_calls(monkeypatch)
    cfg = make_config(tmp_path, "rl.speculative=ngram", "rl.speculative_tokens=2", "rl.speculative_ngram=1",
                      "rl.max_new_tokens=8", "rl.dynamic_sampling=true", "rl.dynamic_sampling_max_rounds=2",
                      "ray.num_rollout_workers=2", "ray.num_learners=1")
    task = ArithmeticTask(cfg.task, cfg.seed)
    roles = InlineRoles.like_ray(cfg, repeater(tiny_model), tokenizer, task)
    for worker in roles.rollout_workers.workers:
        worker.generate = lambda *a, generate=worker.generate: pickle.loads(pickle.dumps(generate(*a)))
    run = RLRun.create(cfg, roles, task)
    metrics = run.step()
    assert metrics["ds_rounds"] == 2 and len(calls) == 4  # 2 rounds x 2 shares
    total = check_step(metrics, calls, k=2)
    assert total["rows"] == 2 * cfg.rl.prompts_per_step * cfg.rl.group_size


def test_the_rows_counts_sum_to_the_stats_and_plain_decoding_counts_no_gain(tiny_model, tokenizer):
    """speculative_generate's per-row DecodeCounts (what travels with the batch) sum to its `stats`; a model the
    lean forward does not cover decodes with generate and counts one pass per token after the first, no drafts."""
    from transformers import GPT2Config, GPT2LMHeadModel

    ids, mask = left_pad([tokenizer.encode(p) for p in ("12+7=", "3+3=", "11+11=", "5+9=")], tokenizer.pad_token_id)
    kw = {"max_new_tokens": 8, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
          "generator": torch.Generator().manual_seed(0), "draft_tokens": 3, "ngram": 1}
    stats: dict = {}
    out = speculative.speculative_generate(repeater(tiny_model), ids, mask, stats=stats, **kw)
    assert len(out.decode_counts) == 4 and out.select(torch.tensor([2, 0])).decode_counts[1] == out.decode_counts[0]
    assert {**speculative.sum_counts(out.decode_counts), "passes": stats["passes"]} == stats
    assert [c["tokens"] for c in out.decode_counts] == out.response_lengths.tolist()
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                      pad_token_id=tokenizer.pad_token_id)).eval()
    plain: dict = {}
    out = speculative.speculative_generate(gpt2, ids, mask, stats=plain, **kw)
    assert [c["row_passes"] for c in out.decode_counts] == (out.response_lengths - 1).tolist()
    assert plain["drafted"] == plain["accepted"] == 0
    assert speculative.speculative_metrics(plain) == {"rollout/spec_accepted_per_pass": 0.0,
                                                      "rollout/spec_acceptance": 0.0,
                                                      "rollout/spec_tokens_per_pass": 1.0}


def test_speculative_with_the_vllm_engine_is_refused(make_config, tmp_path):
    with pytest.raises(ConfigError, match="rl.speculative"):
        make_config(tmp_path, "backend=ray", "ray.engine=vllm", "rl.speculative=ngram")
