"""The training forward pass: per-token log-probabilities (and entropy) of a response given its prompt.

Generation (`posttrain.rollout.generate`) lays tokens out the same way (left-padded prompt, response
after it, positions counted over real tokens only), so for the same tokens both give the same
log-probabilities and the first on-policy PPO ratio is 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from posttrain.models.adapters import hf_module
from posttrain.models.lean import lean_backbone, positions_from_mask
from posttrain.models.packed import backward_reorder, fixed_store, linear, onednn_mm, training_reorder


def causal_lm_logits(model, input_ids: Tensor, attention_mask: Tensor, keep: int) -> Tensor:
    """(B, L) left-padded ids and mask -> (B, keep, V) logits of the last `keep` positions, positions counted
    over real tokens (the HF forward; `response_logprobs` takes the lean one where it can)."""
    return hf_module(model)(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=positions_from_mask(attention_mask), logits_to_keep=keep, use_cache=False).logits


def response_hidden_states(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                           response_mask: Tensor) -> Tensor | None:
    """(B, T, C) final hidden states that predict each response token, through the lean forward
    (posttrain.models.lean: Llama, Qwen2; shared prompts run once), or None where it does not apply."""
    lean = lean_backbone(model)
    if lean is None:
        return None
    return lean.response_hidden(prompt_ids, prompt_mask, response_ids, response_mask)


def response_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                      response_mask: Tensor, temperature: float = 1.0,
                      with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log pi(a_t | s_t) for every response token, and optionally the entropy of pi(. | s_t).

    prompt_ids, prompt_mask: (B, P) left-padded. response_ids, response_mask: (B, T) right-padded.
    Returns logprobs (B, T) (0 off the mask) and entropy (B, T) or None. Logits are divided by
    `temperature`, as in sampling.
    """
    lean = lean_backbone(model)
    if lean is not None and lean.head is not None:
        hidden = lean.response_hidden(prompt_ids, prompt_mask, response_ids, response_mask)  # (B, T, C)
        return chunked_logprobs(hidden, lean.head.weight, lean.head.bias, response_ids, response_mask, temperature,
                                with_entropy)
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)  # (B, P+T)
    attn = torch.cat([prompt_mask.long(), response_mask.long()], dim=1)
    logits = causal_lm_logits(model, input_ids, attn, keep=response_ids.size(1) + 1)[:, :-1]
    logits = logits.float() / temperature  # (B, T, V): the logits at s_t predict a_t
    logp_all = F.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) * response_mask
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1) * response_mask
    return logprobs, entropy


CHUNK_ELEMENTS = 1 << 23  # logits per chunk: 32 MiB of float32, e.g. 170 tokens of a 49,152-token vocabulary
# Under autograd (`_HeadLogprobs`), a call's log-softmax outputs are kept for the backward pass when they
# hold at most this many elements (512 MiB of float32; a SmolLM2 micro-batch of 8 x <= 256 response tokens holds
# <= 100M), so the backward does not compute the head's product again; above it each chunk's logits are recomputed.
KEEP_ELEMENTS = 1 << 27
# Under bf16 autocast the backward gathers dL/dz of this many elements (256 MiB of bf16: every chunk of a SmolLM2
# micro-batch of <= 2,730 tokens) before its dh and dW products: one (V, N) x (N, C) product for dW rather than one
# per 170-token chunk, each of which wrote a whole (V, C) bf16 part and cast it to float32 (on the project's Zen 4
# EPYC 4.3 s of a 51 s update at 8 x 4 x <= 256 tokens, docs/performance.md).
LOW_GROUP_ELEMENTS = 1 << 27


def _log_softmax(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
                 reordered: Tensor | None, low: Tensor | None = None) -> Tensor:
    """(N, C) hidden -> (N, V) float32 log_softmax((W h + b) / temperature). Outside autograd the log-softmax
    overwrites the logits (one (N, V) buffer, not two: each is a fresh 32 MiB block the kernel faults in page by
    page; the values are the same, tests/models/test_chunked_logprobs.py). low: W in autocast's dtype
    (`autocast_head`), for the product W h in it (as autocast's F.linear computes it, without casting W again)."""
    if low is None:
        logits = linear(hidden, weight, bias, reordered).float()  # (N, V)
    else:
        logits = torch.mm(hidden.to(low.dtype), low.t()).float()
        if bias is not None:
            logits += bias
    if logits.requires_grad:
        return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)  # x / 1 == x exactly
    if temperature != 1.0:
        logits.div_(temperature)
    return torch.log_softmax(logits, dim=-1, out=logits)


def _token_logprobs(hidden: Tensor, actions: Tensor, weight: Tensor, bias: Tensor | None, temperature: float,
                    with_entropy: bool, reordered: Tensor | None = None,
                    low: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(N, C) hidden, (N,) actions -> (N,) log pi(a | s) and (N,) entropy (zeros when not asked for). `reordered`:
    the head as packed.training_reorder gives it (the same values), or None; `low`: `_log_softmax`'s (only
    without autograd: the product on it has no gradient to W)."""
    logp_all = _log_softmax(hidden, weight, bias, temperature, reordered, low)
    logprobs = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else logprobs.new_zeros(())
    return logprobs, entropy


class _HeadLogprobs(torch.autograd.Function):
    """lp_i = log p_i(a_i) and H_i = -sum_v p_iv log p_iv, p_i = softmax(z_i), z_i = (W h_i + b) / tau, over N
    positions in chunks of n, with the gradient written out rather than autograd's graph through gather,
    log_softmax and the entropy. With g = dL/dlp and e = dL/dH (None: H is not differentiated):

        dL/dz_iv = g_i 1[v = a_i] - p_iv (g_i + e_i (log p_iv + H_i))
        dL/dh_i = sum_v dL/dz_iv W_v / tau,   dL/dW = sum_i dL/dz_i h_i^T / tau,   dL/db = sum_i dL/dz_i / tau

    h (N, C), a (N,), W (V, C), b (V,) or None, all float32 -> lp (N,), H (N,) (zeros unless `entropy`). `keep`:
    the chunks' log-softmax outputs are kept for the backward pass, which turns them into dL/dz in place;
    otherwise it computes each chunk's logits again. dL/dW accumulates in one float32 (V, C) buffer, not one per
    chunk. `low`: W in autocast's dtype (bf16 mixed precision, `autocast_head`): the three products W h, dz W and
    dz^T h take their operands in it, as autocast's F.linear and its backward do, and the softmax and dL/dz stay
    float32. One backward pass per graph (the kept buffers are used up)."""

    @staticmethod
    def forward(ctx, h: Tensor, a: Tensor, weight: Tensor, bias: Tensor | None, temperature: float, n: int,
                reordered: Tensor | None, keep: bool, entropy: bool, low: Tensor | None) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        lps, ents, kept = [], [], []
        scratch = h.new_empty(min(n, h.size(0)), weight.size(0), dtype=torch.float32) if entropy else None
        for s in range(0, h.size(0), n):
            logp = _log_softmax(h[s:s + n], weight, bias, temperature, reordered, low)  # (n, V)
            lps.append(logp.gather(-1, a[s:s + n].unsqueeze(-1)).squeeze(-1))
            if entropy:  # -sum_v p log p, with p in one buffer reused by every chunk
                ents.append(torch.exp(logp, out=scratch[:len(logp)]).mul_(logp).sum(-1).neg_())
            if keep:
                kept.append(logp)
        lp = torch.cat(lps) if lps else h.new_zeros(0)
        ent = torch.cat(ents) if ents else torch.zeros_like(lp)
        ctx.save_for_backward(h, a, weight, bias, ent)
        ctx.temperature, ctx.n, ctx.reordered, ctx.kept, ctx.used, ctx.low = temperature, n, reordered, kept, False, low
        ctx.mark_non_differentiable(*(() if entropy else (ent,)))
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp: Tensor | None, g_ent: Tensor | None):
        if ctx.used:
            raise RuntimeError("the head's log-probs were differentiated once already (their buffers are used up)")
        ctx.used = True
        h, a, weight, bias, ent = ctx.saved_tensors
        tau, n, kept = ctx.temperature, ctx.n, ctx.kept
        low = ctx.low
        if g_lp is None and g_ent is None:
            return (None,) * 10
        g_lp = torch.zeros_like(ent) if g_lp is None else g_lp
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        dh = torch.empty_like(h) if need_h else None
        dw = db = None
        scratch = None if g_ent is None else h.new_empty(min(n, h.size(0)), weight.size(0), dtype=torch.float32)
        w_t = backward_reorder(weight, h.size(0)) if need_h and low is None else None  # dh on oneDNN (packed.py)
        if low is not None:  # bf16: dz of up to `group` rows gathered, then one product each for dh and dW
            group = max(n, LOW_GROUP_ELEMENTS // weight.size(0) // n * n)
            dz_low = h.new_empty(min(group, h.size(0)), weight.size(0), dtype=low.dtype)
            h_low = h.to(low.dtype) if need_w else None
        for c, s in enumerate(range(0, h.size(0), n)):
            hc, g, idx = h[s:s + n], g_lp[s:s + n].unsqueeze(1), a[s:s + n].unsqueeze(1)
            logp = kept[c] if kept else _log_softmax(hc, weight, bias, tau, ctx.reordered, low)  # (n, V)
            if kept:
                kept[c] = None  # freed once used
            if g_ent is None:
                dz = logp.exp_().mul_(-g)
            else:
                p = torch.exp(logp, out=scratch[:len(logp)])
                dz = logp.add_(ent[s:s + n].unsqueeze(1)).mul_(g_ent[s:s + n].unsqueeze(1)).add_(g).mul_(p).neg_()
            dz.scatter_add_(1, idx, g)  # (n, V) dL/dz
            if tau != 1.0:
                dz.div_(tau)
            if low is not None:  # the products in autocast's dtype over a group of chunks, accumulated in float32
                g0 = s - s % group  # the group's first row
                dz_low[s - g0:s - g0 + len(dz)] = dz
                end = s + len(dz)
                if end % group == 0 or end == h.size(0):
                    rows = dz_low[:end - g0]
                    if need_h:
                        dh[g0:end] = rows.mm(low)
                    if need_w:
                        part = rows.t().mm(h_low[g0:end])
                        dw = part.float() if dw is None else dw.add_(part)
            else:
                if need_h:
                    if w_t is None:
                        torch.mm(dz, weight, out=dh[s:s + n])
                    else:
                        dh[s:s + n] = onednn_mm(dz, w_t)
                if need_w:
                    dw = dz.t().mm(hc) if dw is None else dw.addmm_(dz.t(), hc)
            if need_b:
                db = dz.sum(0) if db is None else db.add_(dz.sum(0))
        return dh, None, dw, db, None, None, None, None, None, None


def chunked_logprobs(hidden: Tensor, weight: Tensor, bias: Tensor | None, actions: Tensor, mask: Tensor,
                     temperature: float = 1.0, with_entropy: bool = False,
                     chunk_elements: int = CHUNK_ELEMENTS,
                     keep_elements: int = KEEP_ELEMENTS) -> tuple[Tensor, Tensor | None]:
    """log pi(a_t | s_t) = log_softmax(W h_t + b)[a_t] / temperature-scaled, and the entropy of pi(. | s_t), for
    the positions in `mask` only, without a (B, T, V) tensor.

    hidden (B, T, C) final hidden states predicting `actions` (B, T); weight (V, C), bias (V,) or None; mask
    (B, T). Returns (B, T) log-probs and entropy (or None), 0 off the mask. The masked positions are taken in
    chunks of chunk_elements // V tokens, so no tensor is larger than one chunk's (n, V) logits. Under autograd
    with float32 hidden states and head (the RL update, under bf16 autocast too), `_HeadLogprobs` differentiates
    it with its gradient written out:
    the chunks' log-softmax outputs are kept for the backward pass when they total at most `keep_elements`,
    else each chunk's logits are recomputed there. Otherwise, with more than one chunk, each chunk is
    recomputed in the backward pass by activation checkpointing, so at most one chunk's logits exist at a time.
    Same values and gradients as the plain full-vocabulary computation, to float rounding."""
    B, T, C = hidden.shape
    where = mask.reshape(-1).nonzero().squeeze(1)  # (N,) flat indices of the positions used
    h = hidden.reshape(B * T, C).index_select(0, where)
    a = actions.reshape(B * T).index_select(0, where)
    n = max(1, chunk_elements // weight.size(0))
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    reordered = training_reorder(weight) if len(where) > n else None  # one snapshot of the head for every chunk
    low = autocast_head(weight)
    if grad and _written_out(h, weight, bias):
        keep = len(where) * weight.size(0) <= keep_elements
        lp, ent = _HeadLogprobs.apply(h, a, weight, bias, temperature, n, reordered, keep, with_entropy, low)
        return _scatter([lp], where, B, T, hidden), _scatter([ent], where, B, T, hidden) if with_entropy else None
    recompute = grad and len(where) > n
    lps, ents = [], []
    low = None if grad else low  # under autograd (not float32 masters) autocast's F.linear casts W per chunk
    for s in range(0, len(where), n):
        args = (h[s:s + n], a[s:s + n], weight, bias, temperature, with_entropy, reordered, low)
        lp, ent = checkpoint(_token_logprobs, *args, use_reentrant=False) if recompute else _token_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    logprobs = _scatter(lps, where, B, T, hidden)
    return logprobs, _scatter(ents, where, B, T, hidden) if with_entropy else None


def _written_out(h: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether `_HeadLogprobs` serves this call: float32 tensors (under autocast too: its products then take
    `autocast_head`'s copy of W)."""
    return h.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)


def autocast_head(weight: Tensor) -> Tensor | None:
    """The head W in autocast's dtype where autocast on its device computes in another dtype (bf16 mixed
    precision), else None: cast once per call, or once per `weights_fixed` block (the reference pass and a
    minibatch's micro-batches), not once per chunk as F.linear under autocast would. A detached snapshot."""
    dev = weight.device.type
    if not torch.is_autocast_enabled(dev) or torch.get_autocast_dtype(dev) == weight.dtype:
        return None
    dtype, store = torch.get_autocast_dtype(dev), fixed_store()
    key = ("logprobs.head", id(weight), dtype)
    held = store.get(key) if store is not None else None
    if held is None or held[0] is not weight or held[1] != (weight.data_ptr(), weight._version):
        held = (weight, (weight.data_ptr(), weight._version), weight.detach().to(dtype))
        if store is not None:
            store[key] = held
    return held[2]


def _scatter(parts: list[Tensor], where: Tensor, B: int, T: int, like: Tensor) -> Tensor:
    """The chunks' (n,) values placed at their flat positions of a (B, T) float32 tensor of zeros."""
    values = torch.cat(parts) if parts else like.new_zeros(0, dtype=torch.float32)
    return like.new_zeros(B * T, dtype=torch.float32).index_put((where,), values).view(B, T)
