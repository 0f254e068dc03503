"""The roofline's counting rules (benchmarks/roofline_count.py) against the GEMMs the model really runs: every
aten mm / addmm of a tiny Llama's lean forward (and backward, and generation) recorded by a dispatch mode, compared
shape by shape with the counted ones. Real tokens only is exact where the forward skips padding (padding-free
position-wise work, shared prompts once, logits at response positions)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import roofline_count as rc

from posttrain.batch import RolloutBatch, map_micro_batches
from posttrain.models.logprobs import response_logprobs
from posttrain.rollout import generate

aten = torch.ops.aten


class GemmRecorder(TorchDispatchMode):
    """{(M, K, N): count} of every 2-D matmul (aten.mm, aten.addmm, their in-place and out= forms) run inside the
    mode."""

    def __init__(self) -> None:
        super().__init__()
        self.gemms: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (aten.mm.default, aten.mm.out):
            a, b = args[0], args[1]
            self.gemms[(a.size(0), a.size(1), b.size(1))] += 1
        elif func in (aten.addmm.default, aten.addmm_.default, aten.addmm.out):
            a, b = args[1], args[2]
            self.gemms[(a.size(0), a.size(1), b.size(1))] += 1
        return func(*args, **(kwargs or {}))


def counted_gemms(work: rc.Work) -> Counter:
    return Counter({k: v for k, v in work.gemms.items() if 0 not in k})


def batch(tokenizer, vocab: int, lengths: list[int], group: int, P: int = 5, seed: int = 0):
    """Prompts of P real tokens (no left padding) repeated `group` times, responses of `lengths` (right-padded)."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    prompts = torch.randint(3, vocab, (B // group, P), generator=g).repeat_interleave(group, 0)
    resp = torch.randint(3, vocab, (B, T), generator=g)
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).float()
    return prompts, torch.ones(B, P, dtype=torch.long), resp.masked_fill(mask == 0, tokenizer.pad_token_id), mask


@pytest.mark.parametrize("lengths,group", [([4, 4, 4, 4], 1), ([6, 2, 6, 3, 1, 5], 2)])
def test_training_forward_and_backward_gemms_are_the_counted_ones(tiny_model, tokenizer, lengths, group):
    """No padding and no sharing: one pass over prompt + response; padded responses and repeated prompts: the
    distinct prompts once, then the real response tokens only (the padding-free path)."""
    m = rc.ModelShape.of(tiny_model)
    ids, pm, resp, rm = batch(tokenizer, m.vocab, lengths, group)
    with torch.no_grad(), GemmRecorder() as rec:
        response_logprobs(tiny_model, ids, pm, resp, rm)
    ref = rc.reference_work(m, ids, pm, rm, None)
    assert rec.gemms == counted_gemms(ref)
    assert rc.gemm_flops(rec.gemms) == rc.gemm_flops(ref.gemms)

    with GemmRecorder() as rec:
        logprobs, entropy = response_logprobs(tiny_model, ids, pm, resp, rm, with_entropy=True)
        (logprobs.sum() + entropy.sum()).backward()
    upd = rc.update_work(m, ids, pm, rm, None)
    assert rec.gemms == counted_gemms(upd)
    assert upd.flops > 3 * rc.gemm_flops(ref.gemms) - 1  # backward doubles the GEMMs; attention on top
    assert upd.bytes["optimizer"] == 10 * m.params * 4


def test_micro_batches_count_each_micro_batch_pass(tiny_model, tokenizer):
    """Two micro-batches of 2 rows (grouped by response length): each has its own prompt and response passes."""
    m = rc.ModelShape.of(tiny_model)
    ids, pm, resp, rm = batch(tokenizer, m.vocab, [6, 6, 2, 2], 2)
    with torch.no_grad(), GemmRecorder() as rec:
        rb = RolloutBatch(ids, pm, resp, rm, torch.zeros_like(rm), torch.ones(len(rm), dtype=torch.bool))
        map_micro_batches(rb, 2, lambda b: response_logprobs(
            tiny_model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)[0])
    work = rc.reference_work(m, ids, pm, rm, 2)
    assert rec.gemms == counted_gemms(work)
    assert work.bytes["weights"] == 4 * (4 * m.w_lin + 2 * m.hidden * m.vocab)  # 2 x (prompt + response) passes


def test_generation_gemms_are_prefill_plus_decode(tiny_model, tokenizer, monkeypatch):
    """Greedy decoding that never stops early: the distinct prompts prefilled once, then B rows per step."""
    monkeypatch.setenv("POSTTRAIN_PACK", "0")  # plain F.linear, which the recorder sees (packed: mkl ops)
    m = rc.ModelShape.of(tiny_model)
    ids, pm, _, _ = batch(tokenizer, m.vocab, [1] * 6, 3)
    with GemmRecorder() as rec:
        out = generate(tiny_model, ids, pm, max_new_tokens=5, eos_token_id=m.vocab + 7, pad_token_id=0, greedy=True)
    assert out.response_mask.sum() == 30
    pre, dec = rc.prefill_work(m, ids, pm), rc.decode_work(m, ids, pm, out.response_mask)
    assert rec.gemms == counted_gemms(pre) + counted_gemms(dec)
    assert pre.gemms[(2 * 5, m.hidden, m.linears()[0][2])] == m.layers  # 2 distinct prompts x 5 tokens
    assert dec.gemms[(6, m.hidden, m.vocab)] == 4  # 4 decode steps, 6 rows each
    # a decode step reads every weight once: 4 steps x all weights
    assert dec.bytes["weights"] == 4 * 4 * (m.w_lin + m.hidden * m.vocab)


def test_decode_counts_only_rows_still_decoding(tiny_model):
    """Rows that stopped cost nothing later (whatever the executed batch does): the counted rows per step follow
    the response lengths, and every row's keys grow by one per step."""
    m = rc.ModelShape.of(tiny_model)
    pm = torch.tensor([[0, 1, 1], [1, 1, 1]])
    rm = (torch.arange(4) < torch.tensor([[4], [2]])).float()
    w = rc.decode_work(m, torch.tensor([[0, 5, 6], [7, 8, 9]]), pm, rm)
    assert w.gemms[(2, m.hidden, m.vocab)] == 1 and w.gemms[(1, m.hidden, m.vocab)] == 2
    keys = (3 + 4) + (4 + 5)  # step 0: rows of 2 and 3 real prompt tokens + 1; then row 0 alone at 4 and 5
    assert w.bytes["kv"] == (keys + 4) * m.kv_per_position * 4  # reads plus one written position per row-step
    attn = 4 * m.heads * m.head_dim * keys * m.layers
    assert w.flops == rc.gemm_flops(w.gemms) + attn


def test_decode_reads_a_shared_prompts_keys_once(tiny_model):
    """Two rows with one prompt (3 real tokens) decoding 3 tokens each: a step reads the prompt's keys once and
    each row's own t + 1 (models/shared_kv.py), not 3 + t + 1 per row; the attention FLOPs are per row."""
    m = rc.ModelShape.of(tiny_model)
    ids, pm = torch.tensor([[0, 5, 6, 7]] * 2), torch.tensor([[0, 1, 1, 1]] * 2)
    rm = torch.ones(2, 3)
    w = rc.decode_work(m, ids, pm, rm)
    reads = (3 + 2 * 1) + (3 + 2 * 2)  # steps 0 and 1
    assert w.bytes["kv"] == (reads + 2 * 2) * m.kv_per_position * 4
    keys = 2 * (3 + 1) + 2 * (3 + 2)
    assert w.flops == rc.gemm_flops(w.gemms) + 4 * m.heads * m.head_dim * keys * m.layers


def test_intensity_and_ridge():
    w = rc.Work(flops=100.0)
    w.bytes["weights"] = 25.0
    assert w.intensity == 4.0
    assert rc.ridge(1e11, 2e10) == 5.0

