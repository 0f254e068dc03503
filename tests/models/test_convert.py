"""`posttrain convert`: a tiny GGUF llama written by the `gguf` package (byte-level BPE vocabulary of 300 tokens,
ChatML template, two layers, some tensors in Q4_1 as SmolLM2's file) converts to a Hugging Face directory whose
model computes the GGUF model's logits and whose tokenizer is the GGUF tokenizer; bad files stop in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")  # the test extra has it; posttrain itself needs it only for convert

from posttrain.cli import main  # noqa: E402
from posttrain.models.convert import load_gguf  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, CONTEXT = 64, 2, 4, 2, 128, 128
CORPUS = ["the cat sat on the mat", "what is two plus three", "five apples and seven pears",
          "hello there, how are you today?", "answer: 42"] * 20


def byte_level_bpe(vocab_size: int = 300) -> tuple[list[str], list[str]]:
    """(tokens in id order, merges "a b") of a byte-level BPE trained on CORPUS, specials first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tokens, [" ".join(m) if isinstance(m, list) else m for m in merges]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A llama GGUF file as llama.cpp writes one: the metadata transformers maps to LlamaConfig and the gpt2
    tokenizer keys; no output.weight (tied embeddings). 2-D matrices in Q4_1 (blocks of 32), norms in F32."""
    tokens, merges = byte_level_bpe()
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny llama")
    w.add_context_length(CONTEXT)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)  # pad == eos, as SmolLM2
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)

    def matrix(name: str, rows: int, cols: int) -> None:
        data = rng.normal(0, 0.2, size=(rows, cols)).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_1),
                     raw_dtype=gguf.GGMLQuantizationType.Q4_1)

    def norm(name: str) -> None:
        w.add_tensor(name, (1 + rng.normal(0, 0.1, size=HIDDEN)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), HIDDEN)
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", HEADS * head_dim, HIDDEN)
        matrix(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        matrix(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        matrix(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * head_dim)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        matrix(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        matrix(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    norm("output_norm.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(GGUF file, converted directory), converted once through the CLI."""
    d = tmp_path_factory.mktemp("convert")
    src = write_tiny_gguf(d / "tiny.Q4_1.gguf")
    assert main(["convert", str(src), str(d / "hf")]) == 0
    return src, d / "hf"


CHATS = [[{"role": "user", "content": "what is two plus three"}],
         [{"role": "system", "content": "answer briefly"}, {"role": "user", "content": "hello there, how are you?"},
          {"role": "assistant", "content": "the cat sat on the mat"}, {"role": "user", "content": "five apples?"}]]


def test_converted_model_computes_the_gguf_models_logits(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = converted
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    ref_model, ref_tok = load_gguf(src)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert "quantization_config" not in model.config.to_dict()
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        for chat in CHATS:
            text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = tok(text, return_tensors="pt").input_ids
            assert ids[0].tolist() == ref_tok(text).input_ids
            diff = (model(ids).logits - ref_model(ids).logits).abs().max().item()
            assert diff <= 1e-6, diff
    # the Q4_1 values themselves, dequantized (the embedding matrix: no reordering in transformers' loader)
    reader = gguf.GGUFReader(src)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = gguf.quants.dequantize(embd.data, embd.tensor_type)
    assert torch.equal(model.model.embed_tokens.weight, torch.from_numpy(np.ascontiguousarray(expected)))


def test_converted_tokenizer_has_the_chat_template_and_pad_is_eos(converted):
    from transformers import AutoTokenizer

    _, out = converted
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHATML
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    text = tok.apply_chat_template(CHATS[1], tokenize=False)
    assert tok.decode(tok(text).input_ids) == text  # round trip
    assert tok("<|im_end|>").input_ids == [2]  # a special token stays whole


def test_converted_directory_loads_without_gguf_or_accelerate(converted, monkeypatch):
    """As if neither were installed: importing them fails (benchmarks/check_conversion.py does the same in a
    fresh process; here in this one, to keep the suite fast)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in [m for m in sys.modules if m.split(".")[0] in ("gguf", "accelerate")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setitem(sys.modules, "accelerate", None)
    _, out = converted
    AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML


def _one_line_exit_2(argv, capsys, expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], err


@pytest.mark.parametrize("cut", [100, 0.6])
def test_truncated_gguf_is_one_line_exit_2_and_nothing_written(converted, tmp_path, capsys, cut):
    data = converted[0].read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:int(cut if cut > 1 else len(data) * cut)])  # in the header; in the tensor data
    _one_line_exit_2(["convert", str(bad), str(tmp_path / "out")], capsys, "truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_not_a_gguf_missing_file_and_nonempty_out_dir(converted, tmp_path, capsys):
    (tmp_path / "model.gguf").write_text("hello")
    _one_line_exit_2(["convert", str(tmp_path / "model.gguf"), str(tmp_path / "o")], capsys, "not a GGUF file")
    _one_line_exit_2(["convert", str(tmp_path / "none.gguf"), str(tmp_path / "o")], capsys, "GGUF file not found")
    _one_line_exit_2(["convert", str(converted[0]), str(converted[1])], capsys, "--overwrite")
    assert not (tmp_path / "o").exists()


def test_missing_extra_is_named(monkeypatch, tmp_path, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    _one_line_exit_2(["convert", str(tmp_path / "x.gguf"), str(tmp_path / "o")], capsys, "posttrain[real]")
