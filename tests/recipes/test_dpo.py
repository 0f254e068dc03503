"""DPO and family on a tiny model: resolved settings, log-probs that match SFT's tokenisation, the loss at the
reference, training steps that separate the pairs for every loss, determinism, and the `posttrain dpo` command."""

import json
import math

import pytest
import torch

from posttrain.algos import PREFERENCE_SPECS
from posttrain.cli import main
from posttrain.config import dump_config
from posttrain.data import PreferencePair
from posttrain.train.metrics import MetricsLogger, read_metrics
from posttrain.models import build_tiny_model, save_pretrained
from posttrain.recipes.dpo import (evaluate_pairs, pair_logprobs, preference_loss, resolve_loss, sequence_logprobs,
                                   setup_dpo, train_dpo)
from posttrain.train.losses import sft_loss
from posttrain.tasks import ArithmeticTask
from posttrain.tasks.preference import ArithmeticPreferenceTask

PAIRS = [PreferencePair(f"{a}+{b}=", str(a + b), str(a + b - 10)) for a, b in [(7, 8), (9, 9), (15, 6), (3, 4),
                                                                              (12, 9), (5, 5), (18, 3), (6, 14)]]


def test_resolve_loss_takes_paper_defaults_unless_set(tmp_path, make_config):
    for name, spec in PREFERENCE_SPECS.items():
        loss = resolve_loss(make_config(tmp_path, f"dpo.loss={name}").dpo)
        assert (loss.beta, loss.margin, loss.use_reference, loss.length_normalize, loss.sft_coef) == (
            spec.beta, spec.margin, spec.use_reference, spec.length_normalize, spec.sft_coef)
    loss = resolve_loss(make_config(tmp_path, "dpo.loss=simpo", "dpo.beta=0.5", "dpo.reference_free=false",
                                    "dpo.sft_coef=0").dpo)
    assert (loss.beta, loss.use_reference, loss.length_normalize, loss.sft_coef) == (0.5, True, True, 0.0)


def test_pair_logprobs_match_the_sft_tokenisation(tiny_model, tokenizer):
    logprobs, mask = pair_logprobs(tiny_model, tokenizer, PAIRS[:3])
    assert logprobs.shape[0] == 6 and mask.shape == logprobs.shape
    assert mask[:3].sum(-1).tolist() == [len(p.chosen) + 1 for p in PAIRS[:3]]  # characters + EOS
    for i, p in enumerate(PAIRS[:3]):  # the SFT loss of one pair is the token mean of the same log-probs
        nll, n = sft_loss(tiny_model, tokenizer, [p.prompt], [p.rejected])
        assert n == int(mask[3 + i].sum())
        torch.testing.assert_close(nll, -(logprobs[3 + i] * mask[3 + i]).sum() / n, atol=1e-5, rtol=0)
    sums = sequence_logprobs(tiny_model, tokenizer, PAIRS[:3], batch_size=2)  # chunked, no grad
    torch.testing.assert_close(sums, torch.stack([(logprobs * mask).sum(-1)[:3], (logprobs * mask).sum(-1)[3:]], 1),
                               atol=1e-5, rtol=0)


def test_max_length_keeps_the_prompts_end_and_the_completions_start(tiny_model, tokenizer):
    """dpo.max_length: a long pair is cut to max_length tokens, its prompt from the left (the same tokens for both
    sides), a too-long side from the right; the kept tokens' log-probs are those of the same text written short."""
    long = PreferencePair("1+2+3+4+5+6+7+8=", "36", "35000000000")  # 16-char prompt; sides 2+1 and 11+1 tokens
    logprobs, mask = pair_logprobs(tiny_model, tokenizer, [long], max_length=10)
    assert mask.sum(-1).tolist() == [3, 9]  # "36"+EOS kept whole; the long side keeps its first 9 tokens
    # prompt room: 10 - 9 = 1 token, the prompt's last ("=", BOS cut too), for both sides
    from posttrain.models.logprobs import response_logprobs
    eq = torch.tensor([tokenizer("=", add_special_tokens=False)["input_ids"]])
    sides = [tokenizer("36", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id],
             tokenizer("35000000000", add_special_tokens=False)["input_ids"][:9]]
    for row, ids in enumerate(sides):
        want, _ = response_logprobs(tiny_model, eq, torch.ones_like(eq), torch.tensor([ids]), torch.ones(1, len(ids)))
        torch.testing.assert_close(logprobs[row, :len(ids)], want[0], atol=1e-5, rtol=0)
    full, full_mask = pair_logprobs(tiny_model, tokenizer, [long])
    assert full_mask.sum(-1).tolist() == [3, 12]  # without the limit nothing is cut


def test_dpo_at_the_reference_is_log_2(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path, "dpo.loss=dpo")
    state = setup_dpo(cfg, tiny_model, tokenizer, None, PAIRS, PAIRS[:2])
    assert state.ref_train.shape == (len(PAIRS), 2)
    loss, metrics = preference_loss(state.loss, tiny_model, tokenizer, PAIRS, state.ref_train)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # pi_theta = pi_ref: every r is 0
    assert abs(metrics["margin"].item()) < 1e-5 and metrics["accuracy"].item() == 0.0
    reference_free = setup_dpo(make_config(tmp_path, "dpo.loss=simpo"), tiny_model, tokenizer, None, PAIRS, PAIRS)
    assert reference_free.ref_train is None and reference_free.ref_eval is None  # no reference pass at all


def fit(cfg, tokenizer, task, pairs, held):
    model = build_tiny_model(cfg.model, tokenizer, seed=0)
    state = setup_dpo(cfg, model, tokenizer, task, pairs, held)
    before = evaluate_pairs(state)
    with MetricsLogger(cfg.output_dir + "/metrics.jsonl") as logger:
        result = train_dpo(cfg, state, logger)
    return model, before, result


@pytest.mark.parametrize("name", ["dpo", "ipo", "slic", "simpo"])
def test_every_loss_separates_its_training_pairs(tmp_path, make_config, tokenizer, name):
    cfg = make_config(tmp_path, f"dpo.loss={name}", "dpo.steps=20", "dpo.batch_size=8", "dpo.lr=3e-3",
                      "dpo.warmup_steps=1", "dpo.eval_every=0", "dpo.log_every=5",
                      *(["dpo.beta=0.5"] if name in ("dpo", "ipo") else []))
    task = ArithmeticTask(cfg.task, cfg.seed)
    model, before, result = fit(cfg, tokenizer, task, PAIRS, PAIRS)  # held-out = training pairs: did it fit?
    start = build_tiny_model(cfg.model, tokenizer, seed=0)
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters()))  # every parameter moved
    assert result["eval_margin"] > before["eval_margin"] + 0.9 and result["eval_accuracy"] >= 0.875
    assert result["eval_loss"] < before["eval_loss"]
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [5, 10, 15, 20] and "accuracy" in records[-1]
    assert {"loss", "accuracy_train", "margin", "chosen_reward", "rejected_reward", "logp_chosen", "logp_rejected",
            "eval_accuracy", "eval_margin", "time/policy", "time/update", "time/eval"} <= set(records[-1])
    assert 0 <= result["accuracy"] <= 1 and len(result["gold"]) == len(task.eval_problems)


def test_synthetic_preference_task_and_determinism(tmp_path, make_config, tiny_model, tokenizer):
    cfg = make_config(tmp_path, "dpo.steps=3", "dpo.batch_size=8", "dpo.eval_every=0")
    task = ArithmeticTask(cfg.task, cfg.seed)
    prefs = ArithmeticPreferenceTask(task)
    train, held = prefs.train_eval_pairs(24, tiny_model, tokenizer, seed=0, samples=2)
    assert len(train) == 24 and len(held) == len(task.eval_problems)
    eval_prompts = {p.prompt for p in task.eval_problems}
    assert not eval_prompts & {p.prompt for p in train}
    by_prompt = {p.prompt: p for p in task.train_problems + task.eval_problems}
    for pair in train + held:  # the hidden gold rule prefers every chosen completion
        assert prefs.prefers(by_prompt[pair.prompt], pair.chosen, pair.rejected)
    runs = [fit(make_config(tmp_path / str(i), "dpo.steps=3", "dpo.batch_size=8", "dpo.eval_every=0"), tokenizer,
                task, train, held) for i in range(2)]
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(p, q)  # same seed, same weights
    assert runs[0][2]["eval_loss"] == runs[1][2]["eval_loss"]


def test_dpo_command_on_a_jsonl_file(tmp_path, make_config, tiny_model, tokenizer, capsys):
    save_pretrained(tiny_model, tokenizer, tmp_path / "model")
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p.__dict__) for p in PAIRS) + "\n")
    dump_config(make_config(tmp_path / "run", f"model.path={tmp_path / 'model'}", "dpo.steps=2", "dpo.batch_size=4",
                            "dpo.eval_fraction=0.25"), tmp_path / "tiny.yaml")
    assert main(["dpo", str(tmp_path / "tiny.yaml"), f"dpo.data={tmp_path / 'pairs.jsonl'}"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["train_pairs"], summary["eval_pairs"], summary["eval_problems"]) == (6, 2, 20)
    assert {"initial_accuracy", "dpo_accuracy", "improvement_ci95", "eval_accuracy", "beta"} <= set(summary)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists() and (tmp_path / "run" / "report.png").exists()
    capsys.readouterr()
    # user errors: one line on stderr, exit code 2
    for override, words in ((f"dpo.data={tmp_path / 'missing.jsonl'}", ["missing.jsonl"]),
                            ("dpo.loss=dpoo", ["dpo.loss", "did you mean 'dpo'"])):
        assert main(["dpo", str(tmp_path / "tiny.yaml"), override]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
