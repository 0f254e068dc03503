"""FLOPs, bytes moved and GEMM shapes of one GRPO step's phases, counted from the model's shapes and the step's
rollout batch (issue 23, item 1). benchmarks/roofline.py times the phases and draws the roofline.

Shapes: L layers, C hidden, H / Hkv query / key-value heads, D head size, I intermediate size, V vocabulary, e bytes
per element (4 for float32). Per layer the linears are qkv (C -> (H + 2 Hkv) D), o (H D -> C), gate_up (C -> 2 I)
and down (I -> C), W_lin = L * sum(K * N) weights; the head is C -> V.

Counting rules (real tokens only: left padding of prompts and right padding of responses counts nothing, which is
what posttrain's padding-free training forward and prompt sharing aim at; the executed work can be larger: the
attention of a padded (B, L) layout, decode rows zero-padded to the rows the prepacked weights were packed for, the
rows that finished but have not left the decode batch yet):

  FLOPs    a GEMM (M, K) x (K, N) is 2 M K N. A forward pass over N tokens: 2 N W_lin for the linears, 4 H D per
           (query, key) pair per layer for attention (q k^T and p v; causal: a token at position s attends to s + 1
           keys), 2 C V per position that needs logits. Backward: twice the forward's GEMM FLOPs (dX = dY W and
           dW = dY^T X), attention the same. Norms, RoPE, SiLU, softmax, sampling and AdamW are elementwise:
           counted in bytes, not in FLOPs. The update counts the head's recomputation in backward where there
           is one (models/logprobs.py chunked_logprobs recomputes each chunk's logits when there is more than one
           chunk and their log-softmax outputs total more than KEEP_ELEMENTS).
  bytes    weights: every matmul weight read once per pass (a decode step is a pass, a micro-batch's prompt and
           response passes are two) and the head's once per chunk of logits; backward reads them once more and
           reads + writes the weight gradients (accumulation). Activations: every op of a layer reads its inputs and
           writes its output once per token (ACTIVATIONS_PER_TOKEN); backward twice the forward's. KV cache: a
           decode step reads the K and V of every key position of every row it decodes (a prompt that rows share
           once: models/shared_kv.py) and writes one position; prefill writes the prompts'. Explicit attention (small
           score matrices, models/lean.py `attention`) moves its (H, queries, keys) scores SCORE_PASSES times.
           Logits: LOGIT_PASSES passes over (positions, V). Optimizer: AdamW (fused) reads parameter, gradient
           and both moments and writes three, the gradient clip reads the gradients twice and writes them once:
           10 e per parameter.

Phases: `prefill` (the distinct prompts once, logits at each prompt's last position), `decode` (one pass per step:
the rows still decoding, one token each), `reference` (log pi_ref over the batch in rl.micro_batch_size
micro-batches, shared prompts once per micro-batch, logits at response positions), `update` (the same forward with
entropy, its backward, the optimizer step). Ratios of FLOPs to bytes are what the roofline needs; the bytes are a
model of the traffic (no cache reuse), not a measurement.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from posttrain.batch import micro_rows
from posttrain.models.lean import SMALL_ATTENTION, distinct_rows
from posttrain.models.logprobs import CHUNK_ELEMENTS, KEEP_ELEMENTS

SCORE_PASSES = 5  # scores written by q k^T, bias added (read + write), softmax (read + write) ... read by p v: ~5
# passes over (positions, V) logits: sampling (head write, / temperature, softmax, cumsum, log_softmax, copy) ~10;
# log-probs (head write, / temperature, log_softmax) 5; with the entropy (exp, product, sum) 11; backward as forward
LOGIT_PASSES = {"sample": 10, "logprobs": 5, "entropy": 11}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    elem: int  # bytes per element
    params: int  # trainable parameters (the optimizer's traffic)

    @classmethod
    def of(cls, model) -> ModelShape:
        c = model.config
        H = c.num_attention_heads
        D = getattr(c, "head_dim", None) or c.hidden_size // H
        p = next(model.parameters())
        return cls(c.num_hidden_layers, c.hidden_size, H, getattr(c, "num_key_value_heads", None) or H, D,
                   c.intermediate_size, c.vocab_size, p.element_size(),
                   sum(q.numel() for q in model.parameters() if q.requires_grad))

    def linears(self) -> list[tuple[str, int, int]]:
        """(name, K, N) of every linear of one layer: y (M, N) = x (M, K) W^T."""
        C, D, I = self.hidden, self.head_dim, self.intermediate
        return [("qkv", C, (self.heads + 2 * self.kv_heads) * D), ("o", self.heads * D, C), ("gate_up", C, 2 * I),
                ("down", I, C)]

    @property
    def w_lin(self) -> int:
        return self.layers * sum(k * n for _, k, n in self.linears())

    @property
    def kv_per_position(self) -> int:
        """Elements of K and V of one position, all layers."""
        return self.layers * 2 * self.kv_heads * self.head_dim

    def activations_per_token(self) -> int:
        """Elements one token's forward reads and writes outside the KV cache (all layers, embedding, final norm):
        rms norms 2 C each, qkv C + Q, RoPE 3 (H + Hkv) D, attention's q in and output out 2 H D, the head
        transpose 2 H D, o H D + C, residuals 3 C each, gate_up C + 2 I, SiLU * up 5 I, down I + C."""
        C, D, I = self.hidden, self.head_dim, self.intermediate
        Q, HD = (self.heads + 2 * self.kv_heads) * D, self.heads * D
        layer = 2 * C + (C + Q) + 3 * (self.heads + self.kv_heads) * D + 4 * HD + (HD + C) + 3 * C + 2 * C \
            + (C + 2 * I) + 5 * I + (I + C) + 3 * C
        return self.layers * layer + 4 * C


@dataclass
class Pass:
    """One forward call of the model over real tokens."""

    tokens: int  # positions through the linears (M of every linear GEMM)
    pairs: int  # (query, key) pairs attention computes, summed over tokens (causal, real keys only)
    head_rows: list[int]  # rows of each head GEMM (one entry per chunk of logits)
    logit_passes: int
    kv_read: int = 0  # cache positions read (all rows)
    kv_write: int = 0  # cache positions written
    explicit: bool = True  # attention as matmul-softmax-matmul (scores in memory), else SDPA


@dataclass
class Work:
    """A phase's counted work: FLOPs, bytes by kind, and its GEMMs as {(M, K, N): count}."""

    flops: float = 0.0
    bytes: dict[str, float] = field(default_factory=lambda: Counter())
    gemms: Counter = field(default_factory=Counter)

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes.values()))

    @property
    def intensity(self) -> float:
        return self.flops / max(self.total_bytes, 1.0)

    def add(self, other: Work) -> Work:
        self.flops += other.flops
        self.bytes.update(other.bytes)
        self.gemms.update(other.gemms)
        return self


def forward_work(m: ModelShape, p: Pass, backward: bool = False) -> Work:
    """The FLOPs, bytes and GEMMs of pass `p` (and of its backward)."""
    e, w = m.elem, Work()
    gemms = Counter()
    lin = m.w_lin if p.tokens else 0  # a pass of the head alone (its recomputation) reads no layer weights
    for _, k, n in m.linears() if p.tokens else []:
        gemms[(p.tokens, k, n)] += m.layers
    for rows in p.head_rows:
        gemms[(rows, m.hidden, m.vocab)] += 1
    attn = 4 * m.heads * m.head_dim * p.pairs * m.layers
    w.flops = sum(2 * a * b * c * n for (a, b, c), n in gemms.items()) + attn
    w.gemms = gemms
    w.bytes["weights"] = (lin + len(p.head_rows) * m.hidden * m.vocab) * e
    w.bytes["activations"] = p.tokens * m.activations_per_token() * e
    w.bytes["kv"] = (p.kv_read + p.kv_write) * m.kv_per_position * e
    if p.explicit:
        w.bytes["scores"] = SCORE_PASSES * m.heads * p.pairs * m.layers * e
    w.bytes["logits"] = p.logit_passes * sum(p.head_rows) * m.vocab * e
    if backward:
        back = Counter()
        for (M, K, N), n in gemms.items():
            back[(M, N, K)] += n  # dX = dY (M, N) W (N, K)
            back[(N, M, K)] += n  # dW = dY^T (N, M) X (M, K)
        w.gemms = gemms + back
        w.flops *= 3  # GEMMs: dX and dW, each as many FLOPs as the forward's; attention: twice its forward
        w.bytes["weights"] *= 2
        w.bytes["weight grads"] = 2 * (lin + (m.hidden * m.vocab if p.head_rows else 0)) * e
        for kind in ("activations", "kv", "scores", "logits"):
            w.bytes[kind] = w.bytes.get(kind, 0) * 3
    return w


def _lengths(mask: torch.Tensor) -> list[int]:
    return [int(x) for x in mask.sum(-1)]


def _chunks(n: int, vocab: int) -> list[int]:
    size = max(1, CHUNK_ELEMENTS // vocab)
    return [min(size, n - s) for s in range(0, n, size)] or [0]


def prefill_work(m: ModelShape, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Work:
    """The distinct prompts in one pass (rollout/generate.py -> LeanDecoder.prefill), logits at each one's last
    position; their K and V written once (the decode cache shares them: models/shared_kv.py)."""
    _, first = distinct_rows(prompt_ids, prompt_mask)
    p_u = _lengths(prompt_mask[first])
    P = prompt_mask.size(1)
    return forward_work(m, Pass(sum(p_u), sum(p * (p + 1) // 2 for p in p_u), [len(first)], LOGIT_PASSES["sample"],
                                kv_write=sum(p_u), explicit=P * P <= SMALL_ATTENTION))


def decode_work(m: ModelShape, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                response_mask: torch.Tensor) -> Work:
    """One pass per decode step: row b with n_b response tokens is fed its first n_b - 1 (the first comes from
    prefill's logits), the token at step t attending to p_b + t + 1 keys. Where prompts repeat, the cache holds
    each distinct prompt's keys once (models/shared_kv.py): a step reads those once and each row's t + 1."""
    p_b, n_b = _lengths(prompt_mask), _lengths(response_mask)
    _, first = distinct_rows(prompt_ids, prompt_mask)
    shared = len(first) < len(p_b)
    prompt_keys = sum(p_b[i] for i in first.tolist())
    w = Work()
    for t in range(max(n_b) - 1):
        rows = [b for b, n in enumerate(n_b) if n - 1 > t]
        keys = [p_b[b] + t + 1 for b in rows]
        read = prompt_keys + len(rows) * (t + 1) if shared else sum(keys)
        w.add(forward_work(m, Pass(len(rows), sum(keys), [len(rows)], LOGIT_PASSES["sample"], kv_read=read,
                                   kv_write=len(rows))))
    return w


def training_passes(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_mask: torch.Tensor,
                    micro_batch_size: int | None, vocab: int, logit_passes: int) -> list[Pass]:
    """The passes of a training forward over the batch (models/lean.py `response_hidden`): per micro-batch
    (batch.micro_rows), one pass over prompt + response when no prompt repeats, else the distinct prompts once
    and then the response positions of every row against the shared prompt keys; logits in chunks (logprobs.py)."""
    out = []
    for rows in micro_rows(response_mask, micro_batch_size):
        ids, pm, rm = prompt_ids[rows], prompt_mask[rows], response_mask[rows]
        _, first = distinct_rows(ids, pm)
        p_b, n_b = _lengths(pm), _lengths(rm)
        heads = _chunks(sum(n_b), vocab)
        if len(first) == len(rows):
            s = [p + n for p, n in zip(p_b, n_b, strict=True)]
            L = max(s)
            out.append(Pass(sum(s), sum(x * (x + 1) // 2 for x in s), heads, logit_passes,
                            explicit=L * L <= SMALL_ATTENTION))
            continue
        p_u = [p_b[i] for i in first.tolist()]
        P, T = max(p_u), max(n_b)
        out.append(Pass(sum(p_u), sum(p * (p + 1) // 2 for p in p_u), [], 0, explicit=P * P <= SMALL_ATTENTION))
        pairs = sum(n * p + n * (n + 1) // 2 for p, n in zip(p_b, n_b, strict=True))
        out.append(Pass(sum(n_b), pairs, heads, logit_passes, kv_read=sum(p_b), kv_write=sum(p_b),
                        explicit=T * (P + T) <= SMALL_ATTENTION))  # the shared prefix gathered per row
    return out


def reference_work(m: ModelShape, prompt_ids, prompt_mask, response_mask, micro_batch_size: int | None) -> Work:
    w = Work()
    for p in training_passes(prompt_ids, prompt_mask, response_mask, micro_batch_size, m.vocab,
                             LOGIT_PASSES["logprobs"]):
        w.add(forward_work(m, p))
    return w


def update_work(m: ModelShape, prompt_ids, prompt_mask, response_mask, micro_batch_size: int | None) -> Work:
    """Forward with entropy + backward per micro-batch, the head recomputed per chunk when there are several and
    their logits are not kept, one AdamW step (bytes only)."""
    w = Work()
    for p in training_passes(prompt_ids, prompt_mask, response_mask, micro_batch_size, m.vocab,
                             LOGIT_PASSES["entropy"]):
        w.add(forward_work(m, p, backward=True))
        if len(p.head_rows) > 1 and sum(p.head_rows) * m.vocab > KEEP_ELEMENTS:  # chunked_logprobs: each chunk's
            # logits computed again in backward
            w.add(forward_work(m, Pass(0, 0, p.head_rows, LOGIT_PASSES["entropy"], explicit=False)))
    w.bytes["optimizer"] = 10 * m.params * m.elem
    return w


def step_work(m: ModelShape, batch, micro_batch_size: int | None) -> dict[str, Work]:
    """Every counted phase of one GRPO step on its rollout batch (prompt_ids, prompt_mask, response_mask)."""
    ids, pm, rm = batch.prompt_ids, batch.prompt_mask, batch.response_mask
    return {"prefill": prefill_work(m, ids, pm), "decode": decode_work(m, ids, pm, rm),
            "reference": reference_work(m, ids, pm, rm, micro_batch_size),
            "update": update_work(m, ids, pm, rm, micro_batch_size)}


def gemm_flops(gemms: Counter) -> float:
    return float(sum(2 * a * b * c * n for (a, b, c), n in gemms.items()))


def ridge(peak_flops: float, bandwidth: float) -> float:
    """The arithmetic intensity (FLOP/byte) where the memory roof min(peak, bandwidth * I) meets the compute roof."""
    return peak_flops / bandwidth if bandwidth > 0 else math.inf
