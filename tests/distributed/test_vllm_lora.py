"""The vLLM engine's LoRA path (posttrain/rollout/vllm_engine.py) on the CPU, against a stand-in for vLLM.

vLLM needs a GPU, which CI never has. What can be checked without it is everything posttrain hands vLLM: the base
model directory (the frozen base under its plain names: no adapter tensors), the LLM arguments (enable_lora, a
max_lora_rank vLLM accepts), the adapter directory of each sync (peft's format, loaded here with
PeftModel.from_pretrained as vLLM's loader reads it), a new LoRARequest id per sync, and the checksum. The stand-in
(`FakeVLLM` below) loads what it is given with transformers and peft and decodes greedily with the model's own
forward, so greedy responses through the engine equal the learner's adapter model's, before and after a sync,
only if those files and requests are right. vLLM's own LoRA kernels are not exercised: that is
tests/distributed/test_vllm_engine.py's job on a GPU (not run yet).
"""

from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from posttrain.errors import ConfigError  # noqa: E402
from posttrain.models.adapters import plain_state_dict, synced_state_dict  # noqa: E402
from posttrain.models.chat import encode_prompts  # noqa: E402
from posttrain.rollout.engines import TorchEngine, state_dict_sha256  # noqa: E402
from tests.models.test_adapters import lora_model, perturb_adapter  # noqa: E402

PROMPTS = ["1+2=", "37+58=", "9+9=", "4+40="]


class FakeLLM:
    """vllm.LLM's offline interface as VLLMEngine uses it: loads the model directory at construction (the engine
    deletes it right after), and a LoRARequest's adapter directory at the first request that names its id."""

    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kwargs):
        self.kwargs = kwargs
        self.base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.base_state = {k: v.clone() for k, v in self.base.state_dict().items()}
        self.adapters: dict[int, torch.nn.Module] = {}
        self.requests: list = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=False, lora_request=None):
        self.requests.append(lora_request)
        model = self.base
        if lora_request is not None:
            assert self.kwargs.get("enable_lora"), "a LoRARequest needs LLM(enable_lora=True)"
            if lora_request.lora_int_id not in self.adapters:  # vLLM caches an adapter by its id
                self.adapters[lora_request.lora_int_id] = PeftModel.from_pretrained(
                    copy.deepcopy(self.base), lora_request.lora_path).eval()
            model = self.adapters[lora_request.lora_int_id]
        return [self._greedy(model, p["prompt_token_ids"], sp) for p, sp in zip(prompts, params, strict=True)]

    @staticmethod
    def _greedy(model, ids, sp):
        assert sp.kwargs["temperature"] == 0.0
        out, logps, reason = [], [], "length"
        with torch.no_grad():
            for _ in range(sp.kwargs["max_tokens"]):
                logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
                tok = int(logits.argmax())
                out.append(tok)
                logps.append({tok: types.SimpleNamespace(logprob=float(logits.log_softmax(-1)[tok]))})
                if tok in sp.kwargs["stop_token_ids"]:
                    reason = "stop"
                    break
        return types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=out, logprobs=logps,
                                                                    finish_reason=reason)])


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class LoRARequest:
    def __init__(self, lora_name: str, lora_int_id: int, lora_path: str):
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    for name, module in {"vllm": vllm, "vllm.inputs": inputs, "vllm.lora": lora, "vllm.lora.request": request}.items():
        monkeypatch.setitem(sys.modules, name, module)
    FakeLLM.instances.clear()
    return vllm


def greedy(engine, tokenizer):
    ids, mask = encode_prompts(tokenizer, PROMPTS)
    out = engine.generate(ids, mask, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, greedy=True)
    return [row[:n].tolist() for row, n in zip(out.response_ids, out.response_mask.sum(-1).long(), strict=True)]


def test_vllm_lora_serves_the_learners_adapter_before_and_after_a_sync(tmp_path, fake_vllm):
    from posttrain.rollout.vllm_engine import VLLMEngine

    _, learner, tokenizer = lora_model(tmp_path)
    perturb_adapter(learner, seed=1)
    worker = copy.deepcopy(learner)  # the rollout worker's copy, as RolloutWorker holds it
    engine = VLLMEngine(worker, tokenizer, seed=0, dtype="float32")
    llm = FakeLLM.instances[-1]
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 8 and llm.kwargs["max_loras"] == 1
    plain = plain_state_dict(learner)  # the base under its own names, no adapter tensors
    assert not any("lora_" in k for k in llm.base_state)
    assert all(torch.equal(llm.base_state[k], plain[k]) for k in llm.base_state)

    reference = TorchEngine(copy.deepcopy(learner))
    first = greedy(engine, tokenizer)
    assert first == greedy(reference, tokenizer)
    off = copy.deepcopy(learner)
    with off.disable_adapter():
        assert first != greedy(TorchEngine(off), tokenizer)  # the adapter is what makes these responses
    first_request = llm.requests[-1]
    assert first_request.lora_int_id == 1 and Path(first_request.lora_path).is_dir()

    perturb_adapter(learner, seed=2)  # the learner's update
    sent = synced_state_dict(learner)
    assert sent and all("lora_" in k for k in sent)
    sha = engine.load_weights({k: v.clone() for k, v in sent.items()})
    assert sha == state_dict_sha256(sent)
    second = greedy(engine, tokenizer)
    assert llm.requests[-1].lora_int_id == 2 and not Path(first_request.lora_path).exists()  # new id, old dir gone
    assert second == greedy(TorchEngine(copy.deepcopy(learner)), tokenizer)
    assert second != first  # the sync changed what vLLM serves (the perturbations differ)
    with pytest.raises(ValueError, match="has no tensor"):
        engine.load_weights({"base_model.model.nope.lora_A.default.weight": torch.zeros(1)})
    path = Path(llm.requests[-1].lora_path)
    engine.close()
    assert not path.exists()


def test_vllm_refuses_a_soft_prompt_in_one_line(tmp_path, fake_vllm):
    from posttrain.rollout.vllm_engine import VLLMEngine

    _, model, tokenizer = lora_model(tmp_path, "model.peft=prompt_tuning")
    with pytest.raises(ConfigError) as err:
        VLLMEngine(model, tokenizer)
    assert "model.peft=prompt_tuning is not available with ray.engine=vllm" in str(err.value)
    assert "\n" not in str(err.value) and not FakeLLM.instances
