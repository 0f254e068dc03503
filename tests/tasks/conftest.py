"""Fixtures for the data tasks: samples of the real data files (tests/data/samples, carried in the repository), small
JSONL files, and a tiny local Hugging Face model whose byte-level BPE tokenizer is trained here, offline, on the
tasks' own text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Samples of the real files (each folder's SOURCE.md says which rows): GSM8K train.jsonl's first 200 rows plus
# line 346 (201 rows), all 100 MATH-500 dev rows, and the 182 MBPP rows with task_id 1-40, 367, 511-650, 927.
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
GSM8K = SAMPLES / "gsm8k" / "train.jsonl"
MATH500 = SAMPLES / "math500" / "dev100.jsonl"
MBPP = SAMPLES / "mbpp" / "mbpp.jsonl"
GSM8K_SAMPLE_ROWS = 201
# The MBPP sample's task_ids in each official split (train 601-974, validation 511-600, test 11-510, prompt 1-10).
MBPP_TRAIN_IDS = set(range(601, 651)) | {927}
MBPP_VALIDATION_IDS = set(range(511, 601))
MBPP_TEST_IDS = set(range(11, 41)) | {367}
MBPP_PROMPT_IDS = set(range(1, 11))

GSM8K_ROWS = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
               "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
              for a, b in [(3, 4), (10, 7), (12, 30), (5, 5), (8, 13), (21, 1), (40, 2), (6, 9)]]
MATH_ROWS = [{"problem": f"What is ${a} \\cdot {b}$?", "solution": f"We have ${a} \\cdot {b} = \\boxed{{{a * b}}}$.",
              "answer": str(a * b), "unique_id": f"test/algebra/{i}.json"}
             for i, (a, b) in enumerate([(2, 3), (4, 5), (6, 7), (8, 9), (3, 3), (7, 2)])]
# Four problems in the official train range (601-974), two in the prompt range (1-10), one in validation (511-600).
MBPP_ROWS = [{"task_id": tid, "text": f"Write a function to add {k} to a number.",
              "code": f"def add_{k}(x):\n    return x + {k}",
              "test_list": [f"assert add_{k}(1) == {1 + k}", f"assert add_{k}(0) == {k}"],
              "test_setup_code": "", "challenge_test_list": []}
             for tid, k in [(601, 1), (602, 2), (603, 3), (604, 4), (2, 5), (3, 6), (511, 7)]]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _corpus() -> list[str]:
    """A few hundred lines of task text: the samples' first rows, and the small rows above."""
    lines = []
    for path, keys in ((GSM8K, ("question", "answer")), (MBPP, ("text", "code", "test_list")),
                       (MATH500, ("problem", "solution"))):
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:150]]
        lines += [str(row[k]) for row in rows for k in keys]
    for rows in (GSM8K_ROWS, MATH_ROWS, MBPP_ROWS):
        lines += [str(v) for row in rows for v in row.values()]
    return lines


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory) -> Path:
    """A ~60k-parameter LlamaForCausalLM (context 1024) and a 600-token byte-level BPE tokenizer with
    <pad>/<bos>/<eos>/<unk>, saved with save_pretrained: what `model.path` names for a real model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from posttrain.config import ModelConfig
    from posttrain.models import build_tiny_model, save_pretrained

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                             show_progress=False))
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                        special_tokens=[("<bos>", core.token_to_id("<bos>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>", unk_token="<unk>", padding_side="left",
                                        clean_up_tokenization_spaces=False)
    shape = ModelConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                        max_position_embeddings=1024)
    out = tmp_path_factory.mktemp("tiny_hf_model")
    save_pretrained(build_tiny_model(shape, tokenizer, seed=0), tokenizer, out)
    return out
