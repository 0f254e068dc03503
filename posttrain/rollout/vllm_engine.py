"""vLLM as a rollout engine (`ray.engine: vllm`): the same interface as TorchEngine, on a GPU.

Status: written against vLLM's public offline API (LLM, SamplingParams, TokensPrompt, worker_extension_cls and
collective_rpc; vLLM >= 0.10) but NOT run here: the machine this was written on has no GPU, and
tests/distributed/test_vllm_engine.py (marked gpu) skips without CUDA and vllm. docs/distributed.md says the same.

    engine = VLLMEngine(policy, tokenizer, seed=0, gpu_memory_utilization=0.3, dtype="auto")
    batch = engine.generate(prompt_ids, prompt_mask, max_new_tokens=..., ..., generator=g)   # RolloutBatch
    sha = engine.load_weights(state_dict)       # the learner's weights, loaded in place (no restart)

- The policy is written to a temporary directory (HF format), vLLM is started on it in this process
  (VLLM_ENABLE_V1_MULTIPROCESSING=0, so the model runner is reachable), and the directory is deleted.
- Sampling: each row gets its own seed drawn from `generator`, so a share is reproducible from its shard seed;
  temperature, top_k, top_p as configured; greedy is temperature 0. Generation stops at EOS (kept in the
  response, as posttrain's generation does) or after max_new_tokens.
- Log-probabilities: vLLM returns the sampled token's log-probability (SamplingParams(logprobs=0), after
  temperature, top-k and top-p: logprobs_mode="processed_logprobs", vLLM >= 0.10.2) as `rollout_logprobs`. They
  differ from the trainer's (fused kernels, often bf16), so the loop recomputes log pi_old with the learner's
  training forward pass (`learner_forward` in rl/loop.py, when ray.engine is not torch), the ratio invariant keeps
  its fp32 tolerance, the mismatch is logged (rollout_kl, ...) and rl.rollout_correction can weigh it.
- Weight sync: `load_weights` sends (name, tensor) pairs with HF names to vLLM's model runner, whose model
  `load_weights` maps them onto its fused layout (qkv, gate_up); prefix caching is off, so no stale KV cache.
  The checksum returned is that of the tensors received: vLLM's fused parameters cannot be hashed against the
  learner's, so the check covers the transfer, not the copy into the fused layout.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from torch import Tensor

from posttrain.batch import RolloutBatch, right_pad
from posttrain.rollout.engines import state_dict_sha256


class WeightSync:
    """Mixed into vLLM's GPU worker (worker_extension_cls); called through LLM.collective_rpc."""

    def posttrain_load_weights(self, weights: list[tuple[str, Tensor]]) -> int:
        device = getattr(self, "device", None) or torch.device("cuda")
        self.model_runner.model.load_weights(weights=[(name, t.to(device)) for name, t in weights])
        torch.cuda.synchronize()
        return len(weights)


class VLLMEngine:
    """A rollout engine backed by vllm.LLM on this process's GPU."""

    def __init__(self, model, tokenizer, seed: int = 0, gpu_memory_utilization: float = 0.3, dtype: str = "auto"):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm  # noqa: PLC0415
        except ImportError:
            from posttrain.errors import ConfigError  # noqa: PLC0415

            raise ConfigError("ray.engine 'vllm' needs vLLM on the rollout workers: pip install 'posttrain[vllm]' "
                              "(a CUDA machine)") from None
        self._vllm = vllm
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        path = tempfile.mkdtemp(prefix="posttrain-vllm-")
        try:
            model.save_pretrained(path, safe_serialization=True)
            tokenizer.save_pretrained(path)
            self.llm = vllm.LLM(model=path, tokenizer=path, skip_tokenizer_init=True, dtype=dtype, seed=seed,
                                gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=False,
                                logprobs_mode="processed_logprobs", worker_extension_cls=f"{__name__}.WeightSync")
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, eos_token_id: int,
                 pad_token_id: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 greedy: bool = False, generator: torch.Generator | None = None) -> RolloutBatch:
        """Sample (or decode greedily) up to `max_new_tokens` tokens for each left-padded prompt (B, P)."""
        from vllm.inputs import TokensPrompt  # noqa: PLC0415

        B = prompt_ids.size(0)
        seeds = torch.randint(0, 2**31 - 1, (B,), generator=generator).tolist() if not greedy else [0] * B
        prompts = [TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
                   for ids, mask in zip(prompt_ids, prompt_mask, strict=True)]
        params = [self._vllm.SamplingParams(n=1, max_tokens=max_new_tokens, temperature=0.0 if greedy else temperature,
                                            top_k=top_k if top_k > 0 else -1, top_p=top_p, seed=None if greedy else s,
                                            stop_token_ids=[eos_token_id], detokenize=False, logprobs=0)
                  for s in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        responses, finished, logprobs = [], [], []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)[:max_new_tokens]
            logps = [step[tok].logprob for tok, step in zip(ids, completion.logprobs or [], strict=False)]
            stopped = completion.finish_reason == "stop"
            if stopped and (not ids or ids[-1] != eos_token_id) and len(ids) < max_new_tokens:
                ids.append(eos_token_id)  # EOS belongs to the response (and its loss), as in posttrain.rollout
            responses.append(ids)
            logprobs.append(logps + [0.0] * (len(ids) - len(logps)))  # an appended EOS was not sampled: 0
            finished.append(stopped)
        response_ids, response_mask = right_pad(responses, pad_token_id)
        rollout_logprobs = torch.zeros_like(response_mask)
        for i, logps in enumerate(logprobs):
            rollout_logprobs[i, :len(logps)] = torch.tensor(logps, dtype=rollout_logprobs.dtype)
        return RolloutBatch(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                            response_mask=response_mask, rollout_logprobs=rollout_logprobs,
                            finished=torch.tensor(finished, dtype=torch.bool))

    def load_weights(self, state_dict: dict[str, Tensor]) -> str:
        """Load the learner's weights into vLLM in place; returns the sha256 of the tensors received."""
        sha = state_dict_sha256(state_dict)
        self.llm.collective_rpc("posttrain_load_weights", args=(list(state_dict.items()),))
        return sha
