"""`env.name: tools` (posttrain/rollout/tools.py) through the real driver (posttrain/rollout/multiturn.py) with a
scripted sampler: the prompt carries the tool list, tool results come back as environment tokens outside the loss
mask, and every failure (bad JSON, unknown tool, raise, timeout, 10 MB) is an error message the trajectory goes on
after. With the character tokenizer and with SmolLM2's chat template."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from posttrain.batch import RolloutBatch, right_pad
from posttrain.config import EnvConfig
from posttrain.models import build_char_tokenizer
from posttrain.models.chat import render_prompt, stop_token_ids
from posttrain.rollout.env import EnvContext, env_factory
from posttrain.rollout.multiturn import EpisodeDriver, Prompt
from posttrain.rollout.tools import ToolEnvironment, split_rendering
from tests.conftest import SMOLLM2_TOKENIZER

TOOLS_FILE = '''
import time

def slow(seconds: float) -> str:
    """Sleep.

    Args:
        seconds: How long.
    """
    time.sleep(seconds)
    return "awake"

def explode() -> str:
    """Raise."""
    raise ValueError("no luck")

def flood() -> str:
    """Ten megabytes."""
    return "y" * (10 << 20)
'''


def tool_call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def scripted(tokenizer, script: dict[str, list[str]]):
    """A `generate` that answers each row with the next turn of its problem's script (the problem found by its
    prompt text in the row's context), ending each turn with the stop token; log-prob -0.5 per token."""
    stop = stop_token_ids(tokenizer)[-1]
    queues = {k: list(v) for k, v in script.items()}

    def generate(ids, mask, *, max_new_tokens, eos_token_id, pad_token_id, **_):
        turns = []
        for row, m in zip(ids, mask):
            context = tokenizer.decode(row[m.bool()].tolist())
            key = next(k for k in queues if k in context)
            turns.append((tokenizer(queues[key].pop(0), add_special_tokens=False)["input_ids"] + [stop])
                         [:max_new_tokens])
        response, response_mask = right_pad(turns, pad_token_id)
        finished = torch.tensor([t[-1] == stop for t in turns])
        return RolloutBatch(ids, mask, response, response_mask, -0.5 * response_mask, finished)

    return generate


def driver_for(tokenizer, tmp_path, chat: bool, **env) -> EpisodeDriver:
    (tmp_path / "user_tools.py").write_text(TOOLS_FILE)
    spec = [f"{tmp_path / 'user_tools.py'}:{f}" for f in ("slow", "explode", "flood")]
    cfg = EnvConfig(name="tools", tools=("calculator", *spec), tool_timeout_s=1.0, max_observation_chars=120, **env)
    make_env = env_factory(EnvContext(cfg, None, tokenizer, chat))
    return EpisodeDriver(make_env, tokenizer, chat, stop_token_ids(tokenizer), max_new_tokens=200,
                         max_turns=cfg.max_turns, max_tool_calls=cfg.max_tool_calls, max_response_tokens=10_000,
                         max_observation_chars=cfg.max_observation_chars, sampling={})


def segments_text(tokenizer, batch: RolloutBatch, row: int) -> list[tuple[str, str, float]]:
    """(role, text, loss mask on it) of each segment of `row`."""
    out = []
    for seg in batch.trajectories[row]["segments"]:
        ids = batch.response_ids[row, seg["start"]:seg["end"]].tolist()
        mask = batch.loss_mask[row, seg["start"]:seg["end"]]
        assert mask.min() == mask.max(), seg
        out.append((seg["role"], tokenizer.decode(ids), float(mask[0])))
    return out


def test_character_tokenizer_trajectories_with_every_failure(tmp_path):
    tok = build_char_tokenizer()
    script = {
        "12*34=": [tool_call("calculator", expression="12*34"), "408"],
        "5*5=": ["<tool_call>{oops</tool_call>", tool_call("nope"), tool_call("explode"), "25"],
        "7*8=": [tool_call("slow", seconds=30), tool_call("flood"), "56"],
        "2*2=": ["4"],
    }
    driver = driver_for(tok, tmp_path, chat=False, max_turns=5)
    batch = driver.rollout(scripted(tok, script), [Prompt(p) for p in script])
    assert tok.decode(batch.prompt_ids[0][batch.prompt_mask[0].bool()].tolist(), skip_special_tokens=True) == (
        "tools: calculator(expression), slow(seconds), explode(), flood()\n12*34=")
    first = segments_text(tok, batch, 0)
    assert first == [("assistant", tool_call("calculator", expression="12*34") + "<eos>", 1.0),
                     ("tool", "tool: 408\n", 0.0), ("assistant", "408<eos>", 1.0)]
    errors = [text for role, text, _ in segments_text(tok, batch, 1) if role == "tool"]
    assert errors[0].startswith("tool: error: the call is not valid JSON")
    assert errors[1] == "tool: error: unknown tool 'nope'; the tools are calculator, slow, explode, flood\n"
    assert errors[2] == "tool: error: explode: ValueError: no luck\n"
    third = [text for role, text, _ in segments_text(tok, batch, 2) if role == "tool"]
    assert third[0] == "tool: error: slow: timed out after 1 s (env.tool_timeout_s)\n"
    assert third[1] == "tool: " + "y" * 65 + f"\n[output cut: {10 << 20} characters, the first 65 shown]\n"
    records = batch.trajectories
    assert [r["answer"] for r in records] == ["408", "25", "56", "4"]
    assert [r["finished"] for r in records] == [True] * 4 and batch.finished.all()
    assert [(r["turns"], r["tool_calls"], r["tool_errors"]) for r in records] == [(2, 1, 0), (4, 3, 3), (3, 2, 1),
                                                                                  (1, 0, 0)]
    assert records[2]["calls"][0] == {"name": "slow", "ok": False,
                                      "error": "slow: timed out after 1 s (env.tool_timeout_s)"}
    # environment tokens: in the response mask, out of the loss mask, log-prob 0
    env_tokens = (batch.response_mask == 1) & (batch.loss_mask == 0)
    assert env_tokens.any() and (batch.rollout_logprobs[env_tokens] == 0).all()


def test_max_tool_calls_truncates_without_running_the_extra_calls(tmp_path):
    tok = build_char_tokenizer()
    script = {"9*9=": [tool_call("calculator", expression="9*9"), tool_call("calculator", expression="1+1")
                       + tool_call("slow", seconds=30), "81"]}
    driver = driver_for(tok, tmp_path, chat=False, max_turns=4, max_tool_calls=2)
    batch = driver.rollout(scripted(tok, script), [Prompt("9*9=")])
    record = batch.trajectories[0]
    assert (record["finished"], record["truncated"], record["turns"]) == (False, "max_tool_calls", 2)
    assert record["calls"][1:] == [{"name": "calculator", "ok": False, "error": "not run: past env.max_tool_calls"},
                                   {"name": "slow", "ok": False, "error": "not run: past env.max_tool_calls"}]


@pytest.fixture(scope="module")
def smol():
    return AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)


def test_chat_prompt_has_the_tool_list_in_a_system_message(smol):
    cfg = EnvConfig(name="tools", tools=("calculator",))
    env = ToolEnvironment(EnvContext(cfg, None, smol, True))
    for system in (None, "Be brief."):
        rendered = render_prompt(smol, "What is 12*34?", system)
        assert split_rendering(smol, rendered) == (system, "What is 12*34?")
        opening = env.reset(Prompt(rendered))
        assert [m["role"] for m in opening] == ["system", "user"] and opening[1]["content"] == "What is 12*34?"
        content = opening[0]["content"]
        assert content.startswith("Be brief.\n\nYou can call tools." if system else "You can call tools.")
        assert '<tool_call>{"name": "calculator", "arguments": {"expression": "123*456"}}</tool_call>' in content
        assert json.dumps(env.toolbox.schemas[0]) in content
    assert env.reset(Prompt("plain text"))[1] == {"role": "user", "content": "plain text"}
    assert split_rendering(smol, "plain text") is None
    custom = ToolEnvironment(EnvContext(cfg, None, smol, True), instructions="")
    assert custom.reset(Prompt("hi")) == [{"role": "user", "content": "hi"}]


def test_chat_trajectory_through_smollm2_template(smol, tmp_path):
    driver = driver_for(smol, tmp_path, chat=True)
    rendered = render_prompt(smol, "12*34=")
    script = {"12*34=": [tool_call("calculator", expression="12*34"), "408"]}
    batch = driver.rollout(scripted(smol, script), [Prompt(rendered)])
    prompt = smol.decode(batch.prompt_ids[0][batch.prompt_mask[0].bool()].tolist())
    assert prompt.count("<|im_start|>system") == 1 and "You can call tools." in prompt
    assert prompt.endswith("<|im_start|>user\n12*34=<|im_end|>\n<|im_start|>assistant\n")
    segments = segments_text(smol, batch, 0)
    assert [(role, mask) for role, _, mask in segments] == [("assistant", 1.0), ("tool", 0.0), ("assistant", 1.0)]
    assert segments[1][1] == "\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n"
    assert batch.trajectories[0]["answer"] == "408" and batch.trajectories[0]["tool_calls"] == 1


def test_tools_environment_needs_a_tool():
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="env.tools: the tools environment needs at least one tool"):
        ToolEnvironment(EnvContext(EnvConfig(name="tools", tools=()), None, build_char_tokenizer(), False))
