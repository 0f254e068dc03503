"""Chat models (issue 17 part 2) with SmolLM2's real tokenizer and chat template (tests/data/smollm2_tokenizer) and
a tiny random Llama (hidden 64, 2 layers): prompts rendered through the template, generation stopping at the
end-of-turn token, pad == eos (<|im_end|>) kept in the masks where it ends a response, SFT loss on the assistant
turn only, preference pairs rendered; the character tokenizer (no template) unchanged."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from posttrain.algos.shaping import truncation_loss_mask
from posttrain.batch import right_pad
from posttrain.config import build_config
from posttrain.data import PreferencePair
from posttrain.models import build_char_tokenizer
from posttrain.models.chat import (chat_pairs, encode_texts, end_of_turn_id, hh_messages, render_prompt,
                                   stop_token_ids)
from posttrain.models.chat import decode_responses, encode_prompts
from posttrain.train.losses import sft_loss
from posttrain.rollout import generate
from posttrain.tasks import ArithmeticTask, fit_task
from tests.conftest import tiny_run_dict

SMOLLM2_TOKENIZER = Path(__file__).parent.parent / "data" / "smollm2_tokenizer"
IM_START, IM_END, ENDOFTEXT = 1, 2, 0


@pytest.fixture(scope="module")
def smol_tok():
    tok = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="module")
def smol_model(smol_tok):
    """A SmolLM2-shaped Llama, tiny: hidden 64, 2 layers, 4 heads sharing 2 key/value heads, tied embeddings."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(smol_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=IM_START, eos_token_id=IM_END, pad_token_id=IM_END)
    return LlamaForCausalLM(config).eval()


def run_cfg(tmp_path, **task):
    d = tiny_run_dict(tmp_path)
    d["task"].update(task)
    return build_config(d)


def test_smollm2_tokenizer_pad_is_eos_is_end_of_turn(smol_tok):
    assert smol_tok.pad_token_id == smol_tok.eos_token_id == IM_END
    assert end_of_turn_id(smol_tok) == IM_END
    assert stop_token_ids(smol_tok) == [IM_END]


def test_fit_task_renders_prompts_with_the_chat_template(tmp_path, smol_tok, smol_model):
    cfg = run_cfg(tmp_path, system_prompt="Answer with the number only.")
    task = ArithmeticTask(cfg.task, seed=0)
    raw = [p.prompt for p in task.train_problems]
    fit_task(task, cfg, smol_model, smol_tok)
    first = task.train_problems[0]
    assert first.prompt == ("<|im_start|>system\nAnswer with the number only.<|im_end|>\n"
                            f"<|im_start|>user\n{raw[0]}<|im_end|>\n<|im_start|>assistant\n")
    assert [p.prompt for p in task.train_problems] == [render_prompt(smol_tok, r, cfg.task.system_prompt)
                                                       for r in raw]
    assert all(p.prompt.endswith("<|im_start|>assistant\n") for p in task.eval_problems)
    assert (first.answer, first.a, first.b) == (str(first.a + first.b), first.a, first.b)  # only the prompt changes
    # without a system prompt the template adds its own default
    cfg = run_cfg(tmp_path)
    task = ArithmeticTask(cfg.task, seed=0)
    fit_task(task, cfg, smol_model, smol_tok)
    assert task.train_problems[0].prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_chat_template_none_and_the_char_tokenizer_leave_prompts_as_written(tmp_path, smol_tok, smol_model,
                                                                          tiny_model):
    cfg = run_cfg(tmp_path, chat_template="none")
    task = ArithmeticTask(cfg.task, seed=0)
    raw = [p.prompt for p in task.train_problems]
    fit_task(task, cfg, smol_model, smol_tok)
    assert [p.prompt for p in task.train_problems] == raw
    char = build_char_tokenizer()  # no template: 'auto' changes nothing, stops and targets end at EOS
    cfg = run_cfg(tmp_path)
    task = ArithmeticTask(cfg.task, seed=0)
    fit_task(task, cfg, tiny_model, char)
    assert [p.prompt for p in task.train_problems] == raw
    assert stop_token_ids(char) == [char.eos_token_id] and end_of_turn_id(char) == char.eos_token_id
    assert encode_texts(char, raw[:5]) == char(raw[:5], add_special_tokens=True)["input_ids"]


def test_end_of_turn_found_from_the_template_when_it_is_not_eos(smol_tok):
    tok = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    tok.eos_token = "<|endoftext|>"  # as a base model's EOS; the template still ends turns with <|im_end|>
    assert end_of_turn_id(tok) == IM_END
    assert stop_token_ids(tok) == [ENDOFTEXT, IM_END]


def test_a_prompt_that_starts_with_bos_gets_no_second_bos(smol_tok):
    rendered = render_prompt(smol_tok, "hi")
    assert rendered.startswith(smol_tok.bos_token)  # SmolLM2's bos is <|im_start|>
    ids = encode_texts(smol_tok, [rendered, "plain"])
    assert ids[0] == smol_tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0].count(IM_START) == rendered.count("<|im_start|>")


class ScriptedLM(torch.nn.Module):
    """A causal LM (not Llama: decoded through the HF stepper) whose greedy continuation of row b is script[b]."""

    def __init__(self, script: list[list[int]], vocab: int):
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0
        self.config = SimpleNamespace(model_type="scripted")

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=None):
        B = input_ids.size(0)
        logits = torch.zeros(B, input_ids.size(1), self.vocab)
        rows = range(B) if B == len(self.script) else self._rows
        for i, b in enumerate(rows):
            logits[i, -1, self.script[b][min(self.calls, len(self.script[b]) - 1)]] = 10.0
        self.calls += 1
        return SimpleNamespace(logits=logits)


def test_generation_stops_at_end_of_turn_and_keeps_it_in_the_masks(smol_tok):
    """pad == eos == <|im_end|>: the <|im_end|> a response ends with is response_mask 1 (and loss_mask 1, the row
    finished); the padding after it, the same id, is 0. A row that never ends is truncated (finished False)."""
    prompts = [render_prompt(smol_tok, "What is 2+3?"), render_prompt(smol_tok, "Say hello.")]
    ids, mask = encode_prompts(smol_tok, prompts)
    five, hello = smol_tok("5", add_special_tokens=False)["input_ids"], smol_tok("Hello", add_special_tokens=False)[
        "input_ids"]
    script = [five + [IM_END, 100, 101, 102, 103], hello * 8]
    model = ScriptedLM(script, len(smol_tok))
    model._rows = [1]  # after row 0 stops, only row 1 is decoded
    out = generate(model, ids, mask, max_new_tokens=6, eos_token_id=stop_token_ids(smol_tok),
                   pad_token_id=smol_tok.pad_token_id, greedy=True)
    n = len(five) + 1
    assert out.response_ids[0, :n].tolist() == five + [IM_END]
    assert out.response_ids[0, n:].tolist() == [IM_END] * (6 - n)  # padding: also <|im_end|>
    assert out.response_mask[0].tolist() == [1.0] * n + [0.0] * (6 - n)
    assert out.response_mask[1].tolist() == [1.0] * 6
    assert out.finished.tolist() == [True, False]
    loss_mask = truncation_loss_mask(out.response_mask, out.finished)  # rl.mask_truncated
    assert loss_mask[0].tolist() == out.response_mask[0].tolist() and loss_mask[1].sum() == 0
    assert decode_responses(smol_tok, out.response_ids, out.response_mask) == ["5", "Hello" * 6]


def test_tiny_llama_generation_stops_at_a_stop_id(smol_tok, smol_model):
    """The lean decoder (Llama) too: a stop id the model samples ends that row there, with the id kept."""
    ids, mask = encode_prompts(smol_tok, [render_prompt(smol_tok, "Hi"), render_prompt(smol_tok, "Count to 3")])
    sample = lambda stops: generate(smol_model, ids, mask, max_new_tokens=8, eos_token_id=stops,  # noqa: E731
                                    pad_token_id=IM_END, generator=torch.Generator().manual_seed(0))
    free = sample([len(smol_tok) + 7])  # an id no token has: 8 tokens each
    row = free.response_ids[0].tolist()
    stop = next(t for i, t in enumerate(row) if i >= 2 and t not in row[:i])  # a token first seen at step i >= 2
    at = row.index(stop)
    out = sample([IM_END, stop])  # the same random stream: rows draw every step, finished or not
    assert out.response_ids[0, :at + 1].tolist() == row[:at + 1]
    assert out.response_mask[0].tolist() == [1.0] * (at + 1) + [0.0] * (7 - at)
    assert bool(out.finished[0])


def test_sft_loss_is_on_the_assistant_turn_only(smol_tok, smol_model):
    """The target is the answer + <|im_end|>: the loss equals -mean log p over exactly those tokens of the full
    rendered conversation, computed directly; prompt (system, user turn, generation prompt) not included."""
    prompt = render_prompt(smol_tok, "What is 2+3?")
    answer = "2+3 is 5."
    loss, n_tokens = sft_loss(smol_model, smol_tok, [prompt, prompt], [answer, answer + " Done."])
    target = smol_tok(answer, add_special_tokens=False)["input_ids"] + [IM_END]
    longer = smol_tok(answer + " Done.", add_special_tokens=False)["input_ids"] + [IM_END]
    assert n_tokens == len(target) + len(longer)
    full = smol_tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"},
                                         {"role": "assistant", "content": answer}], tokenize=False)
    assert full.startswith(prompt) and full == prompt + answer + "<|im_end|>\n"  # the turn, then a newline
    nll = []
    with torch.no_grad():
        for t in (target, longer):
            p = smol_tok(prompt, add_special_tokens=False)["input_ids"]
            x = torch.tensor([p + t])
            logp = smol_model(x).logits[0, len(p) - 1:-1].float().log_softmax(-1)
            nll.append(-logp.gather(-1, torch.tensor(t).unsqueeze(-1)).squeeze(-1))
    expected = torch.cat(nll).mean()
    assert torch.allclose(loss.detach(), expected, atol=1e-5), (loss.item(), expected.item())
    ids, mask = right_pad([target, longer], smol_tok.pad_token_id)  # pad == <|im_end|>: mask by position
    assert ids[0, len(target) - 1] == IM_END and mask[0, len(target) - 1] == 1 and mask[0, len(target):].sum() == 0


def test_preference_pairs_are_rendered_and_hh_dialogues_split_into_turns(tmp_path, smol_tok):
    cfg = run_cfg(tmp_path)
    hh = PreferencePair("\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant:",
                        " Why did the chicken cross the road?", " No.")
    plain = PreferencePair("2+2=", "4", "5")
    assert hh_messages(hh.prompt) == [{"role": "user", "content": "Hi there"},
                                      {"role": "assistant", "content": "Hello!"},
                                      {"role": "user", "content": "Tell me a joke"}]
    out = chat_pairs([hh, plain], smol_tok, cfg.task)
    assert out[0].prompt.endswith("<|im_start|>user\nTell me a joke<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>assistant\nHello!<|im_end|>" in out[0].prompt
    assert (out[0].chosen, out[0].rejected) == ("Why did the chicken cross the road?", "No.")
    assert out[1].prompt == render_prompt(smol_tok, "2+2=") and out[1].chosen == "4"
    assert chat_pairs([hh], smol_tok, run_cfg(tmp_path, chat_template="none").task) == [hh]
    assert chat_pairs([hh], build_char_tokenizer(), cfg.task) == [hh]
