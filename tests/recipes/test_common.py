"""Shared recipe pieces: prompt encoding, response decoding, the LR schedule, greedy evaluation."""

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from posttrain.models.chat import decode_responses, encode_prompts
from posttrain.train.evaluate import evaluate
from posttrain.train.optim import make_optimizer
from posttrain.tasks import ArithmeticTask


def test_encode_prompts_left_pads_with_bos(tokenizer):
    ids, mask = encode_prompts(tokenizer, ["1+2=", "37+58="])
    assert ids.shape == mask.shape == (2, 7)
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert ids[0, :2].tolist() == [tokenizer.pad_token_id] * 2
    assert ids[0, 2:].tolist() == tokenizer("1+2=")["input_ids"]
    assert ids[1].tolist() == tokenizer("37+58=")["input_ids"]
    assert ids[1, 0] == tokenizer.bos_token_id


def test_decode_responses_stops_at_eos(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    digit = lambda ch: tokenizer.convert_tokens_to_ids(ch)  # noqa: E731
    ids = torch.tensor([[digit("9"), digit("5"), eos, pad], [digit("1"), digit("2"), digit("3"), digit("4")]])
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])
    assert decode_responses(tokenizer, ids, mask) == ["95", "1234"]


def bang_zero_tokenizer():
    """Like GPT-2 or Qwen2: id 0 is an ordinary character ('!'), padding and EOS are other ids."""
    vocab = {"!": 0, "<pad>": 1, "<eos>": 2}
    for ch in "0123456789+=":
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def test_decode_responses_adds_nothing_after_eos_when_id_zero_is_a_real_token():
    tok = bang_zero_tokenizer()
    ids = torch.tensor([tok("95", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.pad_token_id,
                                                                            tok.pad_token_id]])
    mask = torch.tensor([[1.0, 1, 1, 0, 0]])
    assert decode_responses(tok, ids, mask) == ["95"]


def test_schedule_warms_up_then_decays_to_the_floor():
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, lr=1.0, weight_decay=0.0, warmup_steps=4, total_steps=14, min_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine


def test_constant_schedule_after_warmup():
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, lr=0.5, weight_decay=0.0, warmup_steps=0, total_steps=5)
    for _ in range(8):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
        opt.step()
        sched.step()


def test_evaluate_counts_exact_matches(tiny_model, tokenizer, make_config, tmp_path):
    cfg = make_config(tmp_path)
    task = ArithmeticTask(cfg.task, 0)
    problems = task.eval_problems[:10]
    accuracy = evaluate(tiny_model, tokenizer, task, problems, batch_size=3, max_new_tokens=4)
    assert accuracy == 0.0  # an untrained model answers nothing right

    class EveryOther(ArithmeticTask):
        def reward(self, prompts, completions, probs):
            assert prompts == [p.prompt for p in probs] and len(completions) == len(probs)
            return [1.0 if i % 2 == 0 else 0.0 for i in range(len(probs))]

    half = evaluate(tiny_model, tokenizer, EveryOther(cfg.task, 0), problems, batch_size=2, max_new_tokens=4)
    assert half == 0.5
    assert tiny_model.training  # the train/eval mode is restored


def test_threads_auto_uses_the_cores_nothing_else_keeps_busy(monkeypatch):
    """threads=auto: the CPU affinity times the idle share of all cores over the window (issue 16, item 10)."""
    import posttrain.train.run as common

    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(common.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(common.time, "sleep", lambda s: None)
    for idle_share, want in ((1.0, 2), (0.5, 1), (0.1, 1), (0.8, 2)):
        readings = iter([(0, 0), (int(1000 * idle_share), 1000)])  # (idle, total) jiffies before and after
        monkeypatch.setattr(common, "_cpu_times", lambda: next(readings))
        assert common.free_cores() == want, idle_share
    monkeypatch.setattr(common, "_cpu_times", lambda: None)  # no /proc/stat: every core
    assert common.free_cores() == 2


def test_threads_setting_accepts_auto_or_a_count():
    from posttrain.config import ConfigError, build_config

    assert build_config({}, ["threads=3"]).threads == 3
    assert build_config({}, []).threads == "auto"
    with pytest.raises(ConfigError, match="threads"):
        build_config({}, ["threads=many"])
