"""SFT: the loss is the token-mean NLL of completion tokens (+ EOS) only; a few steps reduce it."""

import math

import torch
import torch.nn.functional as F

from posttrain.config import ConfigError
from posttrain.train.optim import make_optimizer
from posttrain.recipes.sft import setup_sft, train_sft
from posttrain.train.losses import sft_loss
from posttrain.tasks import build_task

PROMPTS = ["1+2=", "37+58=", "9*9=", "hello world\n"]
COMPLETIONS = ["3", "95", "81 ", "hi\nthere"]  # different lengths: the batch is padded both sides


def nll_by_hand(model, tokenizer, prompts, completions) -> tuple[float, int]:
    """Sum of -log p over completion tokens and EOS, one unpadded sequence at a time, in float64."""
    total, count = 0.0, 0
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        target = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt_ids + target])).logits[0].double()
        logp = F.log_softmax(logits, dim=-1)
        for j, tok in enumerate(target):  # the logits at position P-1+j predict target token j
            total -= float(logp[len(prompt_ids) - 1 + j, tok])
        count += len(target)
    return total, count


def test_sft_loss_is_the_mean_nll_of_completion_tokens_only(tiny_model, tokenizer):
    loss, n_tokens = sft_loss(tiny_model, tokenizer, PROMPTS, COMPLETIONS)
    total, count = nll_by_hand(tiny_model, tokenizer, PROMPTS, COMPLETIONS)
    assert n_tokens == count == sum(len(c) + 1 for c in COMPLETIONS)
    assert abs(loss.item() - total / count) < 1e-6


def test_prompt_length_does_not_change_the_token_count(tiny_model, tokenizer):
    _, short = sft_loss(tiny_model, tokenizer, ["1="], ["42"])
    _, long = sft_loss(tiny_model, tokenizer, ["1+1+1+1+1+1+1+1+1+1="], ["42"])
    assert short == long == 3


def test_changing_a_completion_changes_the_loss(tiny_model, tokenizer):
    base, n = sft_loss(tiny_model, tokenizer, PROMPTS, COMPLETIONS)
    changed, m = sft_loss(tiny_model, tokenizer, PROMPTS, ["4", *COMPLETIONS[1:]])
    assert n == m
    assert abs(base.item() - changed.item()) > 1e-6
    longer, k = sft_loss(tiny_model, tokenizer, PROMPTS, ["3000", *COMPLETIONS[1:]])
    assert k == n + 3


def test_loss_gradient_reaches_every_parameter(tiny_model, tokenizer):
    loss, _ = sft_loss(tiny_model, tokenizer, PROMPTS, COMPLETIONS)
    loss.backward()
    missing = [name for name, p in tiny_model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tiny_model, tokenizer):
    opt, sched = make_optimizer(tiny_model, lr=1e-2, weight_decay=0.0, warmup_steps=0, total_steps=10)
    start = sft_loss(tiny_model, tokenizer, PROMPTS, COMPLETIONS)[0].item()
    for _ in range(10):
        loss, _ = sft_loss(tiny_model, tokenizer, PROMPTS, COMPLETIONS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    end = sft_loss(tiny_model, tokenizer, PROMPTS, COMPLETIONS)[0].item()
    assert end < 0.7 * start, (start, end)


class ListLogger:
    def __init__(self):
        self.records = []

    def log(self, record):
        self.records.append(record)


def test_train_sft_logs_and_evaluates(tmp_path, make_config, tokenizer, tiny_model):
    cfg = make_config(tmp_path, "sft.steps=4", "sft.log_every=2", "sft.eval_every=3")
    task = build_task(cfg.task, cfg.seed)
    state = setup_sft(cfg, tiny_model, tokenizer, task)
    assert len(state.data) == len(task.train_problems)
    logger = ListLogger()
    accuracy = train_sft(cfg, state, logger)
    assert 0.0 <= accuracy <= 1.0
    assert [r["step"] for r in logger.records] == [2, 3, 4]
    assert all(r["phase"] == "sft" for r in logger.records)
    assert [("accuracy" in r) for r in logger.records] == [False, True, True]
    assert [("loss" in r) for r in logger.records] == [True, False, True]
    assert logger.records[-1]["accuracy"] == accuracy


def test_zero_sft_steps_still_reports_a_real_accuracy(tmp_path, make_config, tokenizer, tiny_model):
    try:
        cfg = make_config(tmp_path, "sft.steps=0")
    except ConfigError:
        return  # refusing zero steps is also a fix
    task = build_task(cfg.task, cfg.seed)
    accuracy = train_sft(cfg, setup_sft(cfg, tiny_model, tokenizer, task), ListLogger())
    assert math.isfinite(accuracy)
