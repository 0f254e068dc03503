"""The multi-turn driver (posttrain/rollout/multiturn.py): token-in, token-out with the character tokenizer and
with SmolLM2's chat template, the masks, the limits, and single-turn as exactly one plain generate call."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.chat import encode_prompts, render_prompt, stop_token_ids
from posttrain.models.logprobs import response_logprobs
from posttrain.rollout.env import observation_ids
from posttrain.rollout.generate import generate
from posttrain.rollout.multiturn import EpisodeDriver, Prompt, trajectory_metrics
from posttrain.tasks import ArithmeticTask
from tests.rollout.helpers import SCRIPTED, Recorder, likely_to_stop


def rollout(cfg, tokenizer, model, problems, task=None, seed=0):
    recorder = Recorder(model)
    driver = EpisodeDriver.from_config(cfg, tokenizer, task)
    batch = driver.rollout(recorder, problems, generator=torch.Generator().manual_seed(seed))
    return batch, recorder


def check_token_in_token_out(batch, recorder, tokenizer, model, chat: bool) -> int:
    """Every assistant segment is exactly what its turn's generate call sampled, for the exact prefix the batch
    holds before it; every environment segment is its observation encoded once; the masks and log-probs follow.
    Returns the number of environment segments seen."""
    n_env = 0
    for i, traj in enumerate(batch.trajectories):
        prompt = batch.prompt_ids[i, batch.prompt_mask[i].bool()].tolist()
        response = batch.response_ids[i].tolist()
        turn = 0
        for seg in traj["segments"]:
            s, e = seg["start"], seg["end"]
            if seg["role"] == "assistant":
                ids, mask, out = recorder.calls[turn]
                k = sum(1 for j in range(i) if batch.trajectories[j]["turns"] > turn)  # row i's place in that call
                assert ids[k, mask[k].bool()].tolist() == prompt + response[:s]  # conditioned on the trained prefix
                assert response[s:e] == out.response_ids[k, :e - s].tolist()
                assert torch.equal(batch.rollout_logprobs[i, s:e], out.rollout_logprobs[k, :e - s])
                assert (batch.loss_mask[i, s:e] == 1).all()
                turn += 1
            else:
                n_env += 1
                message = {"role": seg["role"], "content": f"turn {turn}"}
                assert response[s:e] == observation_ids(tokenizer, [message], chat)
                assert (batch.loss_mask[i, s:e] == 0).all() and (batch.rollout_logprobs[i, s:e] == 0).all()
            assert (batch.response_mask[i, s:e] == 1).all()
        assert turn == traj["turns"]
        end = traj["segments"][-1]["end"]
        assert (batch.response_mask[i, end:] == 0).all() and (batch.loss_mask[i, end:] == 0).all()
    # the trainer's forward pass on the batch gives the sampler's log-probs on every sampled token (ratio 1)
    logprobs, _ = response_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                    batch.response_mask)
    assert torch.allclose(logprobs * batch.loss_mask, batch.rollout_logprobs, atol=1e-5)
    return n_env


def test_single_turn_is_one_plain_generate_call(make_config, tiny_model, tokenizer, tmp_path):
    cfg = make_config(tmp_path, "rl.max_new_tokens=5")
    task = ArithmeticTask(cfg.task, 0)
    problems = task.train_problems[:6]
    batch, recorder = rollout(cfg, tokenizer, tiny_model, problems)
    ids, mask = encode_prompts(tokenizer, [p.prompt for p in problems])
    plain = generate(tiny_model, ids, mask, max_new_tokens=5, eos_token_id=stop_token_ids(tokenizer),
                     pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(0))
    assert len(recorder.calls) == 1
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "rollout_logprobs", "finished",
                 "loss_mask"):
        assert torch.equal(getattr(batch, name), getattr(plain, name)), name
    assert [t["turns"] for t in batch.trajectories] == [1] * 6
    assert [t["truncated"] is None for t in batch.trajectories] == plain.finished.tolist()
    # bare prompt strings are problems too (callers that pass rendered prompts)
    again, _ = rollout(cfg, tokenizer, tiny_model, [p.prompt for p in problems])
    assert torch.equal(again.response_ids, batch.response_ids)


def test_character_tokenizer_trajectories_are_token_in_token_out(make_config, tiny_model, tokenizer, tmp_path,
                                                                  scripted=SCRIPTED):
    likely_to_stop(tiny_model, tokenizer.eos_token_id)
    cfg = make_config(tmp_path, f"env.name={scripted}", "env.kwargs={turns: 3}", "rl.max_new_tokens=6")
    problems = ArithmeticTask(cfg.task, 0).train_problems[:8]
    batch, recorder = rollout(cfg, tokenizer, tiny_model, problems)
    assert check_token_in_token_out(batch, recorder, tokenizer, tiny_model, chat=False) >= 4
    assert tokenizer.decode(observation_ids(tokenizer, [{"role": "tool", "content": "turn 1"}], False)) == \
        "tool: turn 1\n"
    done = [t for t in batch.trajectories if t["finished"]]
    assert done and all(t["turns"] == 3 and t["truncated"] is None for t in done)
    assert batch.finished.tolist() == [t["finished"] for t in batch.trajectories]


def test_smollm2_chat_template_trajectories_are_token_in_token_out(make_config, stand_in, tmp_path, scripted=SCRIPTED):
    tok = AutoTokenizer.from_pretrained(stand_in)
    model = AutoModelForCausalLM.from_pretrained(stand_in).eval()
    eot = stop_token_ids(tok)[-1]
    likely_to_stop(model, eot, logit=10.0, vocab_from=17)
    cfg = make_config(tmp_path, f"env.name={scripted}", "env.kwargs={turns: 3, role: user}", "rl.max_new_tokens=6")
    problems = [Prompt(render_prompt(tok, f"{a}+{a}=")) for a in range(6)]
    batch, recorder = rollout(cfg, tok, model, problems)
    assert check_token_in_token_out(batch, recorder, tok, model, chat=True) >= 3
    # an observation is the template's own turn, its delimiters as single special tokens, and opens the next turn
    obs = observation_ids(tok, [{"role": "user", "content": "turn 1"}], True)
    assert tok.decode(obs) == "\n<|im_start|>user\nturn 1<|im_end|>\n<|im_start|>assistant\n"
    assert obs.count(tok.convert_tokens_to_ids("<|im_start|>")) == 2
    # a finished trajectory's turns end with the end-of-turn token the template closes an assistant turn with
    for i, traj in enumerate(batch.trajectories):
        for seg in traj["segments"]:
            if seg["role"] == "assistant" and (traj["finished"] or seg is not traj["segments"][-1]):
                assert batch.response_ids[i, seg["end"] - 1] == eot


def test_limits_truncate_and_mark_the_trajectory(make_config, tiny_model, tokenizer, tmp_path, scripted=SCRIPTED):
    likely_to_stop(tiny_model, tokenizer.eos_token_id)
    problems = ArithmeticTask(make_config(tmp_path).task, 0).train_problems[:8]

    def run(*overrides):
        cfg = make_config(tmp_path, f"env.name={scripted}", "rl.max_new_tokens=6", *overrides)
        return rollout(cfg, tokenizer, tiny_model, problems)[0]

    turns = run("env.kwargs={turns: 5}", "env.max_turns=2")
    assert {t["truncated"] for t in turns.trajectories} <= {"max_turns", "max_new_tokens"}
    assert any(t["truncated"] == "max_turns" and t["turns"] == 2 for t in turns.trajectories)
    assert max(t["turns"] for t in turns.trajectories) == 2 and not turns.finished.any()

    calls = run("env.kwargs={turns: 5, tool_calls: 1}", "env.max_tool_calls=1")
    hit = [t for t in calls.trajectories if t["truncated"] == "max_tool_calls"]
    assert hit and all(t["turns"] == 2 and t["tool_calls"] == 2 for t in hit)

    tokens = run("env.kwargs={turns: 5}", "env.max_response_tokens=20")
    assert tokens.response_mask.sum(-1).max() <= 20
    assert any(t["truncated"] == "max_response_tokens" for t in tokens.trajectories)
    assert all(t["truncated"] is not None for t in tokens.trajectories)  # 5 turns never fit in 20 tokens

    metrics = trajectory_metrics(tokens.trajectories)
    shares = sum(metrics[f"env/truncated_{why}"] for why in ("max_new_tokens", "max_turns", "max_tool_calls",
                                                             "max_response_tokens"))
    assert shares == pytest.approx(1.0) and metrics["env/turns"] == pytest.approx(
        sum(t["turns"] for t in tokens.trajectories) / 8)


def test_long_observations_are_cut_with_a_note(make_config, tiny_model, tokenizer, tmp_path):
    from posttrain.rollout.env import cut_message

    cut = cut_message({"role": "tool", "content": "x" * 100}, 16)
    assert cut["content"] == "x" * 16 + "... [84 more characters cut]"
    assert cut_message({"role": "tool", "content": 7}, 16)["content"] == "7"


def test_trajectory_records_follow_the_rows_through_select_and_cat():
    from posttrain.batch import RolloutBatch, Trajectories, cat_padded

    def batch(n, width, first):
        return RolloutBatch(torch.ones(n, 2, dtype=torch.long), torch.ones(n, 2, dtype=torch.long),
                            torch.arange(n * width).view(n, width), torch.ones(n, width), torch.zeros(n, width),
                            torch.ones(n, dtype=torch.bool), trajectories=Trajectories({"row": first + i}
                                                                                       for i in range(n)))

    a, b = batch(3, 2, 0), batch(2, 4, 3)
    both = cat_padded([a, b], pad_token_id=0)
    assert [t["row"] for t in both.trajectories] == [0, 1, 2, 3, 4] and both.response_ids.shape == (5, 4)
    picked = both.select(torch.tensor([4, 0]))
    assert [t["row"] for t in picked.trajectories] == [4, 0] and picked.response_ids[0].tolist() == [4, 5, 6, 7]
    assert [t["row"] for t in both.select(torch.tensor([True, False, True, False, False])).trajectories] == [0, 2]
    assert [t["row"] for t in both.select(slice(1, 3)).trajectories] == [1, 2]
    assert both.trajectories[torch.tensor(3)] == {"row": 3} and both.trajectories.to("cpu") is both.trajectories
    assert cat_padded([a, RolloutBatch(*[getattr(b, f) for f in ("prompt_ids", "prompt_mask", "response_ids",
                                                                 "response_mask", "rollout_logprobs", "finished")])],
                      0).trajectories is None  # a part without records: none for the whole
