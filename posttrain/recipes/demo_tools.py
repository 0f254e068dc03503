"""`posttrain demo --pipeline tools`: the tiny model learns to use a calculator (issue 21, item 7).

The task is 3-digit multiplication (`123*245=`, exact match), which the tiny character model cannot compute:
trained on the answers alone it stays near 0 held-out accuracy. In the `tools` environment (docs/tools.md) it may
call the calculator instead (the demo shows no tool line before the prompt, env.kwargs.instructions "": the model
learns the syntax from the demonstrations):

    123*245=<tool_call>{"name": "calculator", "arguments": {"expression": "123*245"}}</tool_call><eos>tool: 30135
    30135<eos>

1. The baseline without tools: SFT on the direct answers only, evaluated without tools.
2. SFT with tools, from the same initial weights, on demonstrations of which only TOOL_SHARE call the
   calculator; the others answer directly (the right product, which the model cannot learn). The demonstrations
   are built by running the same environment and the same token encoding as the RL rollouts (`demonstration`):
   the tool output tokens are context only, the loss covers the assistant segments (each with its end-of-turn
   token). The model has to learn to copy the operands into the call and the result into its answer.
3. GRPO with the tools environment: a sampled trajectory that calls the calculator and copies right scores 1.
   Held-out accuracy and tool-call rate (greedy, multi-turn, with tools) after SFT and after GRPO.

The run writes metrics.jsonl, final/ (the RL model), summary.json and report.png like the other demos; it does not
resume (--resume is refused).
"""

from __future__ import annotations

import copy
import random
import time

from torch import Tensor

from posttrain.algos.aggregation import aggregate
from posttrain.batch import left_pad, right_pad
from posttrain.config import EnvConfig, RunConfig, build_config
from posttrain.data.sampling import ShuffledBatches
from posttrain.errors import ConfigError
from posttrain.models.adapters import refuse_peft
from posttrain.models.chat import encode_texts, end_of_turn_id, uses_chat_template
from posttrain.models.logprobs import response_logprobs
from posttrain.rl.loop import train_rl
from posttrain.rl.roles import InlineRoles
from posttrain.rollout.env import (
    EnvContext,
    cut_message,
    env_factory,
    observation_ids,
    opening_text,
)
from posttrain.rollout.generate import generate
from posttrain.rollout.multiturn import EpisodeDriver
from posttrain.train.control import RunControl, finish_run, metrics_logger, open_run
from posttrain.train.optim import guarded_step, make_optimizer
from posttrain.train.run import progress_bar, start_run, write_outputs

TOOL_SHARE = 0.25  # share of SFT demonstrations that call the calculator
MAX_DEMONSTRATIONS = 8000  # SFT data: demonstrations of this many training problems

TOOLS_DEFAULTS = {  # configs/demo_tools.yaml holds the same run as a file
    "output_dir": "runs/tools",
    "model": {"hidden_size": 64, "intermediate_size": 256, "max_position_embeddings": 160},
    "task": {"name": "arithmetic", "operators": ["*"], "min_operand": 100, "max_operand": 299, "num_eval": 200,
             "demo_error": "none"},
    "env": {"name": "tools", "tools": ["calculator"], "max_turns": 3, "max_tool_calls": 2,
            "max_response_tokens": 120, "kwargs": {"instructions": ""}},
    "sft": {"steps": 700, "batch_size": 64, "lr": 3e-3, "warmup_steps": 10, "lr_min_ratio": 1.0, "eval_every": 0,
            "log_every": 20},
    "rl": {"preset": "grpo", "steps": 30, "prompts_per_step": 16, "group_size": 8, "lr": 5e-4, "warmup_steps": 2,
           "kl_coef": 0.0, "max_new_tokens": 90, "eval_every": 10},
    "eval": {"batch_size": 200, "max_new_tokens": 90},
}


def tools_config(data: dict | None, overrides: list[str], source: str | None = None) -> RunConfig:
    """TOOLS_DEFAULTS < `data` (a YAML file's contents) < overrides."""
    return build_config(data, overrides, source=source, defaults=TOOLS_DEFAULTS)


def tool_call_text(problem) -> str:
    """The demonstrated call: `<tool_call>{"name": "calculator", "arguments": {"expression": "123*245"}}</tool_call>`."""
    expression = problem.prompt.rsplit("\n", 1)[-1].removesuffix("=")
    return f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'


def demonstration(env, tokenizer, chat: bool, problem, turns: list[str], max_observation_chars: int):
    """(prompt ids, response ids, loss mask) of one scripted trajectory, encoded as the rollout driver
    (posttrain/rollout/multiturn.py) encodes a sampled one: the opening through `opening_text`, each assistant
    turn's tokens and its end-of-turn token (loss 1), each observation through `observation_ids` (loss 0). The
    environment really runs (the calculator computes the tool message)."""
    prompt = encode_texts(tokenizer, [opening_text(tokenizer, env.reset(problem), chat)])[0]
    ids, loss = [], []
    for text in turns:
        turn = tokenizer(text, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]
        ids, loss = ids + turn, loss + [1.0] * len(turn)
        obs = env.step(text)
        if obs.done:
            break
        extra = observation_ids(tokenizer, [cut_message(m, max_observation_chars) for m in obs.messages], chat)
        ids, loss = ids + extra, loss + [0.0] * len(extra)
    return prompt, ids, loss


def demonstrations(cfg: RunConfig, tokenizer, task, share: float, seed: str) -> list[tuple]:
    """One demonstration for each of the first MAX_DEMONSTRATIONS training problems (the split is already a seeded
    shuffle); a seeded `share` of them call the calculator first."""
    chat = uses_chat_template(tokenizer, cfg.task.chat_template)
    make_env = env_factory(EnvContext(cfg.env, task, tokenizer, chat))
    rng = random.Random(seed)
    rows = []
    for p in task.train_problems[:MAX_DEMONSTRATIONS]:
        turns = [tool_call_text(p), p.answer] if rng.random() < share else [p.answer]
        rows.append(demonstration(make_env(), tokenizer, chat, p, turns, cfg.env.max_observation_chars))
    return rows


def masked_nll(model, rows: list[tuple], pad: int, num_tokens: float) -> Tensor:
    """sum over `rows` of m_t * -log pi(y_t | x, y_<t), divided by `num_tokens` (the whole batch's loss tokens)."""
    prompts, responses, masks = zip(*rows)
    prompt_ids, prompt_mask = left_pad(list(prompts), pad)
    response_ids, response_mask = right_pad(list(responses), pad)
    loss_mask = right_pad([list(m) for m in masks], 0)[0].float()
    logprobs, _ = response_logprobs(model, prompt_ids, prompt_mask, response_ids, response_mask.float())
    return aggregate(-logprobs, loss_mask, "token-mean", global_num_tokens=num_tokens)


def sft_multiturn(cfg: RunConfig, model, tokenizer, rows: list[tuple], logger, tag: str, progress=None) -> None:
    """cfg.sft.steps steps of token-mean NLL over the loss-masked response tokens of `rows`:
    loss = sum_{i,t} m_it * -log pi(y_it | x_i, y_i,<t) / sum_{i,t} m_it, m = the loss mask (0 on tool output).
    A batch is split into its short rows (direct answers) and its long ones (tool calls), one forward each: the
    same loss and gradient as one padded forward, without padding every direct answer to a tool trajectory."""
    c = cfg.sft
    opt, sched = make_optimizer(model, c.lr, c.weight_decay, c.warmup_steps, c.steps, c.lr_min_ratio)
    batches = ShuffledBatches(rows, random.Random(f"{tag}-{cfg.seed}"), c.batch_size)
    pad = tokenizer.pad_token_id
    model.train()
    for step in range(1, c.steps + 1):
        batch = next(batches)
        num_tokens = sum(sum(m) for _, _, m in batch)
        cutoff = (min(len(r) for _, r, _ in batch) + max(len(r) for _, r, _ in batch)) / 2
        groups = [g for g in ([x for x in batch if len(x[1]) <= cutoff], [x for x in batch if len(x[1]) > cutoff])
                  if g]
        loss = sum(masked_nll(model, g, pad, num_tokens) for g in groups)
        grad_norm, _ = guarded_step(model, opt, loss, c.grad_clip)
        sched.step()
        if step % c.log_every == 0 or step == c.steps:
            logger.log({"step": step, "phase": tag, "loss": loss.item(), "grad_norm": grad_norm.item(),
                        "lr": sched.get_last_lr()[0]})
        if progress is not None:
            progress.update(1)


class ToolEval:
    """Greedy held-out trajectories in `cfg.env` (the tools environment, or single_turn): accuracy (the task's
    verifier on each final answer) and tool-call rate (share of trajectories with at least one call)."""

    def __init__(self, cfg: RunConfig, model, tokenizer, task):
        self.cfg, self.model, self.task = cfg, model, task
        self.driver = EpisodeDriver.from_config(cfg, tokenizer, task)
        self.tool_rate = 0.0
        self.history: list[dict] = []

    def __call__(self) -> float:
        problems, answers, calls = self.task.eval_problems, [], []
        step = lambda ids, mask, **kw: generate(self.model, ids, mask, **kw)
        was_training = self.model.training
        self.model.eval()
        for i in range(0, len(problems), self.cfg.eval.batch_size):
            batch = self.driver.rollout(step, list(problems[i:i + self.cfg.eval.batch_size]), greedy=True)
            answers += [t["answer"] for t in batch.trajectories]
            calls += [t["tool_calls"] > 0 for t in batch.trajectories]
        self.model.train(was_training)
        scores = self.task.reward([p.prompt for p in problems], answers, problems)
        self.tool_rate = sum(calls) / len(calls)
        accuracy = sum(scores) / len(scores)
        self.history.append({"accuracy": accuracy, "tool_call_rate": self.tool_rate, "examples": answers[:3]})
        return accuracy


def run_demo_tools(cfg: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """No-tools baseline SFT, tools SFT, GRPO with tools; the summary (also summary.json)."""
    refuse_peft(cfg.model, "demo", "its SFT and GRPO phases hand full weights to each other")
    if resume:
        raise ConfigError("demo --pipeline tools does not resume; run it again (about 10 minutes)")
    if cfg.env.name == "single_turn":
        raise ConfigError("env.name: demo --pipeline tools needs a tools environment (env.name: tools)")
    start = time.perf_counter()
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, model, tokenizer = start_run(cfg, min_train=cfg.rl.prompts_per_step)
    initial = copy.deepcopy(model.state_dict())
    print(f"posttrain demo --pipeline tools: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(task.train_problems)} train / {len(task.eval_problems)} held-out problems, output {out}")
    plain = cfg.model_copy(update={"env": EnvConfig()})  # the same run without tools
    with metrics_logger(out, resumed, cfg) as logger, RunControl.for_run(cfg, out, logger, resumed) as ctl:
        with progress_bar(cfg.sft.steps, "SFT without tools", cfg.progress) as bar:
            sft_multiturn(plain, model, tokenizer, demonstrations(plain, tokenizer, task, 0.0, f"plain-{cfg.seed}"),
                          logger, "sft_no_tools", bar)
        no_tools = ToolEval(plain, model, tokenizer, task)
        no_tools_accuracy = no_tools()
        logger.log({"step": cfg.sft.steps, "phase": "sft_no_tools", "accuracy": no_tools_accuracy})
        model.load_state_dict(initial)
        evaluate = ToolEval(cfg, model, tokenizer, task)
        with progress_bar(cfg.sft.steps, "SFT with tools", cfg.progress) as bar:
            sft_multiturn(cfg, model, tokenizer, demonstrations(cfg, tokenizer, task, TOOL_SHARE, f"tools-{cfg.seed}"),
                          logger, "sft", bar)
        sft_accuracy = evaluate()
        sft_tool_rate = evaluate.tool_rate
        logger.log({"step": cfg.sft.steps, "phase": "sft", "accuracy": sft_accuracy, "tool_call_rate": sft_tool_rate})
        sft_seconds = time.perf_counter() - start
        roles = InlineRoles.local(cfg, model, tokenizer, task)
        with progress_bar(cfg.rl.steps, "GRPO with tools", cfg.progress) as bar:
            rl_accuracy = train_rl(cfg, roles, task, logger, bar, ctl, evaluator=evaluate)
    summary = write_outputs(cfg, out, model, tokenizer, {
        "no_tools_accuracy": no_tools_accuracy, "sft_accuracy": sft_accuracy, "sft_tool_call_rate": sft_tool_rate,
        "rl_accuracy": rl_accuracy, "rl_tool_call_rate": evaluate.tool_rate,
        "improvement": round(rl_accuracy - sft_accuracy, 6), "tool_share": TOOL_SHARE,
        "eval_problems": len(task.eval_problems), "sft_seconds": round(sft_seconds, 1),
        "evaluations": evaluate.history}, start, task, method="tools")
    finish_run(out)
    print(f"held-out accuracy (tool-call rate): without tools {no_tools_accuracy:.3f}; SFT with tools "
          f"{sft_accuracy:.3f} ({sft_tool_rate:.2f}) -> GRPO {rl_accuracy:.3f} ({evaluate.tool_rate:.2f}), "
          f"{rl_accuracy - sft_accuracy:+.3f} on {len(task.eval_problems)} problems, {summary['wall_seconds']:.0f} s")
    return summary
