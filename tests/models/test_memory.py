"""posttrain.models.memory: freed heap pages go back to the OS (glibc malloc_trim), and a large generation asks
for it."""

import importlib
import subprocess
import sys

import pytest
import torch

gen = importlib.import_module("posttrain.rollout.generate")  # the module (posttrain.rollout.generate is also the function)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, read from /proc")


HEAP = """
import torch
from pathlib import Path
from posttrain.models.memory import release_free_memory
def rss_mib():
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
    return int(line.split()[1]) / 1024
torch.ones(30 << 18)  # freeing a 30 MB block raises glibc's mmap threshold: the 4 MB tensors come from the heap
blocks, pins = [], []
for _ in range(64):  # 64 x 4 MB, touched, each followed by a small live block: freed, they are holes inside the heap,
    blocks.append(torch.ones(1 << 20))  # which glibc keeps (only a free top is trimmed by itself)
    pins.append(torch.ones(1 << 10))
del blocks
before = rss_mib()
ok = release_free_memory()
print(ok, before - rss_mib())
"""


@linux
def test_free_blocks_inside_the_heap_go_back_to_the_os():
    # in a fresh process: this one's heap holds whatever earlier tests left
    out = subprocess.run([sys.executable, "-c", HEAP], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "True"
    assert float(out[1]) > 128, out  # at least half of the 256 MB freed inside the heap went back


def test_a_large_generation_releases_and_a_small_one_does_not(monkeypatch, tokenizer):
    from posttrain.config import ModelConfig
    from posttrain.models import build_tiny_model

    calls = []
    monkeypatch.setattr(gen, "release_free_memory", lambda: calls.append(1) or True)
    model = build_tiny_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64),
                             tokenizer, seed=0).eval()
    ids = torch.tensor([tokenizer.encode("1+2=")] * 4)
    args = dict(max_new_tokens=4, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                generator=torch.Generator().manual_seed(0))
    small = gen.generate(model, ids, torch.ones_like(ids), **args)
    assert calls == []  # kilobytes of logits: not worth a call
    monkeypatch.setattr(gen, "RELEASE_ABOVE", 0)
    args["generator"] = torch.Generator().manual_seed(0)
    large = gen.generate(model, ids, torch.ones_like(ids), **args)
    assert calls == [1] and torch.equal(small.response_ids, large.response_ids)  # the same samples either way
