"""The recipes with model.peft=prompt_tuning on backend local: the gradient reaches only the soft prompt (it moves,
no base tensor does), the optimizer holds only it, every RL preset trains with the first minibatch's ratio 1, the
KL reference is the starting prompt (KL 0 at the first step), a crashed run resumes bit for bit (PPO with its
critic and a KL term), and sft, rl, dpo and rft write final/ (the base) and final/adapter/ (the prompt)."""

import json

import pytest
import torch
import yaml

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from posttrain.cli import main  # noqa: E402
from posttrain.config import build_config  # noqa: E402
from posttrain.models import load_policy  # noqa: E402
from posttrain.models.adapters import SoftPromptForward, hf_module  # noqa: E402
from posttrain.presets import PRESETS  # noqa: E402
from posttrain.recipes.sft import setup_sft  # noqa: E402
from posttrain.rl.loop import RLRun  # noqa: E402
from posttrain.train.control import find_resume_point  # noqa: E402
from posttrain.train.losses import sft_loss  # noqa: E402
from posttrain.train.optim import guarded_step  # noqa: E402
from tests.conftest import tiny_run_dict  # noqa: E402
from tests.recipes.test_algorithms import preset_config  # noqa: E402
from tests.recipes.test_peft import stand_in_config  # noqa: E402
from tests.recipes.test_resume import PPO, Crash, run, strip_timing  # noqa: E402
from tests.recipes.test_rl import EvenFirstCharTask  # noqa: E402

PT = ["model.peft=prompt_tuning", "model.prompt_tuning.num_virtual_tokens=4"]
PROMPT = "prompt_encoder.default.embedding.weight"


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before):
    return [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]


def optimizer_params(optimizer):
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def test_sft_steps_move_the_soft_prompt_alone(tmp_path):
    cfg = build_config(tiny_run_dict(tmp_path), PT)
    model, tokenizer = load_policy(cfg.model, seed=0)
    state = setup_sft(cfg, model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    assert optimizer_params(state.optimizer) == {id(dict(model.named_parameters())[PROMPT])}
    before = snapshot(model)
    model.train()
    for _ in range(3):
        prompts, completions = zip(*next(state.batches))
        loss, _ = sft_loss(model, tokenizer, list(prompts), list(completions))
        guarded_step(model, state.optimizer, loss, 1.0)
    assert changed(model, before) == [PROMPT]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_rl_preset_trains_only_the_soft_prompt_with_the_ratio_at_one(tmp_path, preset):
    cfg = preset_config(tmp_path, preset, "rl.ppo_epochs=1", *PT)
    model, tokenizer = load_policy(cfg.model, seed=0)
    run_ = RLRun.local(cfg, model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    learner = run_.learner
    assert optimizer_params(learner.optimizer) == {id(dict(model.named_parameters())[PROMPT])}
    if cfg.rl.kl_coef > 0:  # the reference: the frozen base behind a copy of the starting prompt
        assert isinstance(learner.reference, SoftPromptForward) and learner.reference.base is model.get_base_model()
    if learner.critic is not None:  # PPO's critic: a full scalar-head model from the base weights
        assert not any("prompt_encoder" in n for n, _ in learner.critic.named_parameters())
    before = snapshot(model)
    for _ in range(2):
        metrics = run_.step()
        assert metrics["first_log_ratio_max"] < 1e-5
    assert changed(model, before) == [PROMPT]


def test_the_kl_reference_is_the_starting_prompt(tmp_path):
    cfg = build_config(tiny_run_dict(tmp_path), [*PT, "rl.kl_coef=0.1", "rl.lr=5e-2"])
    model, tokenizer = load_policy(cfg.model, seed=0)
    run_ = RLRun.local(cfg, model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    assert run_.step()["kl"] == pytest.approx(0.0, abs=1e-6)
    for _ in range(2):
        later = run_.step()
    assert abs(later["kl"]) > 1e-4  # the estimate of KL(pi || pi_ref) on samples (k1 may be negative)
    assert isinstance(hf_module(model), SoftPromptForward)


def test_a_crashed_ppo_run_with_a_soft_prompt_resumes_bit_for_bit(tmp_path, make_config, tokenizer):
    cfg = make_config(tmp_path, "rl.steps=5", *PPO, *PT)
    full = run(cfg, tokenizer, EvenFirstCharTask, "rl", tmp_path / "full")
    with pytest.raises(Crash):
        run(cfg, tokenizer, EvenFirstCharTask, "rl", tmp_path / "crash", crash_after=3)
    assert find_resume_point(tmp_path / "crash") is not None
    resumed = run(cfg, tokenizer, EvenFirstCharTask, "rl", tmp_path / "crash", resume=True)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert strip_timing(tmp_path / "crash" / "metrics.jsonl") == strip_timing(tmp_path / "full" / "metrics.jsonl")


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21's from_pretrained
@pytest.mark.parametrize("command", ["sft", "rl", "dpo", "rft"])
def test_each_training_command_writes_the_base_and_the_soft_prompt(tmp_path, stand_in, command):
    config = stand_in_config(tmp_path, stand_in, model={"peft": "prompt_tuning", "prompt_tuning":
                                                        {"num_virtual_tokens": 4, "init_text": "Answer:"}},
                             sft={"steps": 2, "batch_size": 4}, rl={"steps": 2, "prompts_per_step": 2, "group_size": 2},
                             dpo={"steps": 2, "batch_size": 4, "num_pairs": 8},
                             rft={"rounds": 1, "prompts_per_round": 4, "samples": 2, "steps": 2, "batch_size": 2,
                                  "min_score": None, "max_new_tokens": 4})
    assert main([command, str(config)]) == 0
    final = tmp_path / "run" / "final"
    base = AutoModelForCausalLM.from_pretrained(stand_in).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert all(torch.equal(base[k], saved[k]) for k in base)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(final), final / "adapter")
    trained = adapted.prompt_encoder["default"].embedding.weight
    model, _ = load_policy(build_config(yaml.safe_load(config.read_text())).model)  # the run's starting prompt
    start = model.prompt_encoder["default"].embedding.weight
    # sft and dpo have a gradient from their first step; rl and rft on this random stand-in score every sample 0
    # (no advantage, nothing kept), which leaves the prompt at its start: the trained prompt is what was saved
    assert torch.equal(trained, start) == (command in ("rl", "rft"))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["seed"] == 0
