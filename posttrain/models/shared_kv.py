"""Decode attention over a cache that stores each distinct prompt's keys and values once.

GRPO samples G responses per prompt, so a decode batch of B rows holds only U = B / G distinct prompts. A cache
that copies each prompt's keys and values to its G rows (models/lean.py `KVCache`) makes every decode step read
them G times, and attention against a cache is bound by reading it (SmolLM2 at 8 prompts x 4 samples, <= 256
new tokens: 8.2 s of a 32 s generation in `bmm`). `SharedPromptKV` keeps the prompts' part once and each row's
response part, and computes the same attention in two products joined by one softmax:

    s_p = (q scale) K_p^T + bias_p     the row's prompt; a prompt's G rows are the rows of one product
    s_r = (q scale) K_r^T              the row's own response positions so far (all of them are attended)
    out = softmax([s_p | s_r]) [V_p ; V_r]

The same equation as attention over the copied cache, so the logits agree with it to float rounding (~1e-6;
tests/models/test_shared_kv.py). Rows sit in slots: the j-th row with prompt u is slot u G + j. While every
row decodes and the prompts' rows are grouped in order (GRPO's layout) slots are rows and the products need no
gather; once finished rows leave the batch (`keep`), the live rows' queries are gathered into their slots (a
finished row's slot gets zeros, whose output is dropped) and the results gathered back.

Shapes: R rows decoding, U distinct prompts, G slots per prompt (the largest group), P prompt positions
(left-padded), H / Hkv query / key-value heads (g = H / Hkv), D head size.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SharedPromptKV:
    """The distinct prompts' keys and values (from the prefill) and every row's response keys and values, with
    room for `capacity` response positions; `length` counts the positions filled (P + responses so far)."""

    def __init__(self, k: Tensor, v: Tensor, prompt_mask: Tensor, inverse: Tensor, capacity: int) -> None:
        """k, v: (layers, U, Hkv, P, D); prompt_mask: (U, P) real tokens; inverse: (B,) row -> its prompt."""
        n, U, Hkv, P, D = k.shape
        B = inverse.numel()
        self.pk, self.pv, self.P, self.U = k, v, P, U
        self.rk = k.new_empty(n, B, Hkv, capacity, D)
        self.rv = v.new_empty(n, B, Hkv, capacity, D)
        self.length = P
        self.G = int(torch.bincount(inverse, minlength=U).max())
        # occurrence of each row among its prompt's rows: j = rows before it with the same prompt
        same = inverse.unsqueeze(0) == inverse.unsqueeze(1)  # (B, B)
        j = (same & torch.ones_like(same).tril(-1)).sum(1)
        self.slot = inverse * self.G + j  # (B,)
        self.prompt_bias = torch.zeros(U, P, device=k.device).masked_fill_(~prompt_mask.bool(),
                                                                          torch.finfo(torch.float32).min)
        self._layout()

    def _layout(self) -> None:
        """The gathers between rows and slots for the rows decoding now (`slot`)."""
        R, slots = len(self.slot), self.U * self.G
        self.identity = R == slots and torch.equal(self.slot, torch.arange(R, device=self.slot.device))
        # slot -> the row in it, or R (a zero row) for a slot without one
        self.gather = torch.full((slots,), R, dtype=torch.long, device=self.slot.device).scatter_(
            0, self.slot, torch.arange(R, device=self.slot.device))
        self.bias = self.prompt_bias[self.slot // self.G].view(R, 1, 1, self.P)  # (R, 1, 1, P)

    def keep(self, rows: Tensor) -> None:
        """Continue with only `rows` (indices into the current batch); the prompts' part stays as it is."""
        self.rk, self.rv = self.rk[:, rows], self.rv[:, rows]
        self.slot = self.slot[rows]
        self._layout()

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float,
               recompute: bool = True) -> Tensor:
        """Store this step's k, v (R, Hkv, 1, D) and return softmax(q K^T scale + bias) V over the row's prompt and
        response: q (R, H, 1, D) -> (R, H, 1, D). `bias` (the caller's, for a copied cache) is not needed: the
        prompts' padding is in `prompt_bias` and every response position is attended."""
        R, H, L, D = q.shape
        if L != 1:
            raise ValueError(f"SharedPromptKV decodes one position per row at a time, got {L}")
        U, G, P = self.U, self.G, self.P
        Hkv = self.pk.size(2)
        g = H // Hkv
        t = self.length - P
        self.rk[layer, :, :, t:t + 1] = k
        self.rv[layer, :, :, t:t + 1] = v
        rk, rv = self.rk[layer, :, :, :t + 1], self.rv[layer, :, :, :t + 1]  # (R, Hkv, t+1, D)
        qr = (q * scale).reshape(R, Hkv, g, D)
        qs = qr.reshape(R, H * D)
        if not self.identity:
            qs = torch.cat([qs, qs.new_zeros(1, H * D)]).index_select(0, self.gather)  # (U G, H D)
        qs = qs.view(U, G, Hkv, g, D).transpose(1, 2).reshape(U, Hkv, G * g, D)
        sp = torch.matmul(qs, self.pk[layer].transpose(-1, -2))  # (U, Hkv, G g, P)
        sp = sp.view(U, Hkv, G, g, P).transpose(1, 2).reshape(U * G, Hkv, g, P)
        if not self.identity:
            sp = sp.index_select(0, self.slot)  # (R, Hkv, g, P)
        sr = torch.matmul(qr, rk.transpose(-1, -2))  # (R, Hkv, g, t+1)
        p = torch.cat([sp + self.bias, sr], dim=-1).softmax(-1)  # (R, Hkv, g, P + t + 1)
        pp = p[..., :P]
        if not self.identity:
            pp = pp.new_zeros(U * G, Hkv, g, P).index_copy_(0, self.slot, pp)
        pp = pp.reshape(U, G, Hkv, g, P).transpose(1, 2).reshape(U, Hkv, G * g, P)
        op = torch.matmul(pp, self.pv[layer])  # (U, Hkv, G g, D)
        op = op.view(U, Hkv, G, g, D).transpose(1, 2).reshape(U * G, Hkv, g, D)
        if not self.identity:
            op = op.index_select(0, self.slot)
        out = op + torch.matmul(p[..., P:], rv)  # (R, Hkv, g, D)
        return out.reshape(R, H, 1, D)
