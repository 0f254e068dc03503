"""Speculative sampling for rollouts: draft a few tokens cheaply, verify them in one forward pass of the policy,
keep a prefix of them by a rule that leaves the samples distributed exactly as the policy's.

The draft needs no second model: prompt lookup (an n-gram match in the row's own context, `ngram_draft`). The
tokens that followed the most recent earlier occurrence of the row's last n tokens are proposed (up to k); no
match, no draft: that row takes a plain one-token step inside the same batched forward pass.

The rule (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023,
"Accelerating LLM Decoding with Speculative Sampling"), `accept_draft`: with p_j the policy's sampling
distribution after j draft tokens (softmax(logits / T) after top-k / top-p filtering, what `generate` samples
from) and q_j the draft's (one-hot on the proposed token d_{j+1} for a deterministic draft),

    accept d_{j+1} with probability min(1, p_j(d_{j+1}) / q_j(d_{j+1}))      (= p_j(d_{j+1}) for a one-hot q)
    at the first rejection, sample from the residual (p_j - q_j)+ / sum (p_j - q_j)+   (= p_j without d_{j+1})
    after all m draft tokens were accepted, sample one bonus token from p_m.

Each emitted token then has exactly the policy's conditional distribution given the tokens before it, so a
sequence is distributed as non-speculative sampling's (tests/rollout/test_speculative.py checks it with a
chi-square test). Greedy decoding accepts a draft token iff it is the argmax, which gives exactly the greedy
tokens. The returned log-probabilities are log softmax(logits / T) of the emitted tokens (before filtering,
generate's convention), from the verify pass's logits: the same numbers as the training forward pass.

Rows accept different numbers of tokens. Each row keeps its own cache length: the verify pass writes the keys and
values of its L tokens at that row's next L cache slots (`_RaggedKV`), the attention bias lets query j of row b see
the prompt's real tokens and the row's first fed_b + j + 1 response slots only, and positions count the row's
real tokens. Keys of rejected draft tokens are left behind the row's length, never attended to, and overwritten
by its next verify pass. Stop rules are generate()'s: a row ends at its first stop id (included) or at
max_new_tokens, and draft tokens past either are discarded. Finished rows leave the batch as in generate().

Cost: a verify pass runs the B pending tokens plus the drafts (at most DRAFT_BUDGET x B of them), only those
positions (the lean forward's padding-free path), where a decode step runs B. It pays when decoding is bound by
reading the weights and drafts are accepted often (text that copies its context). On this project's CPU at batch
16 neither holds, and it measured 0.69-0.79x of generate() on SmolLM2 (docs/speculative.md). Models the lean
forward does not cover (posttrain.models.lean: e.g. a DoRA layer or a soft prompt) fall back to plain `generate`.

Counts: the batch carries each row's (`DecodeCounts`: live verify passes, drafted, accepted, emitted tokens); the
rollout driver sums them over a trajectory's turns into its record, and an RL step logs `speculative_metrics` of
their sum over the step's samples (rollout/spec_*, docs/metrics.md).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.batch import DecodeCounts, RolloutBatch
from posttrain.models.lean import KVStore, LeanDecoder, lean_backbone, positions_from_mask
from posttrain.models.packed import PackedLinear, linear
from posttrain.rollout.generate import (
    COMPACT_BELOW,
    filter_logits,
    generate,
    sample_tokens,
)

log = logging.getLogger(__name__)


def ngram_draft(ctx: Tensor, start: Tensor, end: Tensor, n: int, k: int) -> tuple[Tensor, Tensor]:
    """Prompt-lookup drafts. ctx (R, W) token buffer whose row r holds its real tokens at [start[r], end[r]).

    For each row: the latest s with start <= s and s + n < end where ctx[s:s+n] equals the row's last n tokens
    ctx[end-n:end]; the draft is ctx[s+n : min(s+n+k, end)]. Returns draft (R, k) long (0 past a row's length)
    and m (R,) long, its length (0: no match, or fewer than n + 1 real tokens)."""
    R, W = ctx.shape
    if W < n + 1:
        return ctx.new_zeros(R, k), ctx.new_zeros(R)
    ar = torch.arange(n, device=ctx.device)
    suffix = ctx.gather(1, (end.unsqueeze(1) - n + ar).clamp(min=0))  # (R, n)
    windows = ctx.unfold(1, n, 1)  # (R, W - n + 1, n): windows[r, s] = ctx[r, s:s+n]
    s = torch.arange(windows.size(1), device=ctx.device)
    ok = (windows == suffix.unsqueeze(1)).all(-1) & (s >= start.unsqueeze(1)) & (s + n < end.unsqueeze(1))
    best = torch.where(ok, s, -1).amax(-1)  # (R,): the latest match, -1 for none
    first = (best + n).clamp(min=0)
    m = torch.where(best >= 0, (end - first).clamp(max=k), 0)
    idx = (first.unsqueeze(1) + torch.arange(k, device=ctx.device)).clamp(max=W - 1)
    draft = ctx.gather(1, idx).masked_fill(torch.arange(k, device=ctx.device) >= m.unsqueeze(1), 0)
    return draft, m


def accept_draft(p: Tensor, draft: Tensor, m: Tensor, u: Tensor, q: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The speculative sampling rule for one verify pass.

    p (R, L, V): the policy's sampling distributions at the L verified positions (p[:, j] follows j draft
    tokens); draft (R, L-1) the proposed tokens, m (R,) how many of them are real (<= L-1); u (R, L-1) uniforms
    in [0, 1); q (R, L-1, V) the draft's distributions, None for a deterministic draft (one-hot on `draft`).

    Token j+1 is accepted iff u_j < p_j(d_{j+1}) / q_j(d_{j+1}) and every earlier one was. Returns a (R,) the
    accepted count and dist (R, V), unnormalised, to sample the next token from: the residual (p_a - q_a)+ where
    a < m (the first rejection), p_m itself where all m were accepted (the bonus token)."""
    R, L, _V = p.shape
    rows = torch.arange(R, device=p.device)
    if L == 1:
        return m.new_zeros(R), p[:, 0]
    d = draft.unsqueeze(-1)
    ratio = p[:, :-1].gather(-1, d).squeeze(-1)  # (R, L-1): p_j(d_{j+1})
    if q is not None:
        ratio = ratio / q.gather(-1, d).squeeze(-1)
    ok = (u < ratio) & (torch.arange(L - 1, device=p.device) < m.unsqueeze(1))
    a = ok.long().cumprod(-1).sum(-1)  # (R,) leading accepted tokens
    p_a = p[rows, a]  # (R, V)
    j = a.clamp(max=L - 2)
    if q is None:
        residual = p_a.scatter(-1, draft[rows, j].unsqueeze(-1), 0.0)
    else:
        residual = (p_a - q[rows, j]).clamp(min=0.0)
    rejected = (a < m) & (residual.sum(-1) > 0)  # a zero residual only arises from rounding where p_a == q_a
    return a, torch.where(rejected.unsqueeze(-1), residual, p_a)


def accept_greedy(logits: Tensor, draft: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy verification: logits (R, L, V), draft (R, L-1), m (R,) -> a (R,) the leading draft tokens equal to
    the argmax, and the next token (R,): the argmax after them (the correction, or the bonus token)."""
    best = logits.argmax(-1)  # (R, L)
    ok = (draft == best[:, :-1]) & (torch.arange(logits.size(1) - 1, device=logits.device) < m.unsqueeze(1))
    a = ok.long().cumprod(-1).sum(-1)
    return a, best.gather(1, a.unsqueeze(1)).squeeze(1)


# Draft tokens verified per pass, per live row on average. On this CPU a SmolLM2 decode step of 16 rows is already
# bound by arithmetic, not by reading the weights (benchmarks/speculative.py --costs: a pass over 2 tokens per row
# costs 1.28x a step, over 5 tokens 2.69x), so drafted tokens are far from free; the budget caps a pass at twice a
# step's tokens, which one extra pack of the weights (2 x rows) serves.
DRAFT_BUDGET = 1.0


def budget(m: Tensor, total: int) -> Tensor:
    """Cut draft lengths m (R,) to `total` tokens in all, breadth first: every row's first draft token (in row
    order), then every second one, ...; later tokens are less likely to be reached. -> (R,) new lengths."""
    if int(m.sum()) <= total:
        return m
    levels = torch.arange(int(m.max()), device=m.device)
    has = levels.unsqueeze(0) < m.unsqueeze(1)  # (R, J): row r has a token at depth j
    per_level = has.sum(0)  # (J,)
    before = per_level.cumsum(0) - per_level  # tokens at shallower depths
    rank = before.unsqueeze(0) + has.long().cumsum(0) - 1  # (R, J): order of (r, j) breadth first
    return (has & (rank < total)).sum(1)


class _RaggedKV(KVStore):
    """A KV cache where every row has its own length: a pass writes row r's L keys and values at slots
    slots[r] (R, L) and attends over the first `width` slots (its bias masks what each query may not see)."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v  # (layers, R, Hkv, capacity, D)
        self.slots: Tensor | None = None
        self.width = 0

    def keep(self, rows: Tensor) -> None:
        self.k, self.v = self.k[:, rows], self.v[:, rows]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        idx = self.slots[:, None, :, None].expand(-1, k.size(1), -1, k.size(3))  # (R, Hkv, L, D)
        self.k[layer].scatter_(2, idx, k.to(self.k.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.v.dtype))
        return self.k[layer, :, :, :self.width], self.v[layer, :, :, :self.width]


class _LeanVerifier:
    """Prefill through LeanDecoder, then verify passes of L tokens per row on a ragged cache.

    fed (R,): response tokens already in a row's cache; a pass at fed feeds the pending token and the draft,
    (R, L), at slots P + fed + j and positions prompt_len + fed + j, and returns their (R, L, V) logits."""

    def __init__(self, lean, prompt_ids: Tensor, attn: Tensor, max_new_tokens: int, draft_tokens: int) -> None:
        dec = LeanDecoder(lean, attn, max_new_tokens + draft_tokens + 1)
        self.first = dec.prefill(prompt_ids, attn, positions_from_mask(attn))  # (B, V)
        self.lean, self.P, self.k = lean, attn.size(1), draft_tokens
        self.prompt_mask, self.prompt_len = attn.bool(), attn.sum(-1)
        dec.cache.k[:, :, :, self.P:].zero_()  # slots a row has not written are masked; zeros keep 0 * v finite
        dec.cache.v[:, :, :, self.P:].zero_()
        self.cache = _RaggedKV(dec.cache.k, dec.cache.v)
        self.cos_table, self.sin_table = dec.cos_table, dec.sin_table
        self.base, self.head_weight, self.head_bias = (dec.layers, dec.head), dec.head_weight, dec.head_bias
        self.pack = dec.packed_rows > 0  # the matmul weights are prepacked (CPU; posttrain.models.packed)
        self.rows, self.full = attn.size(0), attn.size(0)
        self.packs: dict[int, tuple] = {}  # input rows -> (layers, head) packed for them

    def _weights(self, n: int) -> tuple[list, Tensor | PackedLinear]:
        """The layers and head for a pass over n tokens. Packed weights exist for `rows` tokens (a pass without
        drafts) and 2 x rows (the draft budget, `speculate`); a pack zero-pads fewer tokens, and more than 2 x rows
        run the plain weights. Each pack is a copy of the weights, so there are at most two."""
        if not self.pack or (n <= self.rows == self.full):
            return self.base
        size = self.rows if n <= self.rows else 2 * self.rows
        if size not in self.packs:
            self.packs[size] = ([w.packed(size) for w in self.base[0]],
                                PackedLinear(self.head_weight, self.head_bias, size))
        return self.packs[size]

    def keep(self, rows: Tensor) -> None:
        self.cache.keep(rows)
        self.prompt_mask, self.prompt_len = self.prompt_mask[rows], self.prompt_len[rows]
        if self.pack and len(rows) <= self.rows // 2:  # repack for the smaller batch (as LeanDecoder.keep)
            self.rows, self.packs = len(rows), {}

    def verify(self, tokens: Tensor, fed: Tensor, used: Tensor) -> Tensor:
        """tokens (R, L) at fed (R,), used (R, L) bool: the positions whose logits are needed (a row's pending
        token and its draft; a prefix of each row). Only those run the position-wise work (norms, projections,
        MLP, head: `LeanBackbone.forward`'s padding-free path); the others' keys are zeros behind every used
        query's causal limit. -> (R, L, V) logits, zeros off `used`."""
        R, L = tokens.shape
        j = torch.arange(L, device=tokens.device)
        slots = self.P + fed.unsqueeze(1) + j  # (R, L)
        positions = self.prompt_len.unsqueeze(1) + fed.unsqueeze(1) + j
        width = self.P + int(fed.max()) + L
        s = torch.arange(width, device=tokens.device)
        seen = torch.zeros(R, width, dtype=torch.bool, device=tokens.device)
        seen[:, :self.P] = self.prompt_mask
        allowed = seen[:, None, :] | ((s >= self.P) & (s <= slots.unsqueeze(-1)))  # (R, L, width)
        bias = torch.zeros(R, 1, L, width, device=tokens.device).masked_fill_(
            ~allowed.unsqueeze(1), torch.finfo(torch.float32).min)
        self.cache.slots, self.cache.width = slots, width
        D = self.lean.D
        cos, sin = self.cos_table[positions].view(R, 1, L, D), self.sin_table[positions].view(R, 1, L, D)
        n = int(used.sum())
        layers, head = self._weights(n)
        sparse = n < R * L
        h = self.lean.forward(tokens, cos, sin, bias, layers, self.cache, used=used if sparse else None)
        bias_ = None if type(head) is PackedLinear else self.head_bias
        if not sparse:
            return linear(h, head, bias_)
        logits = linear(h[used], head, bias_)  # (n, V)
        return logits.new_zeros(R, L, logits.size(-1)).index_put_((used,), logits)


@torch.no_grad()
def speculative_generate(model, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
                         eos_token_id: int | Sequence[int], pad_token_id: int, temperature: float = 1.0,
                         top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                         generator: torch.Generator | None = None, draft_tokens: int = 4, ngram: int = 3,
                         stats: dict | None = None, draft_budget: float = DRAFT_BUDGET) -> RolloutBatch:
    """generate() with prompt-lookup speculative sampling: the same arguments, the same RolloutBatch, samples
    distributed exactly as generate()'s (not the same draws: the random stream is used differently).

    draft_tokens: k, the most tokens drafted per row and verify pass; ngram: n, the length of the matched suffix;
    draft_budget: draft tokens per live row and pass on average (DRAFT_BUDGET; `budget`).
    stats: a dict filled with counts: rows, verify passes, row_passes (live rows summed over passes), drafted
    and accepted draft tokens, tokens emitted (each row's first comes from the prefill, the rest from passes).
    The same counts per row come back in the batch's `decode_counts` (`DecodeCounts`), whose sums they are; a
    model decoded without speculation (no lean forward) counts one pass per token after the first, no drafts."""
    device = next((p.device for p in model.parameters()), prompt_ids.device)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    lean = lean_backbone(model)
    if lean is None or lean.head is None:
        log.info("speculative decoding needs the lean forward (%s is not covered); decoding without it",
                 type(model).__name__)
        out = generate(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                       generator=generator)
        tokens = out.response_lengths
        return _with_counts(out, (tokens - 1).clamp(min=0), torch.zeros_like(tokens), torch.zeros_like(tokens),
                            stats, passes=max(int(tokens.max()) - 1, 0) if len(tokens) else 0)
    verifier = _LeanVerifier(lean, prompt_ids, prompt_mask.long(), max_new_tokens, draft_tokens)
    return speculate(verifier, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                     pad_token_id=pad_token_id, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                     generator=generator, draft_tokens=draft_tokens, ngram=ngram, stats=stats,
                     draft_budget=draft_budget)


def speculate(verifier, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
              eos_token_id: int | Sequence[int], pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
              top_p: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None,
              draft_tokens: int = 4, ngram: int = 3, stats: dict | None = None,
              accept: Callable = accept_draft, draft_budget: float = DRAFT_BUDGET) -> RolloutBatch:
    """The speculative loop over any `verifier` with `first` (B, V) (the logits after the prompt), `verify(tokens
    (R, L), fed (R,)) -> (R, L, V)` and `keep(rows)` (see _LeanVerifier; tests pass a hand-made one). `accept`:
    the rule (accept_draft; a test swaps in a wrong one to show the exactness test can fail). draft_budget: draft
    tokens per live row per pass, on average (`budget`)."""
    device = prompt_ids.device
    stops = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    B, P = prompt_ids.shape
    N, k = max_new_tokens, draft_tokens
    ctx = torch.cat([prompt_ids, torch.full((B, N), pad_token_id, dtype=torch.long, device=device)], dim=1)
    logps = torch.zeros(B, N, device=device)
    mask = torch.zeros(B, N, dtype=torch.bool, device=device)
    start = P - prompt_mask.long().sum(-1)  # (B,) first real prompt slot of ctx

    def probs(logits: Tensor) -> Tensor:  # (..., V) scaled logits -> the sampling distribution
        flat = logits.reshape(-1, logits.size(-1))
        return filter_logits(flat, top_k, top_p).softmax(-1).view(logits.shape)

    logits = verifier.first.float() / temperature  # (B, V): the first token is a plain step
    tok = logits.argmax(-1) if greedy else sample_tokens(probs(logits), generator)
    logps[:, 0] = F.log_softmax(logits, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    ctx[:, P], mask[:, 0] = tok, True
    n_out = torch.ones(B, dtype=torch.long, device=device)  # emitted tokens per row
    fed = torch.zeros(B, dtype=torch.long, device=device)  # response tokens in the row's cache (all but the last)
    finished = torch.isin(tok, stops)
    alive = ~finished & (n_out < N)
    rows = torch.arange(B, device=device)  # the batch rows the verifier still holds, in its order
    passes = 0
    row_passes, drafted, accepted = (torch.zeros(B, dtype=torch.long, device=device) for _ in range(3))  # per row
    while alive.any():
        if int(alive[rows].sum()) < COMPACT_BELOW * len(rows):
            keep = alive[rows].nonzero().squeeze(1)
            verifier.keep(keep)
            rows = rows[keep]
        live = alive[rows]
        c, nr = ctx[rows], n_out[rows]
        draft, m = ngram_draft(c, start[rows], P + nr, ngram, k)
        m = torch.minimum(m, N - nr - 1).clamp(min=0).masked_fill(~live, 0)  # room for the token after the draft
        m = budget(m, int(draft_budget * int(live.sum())))
        L = 1 + int(m.max())
        pending = c.gather(1, (P + nr - 1).unsqueeze(1))  # (R, 1): the last emitted token, not yet in the cache
        j = torch.arange(L, device=device)
        used = (j <= m.unsqueeze(1)) & live.unsqueeze(1)  # (R, L): the pending token and the draft of live rows
        logits = verifier.verify(torch.cat([pending, draft[:, :L - 1]], dim=1), fed[rows], used).float() / temperature
        if greedy:
            a, nxt = accept_greedy(logits, draft[:, :L - 1], m)
        else:
            u = torch.rand(len(rows), L - 1, generator=generator, device=generator.device if generator else device)
            a, dist = accept(probs(logits), draft[:, :L - 1], m, u.to(device))
            nxt = sample_tokens(dist, generator)
        emitted = torch.cat([draft[:, :L - 1], torch.zeros_like(nxt).unsqueeze(1)], dim=1)  # (R, L)
        emitted = emitted.scatter(1, a.unsqueeze(1), nxt.unsqueeze(1))  # d_1..d_a, then the sampled token
        stop_at = torch.where(torch.isin(emitted, stops) & (j <= a.unsqueeze(1)), j, L).amin(-1)  # (R,)
        count = torch.minimum(a + 1, stop_at + 1).masked_fill(~live, 0)  # tokens this pass emits per row
        valid = j < count.unsqueeze(1)  # (R, L)
        lp = F.log_softmax(logits, -1).gather(-1, emitted.unsqueeze(-1)).squeeze(-1)  # (R, L)
        r_idx, j_idx = valid.nonzero(as_tuple=True)
        b_idx, t_idx = rows[r_idx], nr[r_idx] + j_idx
        ctx[b_idx, P + t_idx], logps[b_idx, t_idx], mask[b_idx, t_idx] = emitted[valid], lp[valid], True
        n_out[rows] += count
        fed[rows] += torch.where(live, a + 1, 0)
        finished[rows] |= live & (stop_at < count)
        alive = ~finished & (n_out < N)
        passes += 1
        row_passes[rows] += live.long()
        drafted[rows] += m  # 0 for rows not live
        accepted[rows] += a.masked_fill(~live, 0)
    T = int(n_out.max())
    response = ctx[:, P:P + T].masked_fill(~mask[:, :T], pad_token_id)
    out = RolloutBatch(prompt_ids=prompt_ids.cpu(), prompt_mask=prompt_mask.cpu(), response_ids=response.cpu(),
                       response_mask=mask[:, :T].float().cpu(), rollout_logprobs=logps[:, :T].cpu(),
                       finished=finished.cpu())
    return _with_counts(out, row_passes, drafted, accepted, stats, passes)


def _with_counts(batch: RolloutBatch, row_passes: Tensor, drafted: Tensor, accepted: Tensor, stats: dict | None,
                 passes: int) -> RolloutBatch:
    """`batch` with its rows' DecodeCounts (row_passes, drafted, accepted (B,) long; tokens: its response
    lengths), and `stats` (when given) filled with their sums and the verify passes."""
    tokens = batch.response_lengths  # tokens - rows were emitted by the passes (the first by the prefill)
    counts = DecodeCounts({"rows": 1, "row_passes": p, "drafted": d, "accepted": a, "tokens": t} for p, d, a, t
                          in zip(row_passes.tolist(), drafted.tolist(), accepted.tolist(), tokens.tolist()))
    if stats is not None:
        stats.update(passes=passes, **sum_counts(counts))
    return dataclasses.replace(batch, decode_counts=counts)


COUNTS = ("rows", "row_passes", "drafted", "accepted", "tokens")  # the keys of a DecodeCounts record


def sum_counts(records) -> dict[str, int]:
    """DecodeCounts records (of one call, or of many: shares, rounds, turns) -> their sums, key by key."""
    records = list(records)
    return {key: sum(int(r[key]) for r in records) for key in COUNTS}


def speculative_metrics(total: dict) -> dict[str, float]:
    """The acceptance metrics (docs/metrics.md) from summed counts (`sum_counts`, or `speculative_generate`'s
    stats): accepted draft tokens per live row and verify pass, the share of drafted tokens accepted, and tokens
    emitted per row-pass ((tokens - rows) / row_passes: 1 is no gain). Ratios of sums; nothing verified gives
    0, 0 and 1."""
    row_passes, drafted, accepted = total["row_passes"], total["drafted"], total["accepted"]
    return {"rollout/spec_accepted_per_pass": accepted / row_passes if row_passes else 0.0,
            "rollout/spec_acceptance": accepted / drafted if drafted else 0.0,
            "rollout/spec_tokens_per_pass": (total["tokens"] - total["rows"]) / row_passes if row_passes else 1.0}
