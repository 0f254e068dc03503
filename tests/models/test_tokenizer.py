"""Character tokenizer: one id per character after BOS, exact decoding, HF save / AutoTokenizer round trip."""

import pytest
from transformers import AutoTokenizer

from posttrain.models.tokenizer import BOS, DEFAULT_ALPHABET, EOS, PAD, UNK

TEXTS = [
    "37+58=95",
    "a b  c",
    "line one\nline two\n",
    "  leading and trailing  ",
    "don 't , stop . ok ?",  # what clean_up_tokenization_spaces would rewrite
    "x = [1, 2]; y = {'k': 3}",
]


@pytest.mark.parametrize("text", TEXTS)
def test_one_id_per_character_after_bos(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert len(ids) == len(text) + 1
    assert ids[1:] == [tokenizer.convert_tokens_to_ids(ch) for ch in text]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids[1:]


def test_every_character_of_the_alphabet_has_its_own_id(tokenizer):
    ids = tokenizer(DEFAULT_ALPHABET, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(DEFAULT_ALPHABET) == len(set(ids))
    assert min(ids) == 4  # ids 0..3 are the special tokens
    assert len(tokenizer) == 4 + len(DEFAULT_ALPHABET)
    assert " " in DEFAULT_ALPHABET and "\n" in DEFAULT_ALPHABET


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inserts_no_spaces(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids[1:]) == text
    assert tokenizer.batch_decode([ids, ids[:3]], skip_special_tokens=True) == [text, text[:2]]


def test_special_tokens(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (PAD, BOS, EOS, UNK)
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert ids == (0, 1, 2, 3)
    assert tokenizer.decode([1, tokenizer.convert_tokens_to_ids("7"), 2, 0, 0], skip_special_tokens=True) == "7"


def test_unknown_character_maps_to_unk(tokenizer):
    ids = tokenizer("1\u00e92", add_special_tokens=False)["input_ids"]
    assert ids == [tokenizer.convert_tokens_to_ids("1"), tokenizer.unk_token_id, tokenizer.convert_tokens_to_ids("2")]


def test_batches_are_padded_on_the_left(tokenizer):
    enc = tokenizer(["1+1=", "12+34="], padding=True)
    assert enc["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2
    assert enc["attention_mask"] == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert enc["input_ids"][0][2] == tokenizer.bos_token_id


def test_save_pretrained_and_autotokenizer_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(loaded(text)["input_ids"], skip_special_tokens=True) == text
    assert len(loaded) == len(tokenizer)
    assert loaded.all_special_ids == tokenizer.all_special_ids
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert loaded.padding_side == "left"
