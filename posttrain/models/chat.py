"""Chat models: prompts through the tokenizer's chat template, and the token that ends an assistant turn.

    uses_chat_template(tokenizer, mode)          task.chat_template 'auto' and the tokenizer has a template
    render_prompt(tokenizer, text, system)       one user turn (or an HH-RLHF dialogue) + the generation prompt
    end_of_turn_id(tokenizer)                    what the template closes an assistant turn with, else EOS
    stop_token_ids(tokenizer)                    EOS and the end-of-turn token: generation stops at either
    encode_texts(tokenizer, texts)               special tokens added unless the text already starts with BOS
    chat_pairs(pairs, tokenizer, task_cfg)       preference pairs from a file, rendered the same way

A rendered prompt ends where the assistant's answer starts (SmolLM2: `...<|im_start|>assistant\\n`); a
completion in training (SFT demonstration, preference side, ptx text) is the answer's tokens followed by
`end_of_turn_id`, so the loss covers the assistant turn and its end only. Where the end-of-turn token is the
EOS and the pad token too (SmolLM2: `<|im_end|>`), the masks from `posttrain.batch.right_pad` and
`posttrain.rollout.generate` mark it as a real token by position, never by comparing ids with the pad id.

A tokenizer without a template (the tiny character tokenizer) is untouched by all of this: prompts stay as
written and generation and targets end at EOS, as before.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch

from posttrain.batch import left_pad

ASSISTANT_SENTINEL = "posttrain-assistant-sentinel"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer, mode: str = "auto") -> bool:
    """True when prompts go through the template: task.chat_template 'auto' and the tokenizer has one."""
    return mode == "auto" and has_chat_template(tokenizer)


def hh_messages(text: str) -> list[dict] | None:
    """An HH-RLHF prompt ("\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:") as chat messages, the open
    assistant turn left for the generation prompt; None when the text is not such a dialogue."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip() or parts[-2] != "Assistant" or parts[-1].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1:-2:2], parts[2:-2:2])]


def prompt_messages(text: str | list[dict], system_prompt: str | None = None) -> list[dict]:
    """The messages a prompt stands for: a list of chat messages as given, an HH-RLHF dialogue's turns, else one
    user turn."""
    if isinstance(text, list):
        messages = list(text)
    else:
        messages = hh_messages(text) or [{"role": "user", "content": text}]
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + messages


def render_prompt(tokenizer, text: str | list[dict], system_prompt: str | None = None) -> str:
    """The template's text for `text` as the user's turn, ending with the generation prompt (the assistant's
    turn opened, as `add_generation_prompt=True` writes it)."""
    return tokenizer.apply_chat_template(prompt_messages(text, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def end_of_turn_id(tokenizer) -> int:
    """The special token the chat template writes right after an assistant message's content (SmolLM2 and
    Qwen2: <|im_end|>, Llama 3: <|eot_id|>, Gemma: <end_of_turn>); the EOS id when there is no template or
    the template writes no special token there."""
    eos = tokenizer.eos_token_id
    if not has_chat_template(tokenizer):
        return eos
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ASSISTANT_SENTINEL}],
            tokenize=False)
        after = text.rsplit(ASSISTANT_SENTINEL, 1)[1]
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    except Exception:  # noqa: BLE001 - a template that cannot render this: fall back to EOS
        return eos
    return ids[0] if ids and ids[0] in set(tokenizer.all_special_ids) else eos


def stop_token_ids(tokenizer) -> list[int]:
    """The ids generation stops at: EOS, and the template's end-of-turn token when it is another one."""
    eos, eot = tokenizer.eos_token_id, end_of_turn_id(tokenizer)
    return [eos] if eot == eos else [eos, eot]


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens (BOS), except a text that already starts with
    the BOS token, as a rendered chat prompt may (Llama 3's template writes <|begin_of_text|>): no second BOS."""
    bos = tokenizer.bos_token
    starts = [bool(bos) and t.startswith(bos) for t in texts]
    if not any(starts):
        return tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    out: list[list[int] | None] = [None] * len(texts)
    for flag in (False, True):
        idx = [i for i, s in enumerate(starts) if s == flag]
        if idx:
            for i, ids in zip(idx, tokenizer([texts[i] for i in idx], add_special_tokens=not flag)["input_ids"]):
                out[i] = ids
    return out


def chat_pairs(pairs: list, tokenizer, task_cfg) -> list:
    """Preference pairs read from a file, with their prompts rendered through the chat template (an HH-RLHF
    dialogue turn by turn) and each side as the assistant's answer (leading whitespace dropped: the template
    opens the turn); unchanged without a template or with task.chat_template 'none'."""
    if tokenizer is None or not uses_chat_template(tokenizer, task_cfg.chat_template):
        return pairs
    return [replace(p, prompt=render_prompt(tokenizer, p.prompt, task_cfg.system_prompt), chosen=p.chosen.lstrip(),
                    rejected=p.rejected.lstrip()) for p in pairs]


def encode_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> left-padded (ids, mask), BOS included as the tokenizer adds it (not twice where a rendered
    chat prompt starts with it: posttrain.models.chat.encode_texts)."""
    return left_pad(encode_texts(tokenizer, prompts), tokenizer.pad_token_id)


def decode_responses(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
    """Response tokens -> text: only the tokens under the mask (up to EOS), special tokens dropped."""
    lengths = response_mask.sum(-1).long().tolist()
    rows = [ids[:n] for ids, n in zip(response_ids.tolist(), lengths, strict=True)]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)
