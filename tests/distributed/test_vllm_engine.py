"""The vLLM rollout engine on a GPU: greedy responses equal posttrain's own generation with the same weights,
before and after a weight sync from the learner. Skipped without CUDA or vllm (CI has neither); it has not run
yet (docs/distributed.md)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("vllm")

from posttrain.config import ModelConfig  # noqa: E402
from posttrain.rollout.engines import TorchEngine, state_dict_sha256  # noqa: E402
from posttrain.rollout.vllm_engine import VLLMEngine  # noqa: E402
from posttrain.models import build_char_tokenizer, build_tiny_model  # noqa: E402
from posttrain.models.chat import encode_prompts  # noqa: E402

# head_dim 64: the smallest that every vLLM attention backend takes.
MODEL = ModelConfig(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256)


def greedy(engine, tokenizer, prompts):
    ids, mask = encode_prompts(tokenizer, prompts)
    out = engine.generate(ids, mask, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, greedy=True)
    return [row[:n].tolist() for row, n in zip(out.response_ids, out.response_mask.sum(-1).long())], out


def test_vllm_greedy_matches_posttrain_and_follows_weight_syncs():
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(MODEL, tokenizer, seed=0).float()
    prompts = ["1+2=", "37+58=", "9+9="]
    engine = VLLMEngine(model, tokenizer, seed=0, gpu_memory_utilization=0.2, dtype="float32")
    reference = TorchEngine(model)
    got, batch = greedy(engine, tokenizer, prompts)
    assert got == greedy(reference, tokenizer, prompts)[0]
    assert batch.response_ids.shape == batch.response_mask.shape == batch.rollout_logprobs.shape
    on = batch.response_mask.bool()
    assert (batch.rollout_logprobs[on] <= 0).all() and (batch.rollout_logprobs[~on] == 0).all()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = model.state_dict()
    assert engine.load_weights(sd) == state_dict_sha256(sd)
    assert greedy(engine, tokenizer, prompts)[0] == greedy(reference, tokenizer, prompts)[0]


def test_vllm_sampling_is_reproducible_from_the_generator():
    tokenizer = build_char_tokenizer()
    engine = VLLMEngine(build_tiny_model(MODEL, tokenizer, seed=0).float(), tokenizer, gpu_memory_utilization=0.2,
                        dtype="float32")
    ids, mask = encode_prompts(tokenizer, ["1+2="] * 8)

    def sample(seed):
        return engine.generate(ids, mask, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1).response_ids, sample(1).response_ids)


def test_vllm_lora_serves_the_adapter_and_follows_adapter_syncs():
    """model.peft=lora: vLLM on the base with a LoRARequest; greedy responses equal posttrain's generation with
    the peft model, before and after a sync of the adapter alone (tests/distributed/test_vllm_lora.py checks
    the files and requests on the CPU)."""
    pytest.importorskip("peft")
    from posttrain.models.adapters import apply_peft, synced_state_dict  # noqa: PLC0415

    tokenizer = build_char_tokenizer()
    cfg = MODEL.model_copy(update={"peft": "lora"})
    model = apply_peft(build_tiny_model(MODEL, tokenizer, seed=0).float(), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prompts = ["1+2=", "37+58=", "9+9="]
    engine = VLLMEngine(model, tokenizer, seed=0, gpu_memory_utilization=0.2, dtype="float32")
    assert greedy(engine, tokenizer, prompts)[0] == greedy(TorchEngine(model), tokenizer, prompts)[0]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    sd = synced_state_dict(model)
    assert engine.load_weights(sd) == state_dict_sha256(sd)
    assert greedy(engine, tokenizer, prompts)[0] == greedy(TorchEngine(model), tokenizer, prompts)[0]
