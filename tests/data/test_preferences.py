"""Preference pairs: both row formats, every source type, real HH-RLHF rows, every error path."""

import gzip
import json
import logging
import os
import re
from pathlib import Path

import pytest

from posttrain.data import PreferencePair, load_preference_pairs, split_hh, split_pairs
from posttrain.errors import DataError, PosttrainError

# The first 200 rows of HH-RLHF harmless-base/test, re-gzipped (samples/hh-rlhf/SOURCE.md).
HH_FILE = Path(__file__).resolve().parent / "samples" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"

ROWS = [
    {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    {"prompt": "Capital of France?", "chosen": " Paris", "rejected": " Lyon", "source": "extra keys are ignored"},
    {"prompt": "Pick a letter:", "chosen": "a", "rejected": "b"},
]
PAIRS = [PreferencePair("2+2=", "4", "5"), PreferencePair("Capital of France?", " Paris", " Lyon"),
         PreferencePair("Pick a letter:", "a", "b")]


def hh(*turns: str) -> str:
    """hh("q", "a", "q2", "a2") -> "\\n\\nHuman: q\\n\\nAssistant: a\\n\\nHuman: q2\\n\\nAssistant: a2"."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


HH_ROWS = [
    {"chosen": hh("hi", "hello", "how are you?", "fine, thanks"),
     "rejected": hh("hi", "hello", "how are you?", "go away")},
    {"chosen": hh("q", "good"), "rejected": hh("q", "bad")},
]


def write_jsonl(path: Path, lines: list) -> Path:
    """Rows (dicts, or raw strings written as they are) -> a JSONL file, gzip-compressed for *.gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    """`datasets` caches Parquet/JSON it converts to Arrow; keep that cache out of ~/.cache."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


# ------------------------------------------------------------------------------------------ formats

def test_prompt_chosen_rejected_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [ROWS[0], "", "   ", ROWS[1], ROWS[2]])  # blank lines skipped
    assert load_preference_pairs(path) == PAIRS
    assert load_preference_pairs(str(path), format="prompt_chosen_rejected") == PAIRS


def test_an_empty_prompt_is_an_error_naming_the_line(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [ROWS[0], {"prompt": " ", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"pairs.jsonl line 2: field 'prompt' is empty"):
        load_preference_pairs(path)


def test_hh_jsonl_splits_at_last_shared_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    pairs = load_preference_pairs(path)
    assert pairs == load_preference_pairs(path, format="hh")
    prompt = hh("hi", "hello", "how are you?") + "\n\nAssistant:"
    assert pairs[0] == PreferencePair(prompt, " fine, thanks", " go away")
    assert pairs[1] == PreferencePair("\n\nHuman: q\n\nAssistant:", " good", " bad")
    for pair, row in zip(pairs, HH_ROWS):
        assert pair.prompt + pair.chosen == row["chosen"] and pair.prompt + pair.rejected == row["rejected"]


def test_split_hh_when_dialogues_differ_before_the_last_turn():
    chosen, rejected = hh("q", "yes", "why?", "because"), hh("q", "no", "why?", "because")
    rest = "\n\nHuman: why?\n\nAssistant: because"
    assert split_hh(chosen, rejected) == PreferencePair("\n\nHuman: q\n\nAssistant:", " yes" + rest, " no" + rest)


def test_split_hh_marker_must_be_whole_inside_the_common_prefix():
    # The two differ inside the first marker ("Assistant:" vs "Assistent:"): no shared Assistant turn.
    with pytest.raises(ValueError, match="share no"):
        split_hh("\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q\n\nAssistent: a")
    with pytest.raises(ValueError, match="share no"):
        split_hh("\n\nHuman: q", "\n\nHuman: r")


def test_gzip_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl.gz", ROWS)
    assert load_preference_pairs(path) == PAIRS


def test_limit_counts_kept_pairs(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}, *ROWS])
    assert load_preference_pairs(path, limit=2) == PAIRS[:2]
    assert load_preference_pairs(path, limit=100) == PAIRS
    with pytest.raises(ValueError, match="limit"):
        load_preference_pairs(path, limit=0)


def test_identical_pairs_are_skipped_and_counted(tmp_path, caplog):
    same = {"prompt": "p", "chosen": "x", "rejected": "x"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [same, ROWS[0], same])
    with caplog.at_level(logging.WARNING, logger="posttrain.data.preferences"):
        assert load_preference_pairs(path) == PAIRS[:1]
    assert "skipped 2 pair(s)" in caplog.text and "kept 1" in caplog.text and "pairs.jsonl" in caplog.text
    # HH dialogues that are identical (same final turn) are skipped the same way.
    path = write_jsonl(tmp_path / "hh.jsonl", [HH_ROWS[1], {"chosen": hh("q", "a"), "rejected": hh("q", "a")}])
    assert len(load_preference_pairs(path)) == 1


# ------------------------------------------------------------------------------------------ sources

def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "pairs.parquet")
    assert load_preference_pairs(tmp_path / "pairs.parquet") == PAIRS
    pq.write_table(pa.Table.from_pylist(HH_ROWS), tmp_path / "hh.parquet")
    assert load_preference_pairs(tmp_path / "hh.parquet")[1] == PreferencePair(
        "\n\nHuman: q\n\nAssistant:", " good", " bad")


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(tmp_path / "single")
    assert load_preference_pairs(tmp_path / "single") == PAIRS
    with pytest.raises(DataError, match="single: split='test' given, but this dataset has no splits"):
        load_preference_pairs(tmp_path / "single", split="test")

    dd = DatasetDict({"train": Dataset.from_list(ROWS), "test": Dataset.from_list(HH_ROWS)})
    dd.save_to_disk(tmp_path / "dd")
    assert load_preference_pairs(tmp_path / "dd") == PAIRS  # "train" by default
    assert len(load_preference_pairs(tmp_path / "dd", split="test")) == 2
    with pytest.raises(DataError, match=r"dd: no split 'valid'; splits: train, test"):
        load_preference_pairs(tmp_path / "dd", split="valid")

    DatasetDict({"only": Dataset.from_list(ROWS)}).save_to_disk(tmp_path / "one")
    assert load_preference_pairs(tmp_path / "one") == PAIRS  # the only split
    DatasetDict({"a": Dataset.from_list(ROWS), "b": Dataset.from_list(ROWS)}).save_to_disk(tmp_path / "two")
    with pytest.raises(DataError, match=r"several splits \(a, b\) and none is 'train'"):
        load_preference_pairs(tmp_path / "two")


def test_load_dataset_data_directory(tmp_path):
    write_jsonl(tmp_path / "raw" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "raw" / "test.jsonl", ROWS[:2])
    assert load_preference_pairs(tmp_path / "raw") == PAIRS
    assert len(load_preference_pairs(tmp_path / "raw", split="test")) == 2


def test_row_errors_in_datasets_name_the_split_and_row(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [ROWS[0], {"prompt": "p", "chosen": "c", "rejected": None}]
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(tmp_path / "dd")
    with pytest.raises(DataError) as err:
        load_preference_pairs(tmp_path / "dd")
    expected = f"{tmp_path / 'dd'} (split 'train') row 2: field 'rejected' must be a string, got null"
    assert str(err.value) == expected
    Dataset.from_list([{"prompt": "p", "chosen": "c"}]).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet row 1: missing field 'rejected'$"):
        load_preference_pairs(tmp_path / "p.parquet")


# ------------------------------------------------------------------------------------------ real data

def test_hh_rlhf_harmless_base_test_file():
    pairs = load_preference_pairs(HH_FILE)
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(pairs) == len(rows) == 200  # the sample's rows (the full file: 2312); no identical pairs in either
    for pair, row in zip(pairs, rows):
        assert pair.prompt.startswith("\n\nHuman:") and pair.prompt.endswith("\n\nAssistant:")
        assert pair.prompt + pair.chosen == row["chosen"] and pair.prompt + pair.rejected == row["rejected"]
        assert "\n\nAssistant:" not in os.path.commonprefix([pair.chosen, pair.rejected])  # the *last* shared turn
    blank = sum(not p.chosen.strip() or not p.rejected.strip() for p in pairs)
    # Row 87 has an empty chosen reply: "...\n\nAssistant: " (the full file: 4 rows; the old bound was <= 5).
    assert blank == 1
    assert len(load_preference_pairs(HH_FILE, limit=10)) == 10


# ------------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("lines, message", [
    ([ROWS[0], '{"prompt": "p", "chosen": '], r" line 2: not valid JSON \(.* at column \d+\)"),
    ([ROWS[0], "", "[1, 2]"], r" line 3: expected a JSON object .*got list"),
    ([ROWS[0], {"prompt": "p", "chosen": "c"}], r" line 2: missing field 'rejected'"),
    ([{"chosen": hh("q", "a"), "rejected": 3}], r" line 1: field 'rejected' must be a string, got int"),
    ([ROWS[0], {"prompt": None, "chosen": "c", "rejected": "r"}],
     r" line 2: field 'prompt' must be a string, got null"),
    ([{"text": "x"}], r" line 1: cannot tell the format: .*got 'text'"),
    ([HH_ROWS[0], {"chosen": hh("q", "a"), "rejected": "\n\nHuman: other"}],
     r" line 2: 'chosen' and 'rejected' share no"),
    ([], r": no rows"),
    (["", "  "], r": no rows"),
    ([{"prompt": "p", "chosen": "x", "rejected": "x"}], r": no usable pairs: all 1 rows have identical"),
])
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, message, suffix):
    path = write_jsonl(tmp_path / f"pairs{suffix}", lines)
    with pytest.raises(DataError, match="^" + re.escape(str(path)) + message) as err:
        load_preference_pairs(path)
    assert "\n" not in str(err.value)
    assert isinstance(err.value, PosttrainError)


def test_explicit_format_mismatch_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", HH_ROWS)
    with pytest.raises(DataError, match=r"hh\.jsonl line 1: missing field 'prompt'"):
        load_preference_pairs(path, format="prompt_chosen_rejected")
    with pytest.raises(ValueError, match="format must be one of"):
        load_preference_pairs(path, format="pairs")


def test_source_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file or directory$"):
        load_preference_pairs(tmp_path / "missing.jsonl")
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"pairs\.csv: unsupported file type"):
        load_preference_pairs(tmp_path / "pairs.csv")
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all\n")
    with pytest.raises(DataError, match=r"bad\.jsonl\.gz near line 1: cannot read: BadGzipFile"):
        load_preference_pairs(tmp_path / "bad.jsonl.gz")
    good = json.dumps(ROWS[0]).encode() + b"\n"
    (tmp_path / "latin1.jsonl").write_bytes(good + good + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl line 3: not UTF-8 text \(byte 16 of the line\)$"):
        load_preference_pairs(tmp_path / "latin1.jsonl")
    (tmp_path / "trunc.jsonl.gz").write_bytes(gzip.compress(good * 3)[:-12])
    with pytest.raises(DataError, match=r"trunc\.jsonl\.gz near line \d: cannot read: EOFError"):
        load_preference_pairs(tmp_path / "trunc.jsonl.gz")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot load with datasets: "):
        load_preference_pairs(tmp_path / "bad.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match=r"empty_dir: cannot load with datasets: "):
        load_preference_pairs(tmp_path / "empty_dir")
    path = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    with pytest.raises(DataError, match=r"pairs\.jsonl: split='train' given, but a single file has no splits"):
        load_preference_pairs(path, split="train")


# ------------------------------------------------------------------------------------------ split_pairs

def test_split_pairs_is_a_deterministic_partition():
    pairs = [PreferencePair(str(i), "a", "b") for i in range(100)]
    train, evals = split_pairs(pairs, 0.2, seed=0)
    assert (len(train), len(evals)) == (80, 20)
    assert sorted(train + evals, key=lambda p: int(p.prompt)) == pairs
    assert train == sorted(train, key=lambda p: int(p.prompt))  # input order kept
    assert split_pairs(pairs, 0.2, seed=0) == (train, evals)
    assert split_pairs(pairs, 0.2, seed=1)[1] != evals


def test_split_pairs_sizes_and_errors():
    pairs = [PreferencePair(str(i), "a", "b") for i in range(3)]
    assert split_pairs(pairs, 0.0, seed=0) == (pairs, [])
    assert [len(part) for part in split_pairs(pairs, 0.01, seed=0)] == [2, 1]  # at least one eval pair
    assert [len(part) for part in split_pairs(pairs, 0.99, seed=0)] == [1, 2]  # at least one train pair
    with pytest.raises(ValueError, match="eval_fraction"):
        split_pairs(pairs, 1.0, seed=0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        split_pairs(pairs[:1], 0.5, seed=0)
