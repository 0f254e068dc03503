"""In-process batched generation with a KV cache, returning per-token log-probabilities.

Prompts are left-padded; position ids count real tokens only, exactly as the training forward pass
(`posttrain.models.logprobs.response_logprobs`) does, so the log-probabilities agree. A row stops at
EOS (or at any of the stop ids given: a chat model's end-of-turn token too); the loop stops when every row
has stopped or `max_new_tokens` is reached.

Llama and Qwen2 models decode through the lean forward (`posttrain.models.lean`): a KV cache preallocated for
the whole generation, fused projections, one attention mask built per batch, and repeated prompts (GRPO's G
samples of each) prefilled once. Any other causal LM decodes through its own HF forward and a DynamicCache.
Both give the same tokens and log-probabilities up to float rounding (tests/models/test_lean.py).

The returned log-probability of a sampled token is log softmax(logits / temperature), i.e. the
temperature-scaled policy *before* top-k / top-p filtering, which is what the training forward pass
computes (the common convention of TRL, OpenRLHF and verl; filtering makes the sampling distribution
differ slightly from the one being optimised).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import DynamicCache

from posttrain.batch import RolloutBatch
from posttrain.models.adapters import hf_module
from posttrain.models.lean import LeanDecoder, lean_backbone
from posttrain.models.logprobs import positions_from_mask
from posttrain.models.memory import release_free_memory


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """(B, V) logits with everything outside the top-k / nucleus set to -inf (0 and 1.0 switch them off)."""
    if top_k > 0 and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def cache_argument(model) -> str:
    """The keyword a model's forward takes its KV cache by: `cache` (transformers 5.2x, which deprecates the
    old name with a FutureWarning) or `past_key_values` (earlier releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sample_tokens(probs: Tensor, generator: torch.Generator | None = None, overwrite: bool = False) -> Tensor:
    """One token per row of (B, V) probabilities (or any non-negative weights: each row is normalised by its
    total), by inverting each row's CDF at one uniform draw: token i with cdf[i-1] <= u * cdf[V-1] < cdf[i], so a
    zero-probability token is never drawn. One uniform per row (B in all): at a 49,152-token vocabulary this is
    ~20x faster than torch.multinomial, whose CPU kernel draws an exponential for every entry (B x V).
    overwrite: the CDF is summed in place over `probs`. -> (B,) long."""
    cdf = probs.cumsum_(-1) if overwrite else probs.cumsum(-1)
    device = generator.device if generator is not None else probs.device
    u = torch.rand(probs.size(0), 1, generator=generator, device=device).to(probs.device, cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=probs.size(-1) - 1)


def sample_with_logprobs(logits: Tensor, generator: torch.Generator | None = None, top_k: int = 0,
                         top_p: float = 1.0, greedy: bool = False,
                         buffer: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(B, V) float logits -> (B,) tokens drawn from softmax(filter_logits(logits)) (the argmax when greedy) and
    (B,) their log-probabilities under softmax(logits), unfiltered: log p = z_a - m - log sum_v exp(z_v - m), m the
    row's maximum (log_softmax's equation, to float rounding).

    The weights exp(z - m) are written into `buffer` ((B, V) float32, reused across decode steps; None: a new
    one) and the CDF summed over them in place, so a step makes no (B, V) tensor (at SmolLM2's 49,152 tokens and 64
    rows each is a 12.6 MB block): benchmarks/sampling.py measured 15.3 -> 6.3 ms per step against the former four
    passes into new tensors (docs/performance.md, "The backward's dx on oneDNN, and sampling in one buffer")."""
    m = logits.amax(-1, keepdim=True)  # (B, 1)
    weights = torch.sub(logits, m, out=buffer) if buffer is not None else logits - m
    log_z = weights.exp_().sum(-1, keepdim=True).log_()  # (B, 1) log sum_v exp(z_v - m)
    if greedy:
        tok = logits.argmax(-1)
    else:
        filtered = filter_logits(logits, top_k, top_p)
        if filtered is not logits:  # top-k / top-p: draw from the filtered weights
            torch.sub(filtered, m, out=weights).exp_()
        tok = sample_tokens(weights, generator, overwrite=True)
    logp = (logits.gather(-1, tok.unsqueeze(-1)) - m - log_z).squeeze(-1)
    return tok, logp


class _HFStepper:
    """Decoding through the model's own forward and a transformers DynamicCache (any causal LM)."""

    def __init__(self, model, prompt_ids: Tensor, attn: Tensor) -> None:
        model = hf_module(model)  # a LoRA model: its base model, with the LoRA layers in it
        self.model, self.attn, self.cache = model, attn, DynamicCache()
        self.cache_arg = cache_argument(model)
        out = model(input_ids=prompt_ids, attention_mask=attn, position_ids=positions_from_mask(attn),
                    **{self.cache_arg: self.cache}, use_cache=True, logits_to_keep=1)
        self.first = out.logits[:, -1]

    def keep(self, rows: Tensor) -> None:
        self.cache.reorder_cache(rows)  # index_select on the batch dimension of every layer
        self.attn = self.attn[rows]

    def step(self, tokens: Tensor, positions: Tensor, alive: Tensor) -> Tensor:
        self.attn = torch.cat([self.attn, alive.long().unsqueeze(1)], dim=1)
        out = self.model(input_ids=tokens.unsqueeze(1), attention_mask=self.attn, position_ids=positions.unsqueeze(1),
                         **{self.cache_arg: self.cache}, use_cache=True)
        return out.logits[:, -1]


# Rows with the same prompt decode against one copy of its keys and values (models/shared_kv.py); False copies
# them to every row (the same logits to float rounding; tests/models/test_shared_kv.py compares the two).
SHARE_PROMPTS = True


class _LeanStepper:
    """Decoding through posttrain.models.lean: preallocated KV cache, fused projections (Llama, Qwen2)."""

    def __init__(self, lean, prompt_ids: Tensor, attn: Tensor, max_new_tokens: int) -> None:
        self.decoder = LeanDecoder(lean, attn, max_new_tokens, share_prompts=SHARE_PROMPTS)
        self.first = self.decoder.prefill(prompt_ids, attn, positions_from_mask(attn))

    def keep(self, rows: Tensor) -> None:
        self.decoder.keep(rows)

    def step(self, tokens: Tensor, positions: Tensor, alive: Tensor) -> Tensor:
        return self.decoder.step(tokens, positions)


COMPACT_BELOW = 0.75  # finished rows leave the decode batch once the rows decoding are fewer than this share


@torch.no_grad()
def generate(model, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
             eos_token_id: int | Sequence[int], pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, greedy: bool = False, generator: torch.Generator | None = None) -> RolloutBatch:
    """Sample (or decode greedily) up to `max_new_tokens` tokens for each left-padded prompt (B, P).

    A row stops at the first token in `eos_token_id` (one id, or several: a chat model's EOS and end-of-turn
    token, posttrain.models.chat.stop_token_ids); that token is part of the response (response_mask 1) and
    every position after it is padding (pad_token_id, mask 0), also where the pad id is the stop id.

    Llama and Qwen2 models decode through the lean forward (posttrain.models.lean), anything else through
    its HF forward; both give the same tokens and log-probs up to float rounding.
    """
    device = next((p.device for p in model.parameters()), prompt_ids.device)  # prompts move to the model; the
    # batch comes back on the CPU
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    stops = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    B = prompt_ids.size(0)
    attn = prompt_mask.long()
    lean = lean_backbone(model)
    lean = lean if lean is not None and lean.head is not None else None
    stepper = (_LeanStepper(lean, prompt_ids, attn, max_new_tokens) if lean is not None
               else _HFStepper(model, prompt_ids, attn))
    raw = stepper.first  # (B, V); a finished row keeps its last logits (sampled from, then discarded)
    next_pos = attn.sum(-1)  # (B,): position of the first response token
    tokens, logps, masks = [], [], []
    alive = torch.ones(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)  # the batch rows the stepper still decodes, in its order
    weights = torch.empty(raw.shape, dtype=torch.float32, device=device)  # sampling's (B, V) buffer, every step's
    scaled = None if temperature == 1.0 and raw.dtype == torch.float32 else torch.empty_like(weights)
    for t in range(max_new_tokens):
        logits = raw if scaled is None else scaled.copy_(raw).div_(temperature)  # (B, V) float32; x / 1 == x
        # every row draws, finished or not, so the random stream does not depend on when rows finish
        tok, logp = sample_with_logprobs(logits, generator, top_k, top_p, greedy, weights)
        tok = tok.masked_fill(~alive, pad_token_id)
        masks.append(alive)
        tokens.append(tok)
        logps.append(logp.masked_fill(~alive, 0.0))
        alive = alive & ~torch.isin(tok, stops)
        if t == max_new_tokens - 1 or not alive.any():
            break
        if int(alive[rows].sum()) < COMPACT_BELOW * len(rows):
            keep = alive[rows].nonzero().squeeze(1)
            stepper.keep(keep)
            rows = rows[keep]
        out = stepper.step(tok[rows], (next_pos + t)[rows], masks[-1][rows])
        raw = out if len(rows) == B else raw.index_copy_(0, rows, out)  # (a finished row keeps its last logits)
    batch = RolloutBatch(prompt_ids=prompt_ids.cpu(), prompt_mask=prompt_mask.cpu(),
                         response_ids=torch.stack(tokens, 1).cpu(), response_mask=torch.stack(masks, 1).float().cpu(),
                         rollout_logprobs=torch.stack(logps, 1).cpu(), finished=(~alive).cpu())
    if B * raw.size(-1) * (len(tokens) + 1) * 4 > RELEASE_ABOVE:  # freed at least that many bytes of logits
        del stepper, raw, logits, weights, scaled
        release_free_memory()  # the heap pages this generation freed go back to the OS (models/memory.py)
    return batch


# A generation whose logits alone (B x V x steps float32) exceeded this returns its freed heap pages to the OS
# afterwards: ~0.6 GB after a SmolLM2 generation of 64 x 64 tokens. A tiny model's steps (kilobytes) skip the call.
RELEASE_ABOVE = 1 << 28
