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
- LoRA (`model.peft: lora`): vLLM starts on the base model (the adapter's frozen weights under their plain names,
  `plain_state_dict`) with `enable_lora=True` and `max_lora_rank` the smallest rank vLLM accepts that is >= r, and
  every request carries a `LoRARequest`. A sync sends the adapter alone (the rollout worker refuses anything
  else): the engine loads it into its own CPU copy of the peft model, writes it in peft's format
  (adapter_config.json, adapter_model.safetensors) to a new directory, and switches to a `LoRARequest` with a new
  id, which vLLM loads on the next generate; the previous directory is deleted then (it was loaded, or never will
  be). The checksum is that of the adapter the CPU copy holds, as TorchEngine computes it. Prompt tuning is
  refused (vLLM serves no soft prompts). tests/distributed/test_vllm_lora.py checks the files and requests this
  path hands vLLM against a stand-in for vLLM on the CPU; the GPU test of test_vllm_engine.py has not run.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from torch import Tensor

from posttrain.batch import RolloutBatch, right_pad
from posttrain.errors import ConfigError
from posttrain.models.adapters import is_peft, is_prompt_tuned, plain_state_dict
from posttrain.rollout.engines import state_dict_sha256

# The LoRA ranks vLLM's `max_lora_rank` takes (vllm/config/lora.py).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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
        if is_prompt_tuned(model):
            raise ConfigError("model.peft=prompt_tuning is not available with ray.engine=vllm (vLLM serves no soft "
                              "prompts); set ray.engine=torch")
        try:
            import vllm  # noqa: PLC0415
        except ImportError:
            raise ConfigError("ray.engine 'vllm' needs vLLM on the rollout workers: pip install 'posttrain[vllm]' "
                              "(a CUDA machine)") from None
        self._vllm = vllm
        self.eos, self.pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.peft_model, self.lora, self._adapter_dir = (model if is_peft(model) else None), None, None
        lora = {}
        if self.peft_model is not None:
            r = model.peft_config[model.active_adapter].r
            rank = next((k for k in VLLM_LORA_RANKS if k >= r), None)
            if rank is None:
                raise ConfigError(f"model.lora.r={r} is larger than vLLM's largest max_lora_rank "
                                  f"({VLLM_LORA_RANKS[-1]}); set ray.engine=torch or a smaller rank")
            lora = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1}
        path = tempfile.mkdtemp(prefix="posttrain-vllm-")
        try:
            if self.peft_model is None:
                model.save_pretrained(path, safe_serialization=True)
            else:  # the frozen base under its own names; the adapter goes with every request (LoRARequest)
                model.get_base_model().save_pretrained(path, state_dict=plain_state_dict(model),
                                                       safe_serialization=True)
            tokenizer.save_pretrained(path)
            self.llm = vllm.LLM(model=path, tokenizer=path, skip_tokenizer_init=True, dtype=dtype, seed=seed,
                                gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=False,
                                logprobs_mode="processed_logprobs", worker_extension_cls=f"{__name__}.WeightSync",
                                **lora)
        finally:
            shutil.rmtree(path, ignore_errors=True)
        self._syncs = 0
        if self.peft_model is not None:
            self._write_adapter()

    def _write_adapter(self) -> None:
        """The CPU copy's adapter to a new directory, and a LoRARequest with a new id for it (vLLM caches adapters
        by id, so a reused id would keep serving the old weights); the previous directory is deleted."""
        from vllm.lora.request import LoRARequest  # noqa: PLC0415

        self._syncs += 1
        previous, self._adapter_dir = self._adapter_dir, tempfile.mkdtemp(prefix="posttrain-vllm-lora-")
        self.peft_model.save_pretrained(self._adapter_dir, safe_serialization=True)
        self.lora = LoRARequest(f"posttrain-{self._syncs}", self._syncs, self._adapter_dir)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def close(self) -> None:
        """Delete the adapter directory (LoRA); the engine cannot generate with the adapter afterwards."""
        if getattr(self, "_adapter_dir", None) is not None:
            shutil.rmtree(self._adapter_dir, ignore_errors=True)
            self._adapter_dir = None

    def __del__(self) -> None:
        self.close()

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
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
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
        """Load the learner's weights into vLLM in place; returns the sha256 of the tensors received. With LoRA
        `state_dict` is the adapter: the sha256 of what the CPU copy holds under those names after loading it."""
        if self.peft_model is not None:
            _, unexpected = self.peft_model.load_state_dict(state_dict, strict=False)
            if unexpected:
                raise ValueError(f"load_weights: the model has no tensor {unexpected[0]!r} ({len(unexpected)} "
                                 "unknown)")
            self._write_adapter()
            held = self.peft_model.state_dict()
            return state_dict_sha256({name: held[name] for name in state_dict})
        sha = state_dict_sha256(state_dict)
        self.llm.collective_rpc("posttrain_load_weights", args=(list(state_dict.items()),))
        return sha
