"""Prompt tuning through peft (posttrain/models/adapters.py, model.peft=prompt_tuning): the soft prompt is the only
trainable tensor, it goes before every sequence the same way in generation and in the training forward (so the
first PPO ratio is 1, left padding changes nothing, and peft's own forward agrees on an unpadded row, values and
gradient), the lean forward is never used, the reference holds the starting prompt, checkpoints hold the prompt,
and final/ + final/adapter/ load with PeftModel.from_pretrained."""

import pytest
import torch

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from posttrain.config import build_config  # noqa: E402
from posttrain.errors import ConfigError  # noqa: E402
from posttrain.models import load_policy, save_pretrained  # noqa: E402
from posttrain.models.adapters import (  # noqa: E402
    hf_module,
    load_trainable_state_dict,
    reference_of,
    soft_prompt,
    trainable_state_dict,
)
from posttrain.models.chat import encode_prompts  # noqa: E402
from posttrain.models.lean import lean_backbone  # noqa: E402
from posttrain.models.logprobs import response_logprobs  # noqa: E402
from posttrain.rollout.generate import generate  # noqa: E402
from tests.conftest import tiny_run_dict  # noqa: E402

N = 6
PT = ["model.peft=prompt_tuning", f"model.prompt_tuning.num_virtual_tokens={N}"]
PROMPTS = ["1+2=", "13+4=", "7+7=", "20+1="]


def tuned(tmp_path, *overrides, seed=0):
    cfg = build_config(tiny_run_dict(tmp_path), [*PT, *overrides])
    model, tokenizer = load_policy(cfg.model, seed=seed)
    return cfg, model.eval(), tokenizer


def sample(model, tokenizer, prompts=PROMPTS, seed=0):
    ids, mask = encode_prompts(tokenizer, prompts)
    return generate(model, ids, mask, max_new_tokens=5, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, generator=torch.Generator().manual_seed(seed))


def scored(model, b):
    return response_logprobs(model, b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask)[0]


def test_only_the_soft_prompt_trains_and_it_starts_from_vocabulary_embeddings(tmp_path):
    _, model, _ = tuned(tmp_path)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["prompt_encoder.default.embedding.weight"]
    prompt, vocab = soft_prompt(model), model.get_input_embeddings().weight
    assert prompt.shape == (N, vocab.size(1))
    assert all((vocab == row).all(-1).any() for row in prompt)  # each row is a token's embedding
    _, again, _ = tuned(tmp_path)
    _, other, _ = tuned(tmp_path, seed=1)
    assert torch.equal(soft_prompt(again), prompt) and not torch.equal(soft_prompt(other), prompt)


def test_init_text_repeats_the_texts_token_embeddings(tmp_path):
    _, model, tokenizer = tuned(tmp_path, "model.prompt_tuning.init_text='add:'")
    ids = tokenizer("add:", add_special_tokens=False)["input_ids"]
    want = model.get_input_embeddings().weight[(ids * N)[:N]]
    assert torch.equal(soft_prompt(model), want)


def test_a_scalar_head_model_refuses_a_soft_prompt(tmp_path, tokenizer):
    from posttrain.models.reward import with_adapter
    from posttrain.models.value import build_scalar_model

    cfg = build_config(tiny_run_dict(tmp_path), PT)
    with pytest.raises(ConfigError, match="prompt_tuning"):
        with_adapter(build_scalar_model(cfg.model, tokenizer), cfg.model)


@pytest.mark.parametrize("real", [False, True], ids=["tiny", "stand_in"])
def test_generation_and_the_training_forward_put_the_prompt_in_the_same_place(tmp_path, real, request):
    """Ratio 1 between generation (KV cache) and the training forward; the lean forward is not used; the soft
    prompt matters (the base model scores the tokens differently)."""
    extra = [f"model.path={request.getfixturevalue('stand_in')}"] if real else []
    _, model, tokenizer = tuned(tmp_path, *extra)
    assert lean_backbone(model) is None
    b = sample(model, tokenizer)
    logprobs = scored(model, b)
    assert torch.allclose(logprobs, b.rollout_logprobs, atol=1e-5)
    with torch.no_grad():
        base = scored(model.get_base_model(), b)
    assert not torch.allclose(logprobs, base, atol=1e-3)


def test_left_padding_does_not_move_the_soft_prompt(tmp_path):
    """Each row scored in the padded batch equals the row scored alone (no padding): positions count real tokens
    after the N prompt positions."""
    _, model, tokenizer = tuned(tmp_path)
    b = sample(model, tokenizer)
    together = scored(model, b)
    for i, prompt in enumerate(PROMPTS):
        ids, mask = encode_prompts(tokenizer, [prompt])
        alone = response_logprobs(model, ids, mask, b.response_ids[i:i + 1], b.response_mask[i:i + 1])[0]
        assert torch.allclose(alone, together[i:i + 1], atol=1e-5), prompt


def test_the_forward_equals_pefts_own_on_an_unpadded_row_in_value_and_gradient(tmp_path):
    """peft's PeftModelForCausalLM prepends the prompt and counts positions 0..N+L-1: for an unpadded row that
    is our layout, so its logits and d(sum of log-probs)/d(prompt) are ours."""
    _, model, tokenizer = tuned(tmp_path)
    ids, mask = encode_prompts(tokenizer, ["13+4=17"])
    L = ids.size(1)
    pos = torch.arange(L).unsqueeze(0)
    ours = hf_module(model)(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    theirs = model(input_ids=ids, attention_mask=mask).logits[:, N:]
    assert ours.shape == theirs.shape == (1, L, model.config.vocab_size)
    assert (ours - theirs).abs().max() < 1e-5
    target = ids[:, 1:].unsqueeze(-1)
    grads = []
    for logits in (ours, theirs):
        loss = logits[:, :-1].log_softmax(-1).gather(-1, target).sum()
        grads.append(torch.autograd.grad(loss, soft_prompt(model))[0])
    assert grads[0].norm(dim=-1).gt(0).all()  # every virtual token gets a gradient
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_the_gradient_reaches_the_soft_prompt_alone(tmp_path):
    _, model, tokenizer = tuned(tmp_path)
    b = sample(model, tokenizer)
    (-scored(model, b).sum()).backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {"prompt_encoder.default.embedding.weight"}
    assert soft_prompt(model).grad.norm(dim=-1).gt(0).all()  # every virtual token is attended to


def test_the_reference_keeps_the_starting_prompt(tmp_path):
    _, model, tokenizer = tuned(tmp_path)
    ref = reference_of(model)
    b = sample(model, tokenizer)
    with torch.no_grad():
        start = scored(model, b)
        assert torch.equal(scored(ref, b), start)  # pi_ref == pi at the start (the KL starts at 0)
        soft_prompt(model).add_(0.5)
        assert not torch.allclose(scored(model, b), start, atol=1e-3)
        assert torch.equal(scored(ref, b), start)  # a copy of the prompt, not the trained one
    assert not any(p.requires_grad for p in ref.parameters())


def test_checkpoint_weights_are_the_prompt_alone_and_load_back(tmp_path):
    _, model, _ = tuned(tmp_path)
    with torch.no_grad():
        soft_prompt(model).mul_(1.5)
    sd = trainable_state_dict(model)
    assert list(sd) == ["prompt_encoder.default.embedding.weight"]
    _, fresh, _ = tuned(tmp_path)
    load_trainable_state_dict(fresh, sd)
    assert torch.equal(soft_prompt(fresh), soft_prompt(model))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21's from_pretrained
def test_final_holds_the_base_and_the_prompt_that_peft_loads(tmp_path, stand_in):
    _, model, tokenizer = tuned(tmp_path, f"model.path={stand_in}")
    with torch.no_grad():
        soft_prompt(model).mul_(2.0)
    out = save_pretrained(model, tokenizer, tmp_path / "final")
    base = AutoModelForCausalLM.from_pretrained(stand_in).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(base[k], saved[k]) for k in base)  # the soft prompt cannot be merged into weights
    again = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out), out / "adapter").eval()
    ids, mask = encode_prompts(tokenizer, ["What is 2+2?"])
    pos = torch.arange(ids.size(1)).unsqueeze(0)
    with torch.no_grad():
        want = hf_module(model)(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = again(input_ids=ids, attention_mask=mask).logits[:, N:]
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-5
