"""The recipes with model.peft=lora on backend local: the gradient reaches only the adapter (every adapter tensor
moves over two steps, no base tensor does), the optimizer holds only the adapter, every RL preset trains with the
first minibatch's ratio 1, the reference is the policy with its adapter off, and the commands write final/ (merged)
and final/adapter/; the reward model trains LoRA on its backbone and its head fully, and its final/ loads as a
reward model; the commands that do not train an adapter yet refuse it in one line (exit code 2)."""

import json

import pytest
import torch

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from posttrain.cli import main  # noqa: E402
from posttrain.config import build_config  # noqa: E402
from posttrain.models import load_policy  # noqa: E402
from posttrain.models.adapters import AdapterOff  # noqa: E402
from posttrain.presets import PRESETS  # noqa: E402
from posttrain.recipes.sft import setup_sft  # noqa: E402
from posttrain.rl.loop import RLRun  # noqa: E402
from posttrain.train.losses import sft_loss  # noqa: E402
from posttrain.train.optim import guarded_step  # noqa: E402
from tests.conftest import tiny_run_dict  # noqa: E402
from tests.recipes.test_algorithms import preset_config  # noqa: E402
from tests.recipes.test_rl import EvenFirstCharTask  # noqa: E402

LORA = ["model.peft=lora", "model.lora.r=4", "model.lora.alpha=8"]


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(model, before):
    """(adapter tensors that did not move, base tensors that did)."""
    still, changed = [], []
    for name, p in model.named_parameters():
        same = torch.equal(p, before[name])
        if ".lora_" in name and same:
            still.append(name)
        if ".lora_" not in name and not same:
            changed.append(name)
    return still, changed


def optimizer_holds_only_the_adapter(model, optimizer):
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return held == {id(p) for n, p in model.named_parameters() if ".lora_" in n}


def test_sft_steps_move_every_adapter_tensor_and_no_base_tensor(tmp_path):
    """Two steps: peft starts B at 0, so A has no gradient on the first step (dL/dA = B^T ...)."""
    cfg = build_config(tiny_run_dict(tmp_path), LORA)
    model, tokenizer = load_policy(cfg.model, seed=0)
    state = setup_sft(cfg, model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    assert optimizer_holds_only_the_adapter(model, state.optimizer)
    before = snapshot(model)
    model.train()
    for _ in range(2):
        prompts, completions = zip(*next(state.batches))
        loss, _ = sft_loss(model, tokenizer, list(prompts), list(completions))
        guarded_step(model, state.optimizer, loss, 1.0)
    assert moved(model, before) == ([], [])


@pytest.mark.parametrize("preset", PRESETS)
def test_every_rl_preset_trains_only_the_adapter_with_the_ratio_at_one(tmp_path, preset):
    cfg = preset_config(tmp_path, preset, "rl.ppo_epochs=1", *LORA)
    model, tokenizer = load_policy(cfg.model, seed=0)
    run = RLRun.local(cfg, model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    learner = run.learner
    assert optimizer_holds_only_the_adapter(model, learner.optimizer)
    if cfg.rl.kl_coef > 0:  # the reference: the policy itself with the adapter off, not a copy
        assert isinstance(learner.reference, AdapterOff) and learner.reference.policy is model
    else:
        assert learner.reference is None
    if learner.critic is not None:  # PPO's critic: a full model initialised from the base weights
        assert not any(".lora_" in n for n, _ in learner.critic.named_parameters())
    before = snapshot(model)
    for _ in range(2):
        metrics = run.step()
        assert metrics["first_log_ratio_max"] < 1e-5
    still, changed = moved(model, before)
    assert changed == []
    assert still == []


def test_the_kl_term_sees_the_base_model_as_reference(tmp_path):
    """With the adapter at 0 the policy equals the reference (KL 0 on the first step); after updates KL > 0."""
    cfg = build_config(tiny_run_dict(tmp_path), [*LORA, "rl.kl_coef=0.1", "rl.lr=5e-2"])
    model, tokenizer = load_policy(cfg.model, seed=0)
    run = RLRun.local(cfg, model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    first = run.step()
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    for _ in range(2):
        later = run.step()
    assert later["kl"] > 1e-5


def stand_in_config(tmp_path, stand_in, **sections):
    import yaml

    data = tiny_run_dict(tmp_path / "run")
    data.pop("model")
    data["model"] = {"path": str(stand_in), "peft": "lora", "lora": {"r": 4, "alpha": 8}}
    data["task"] = {"max_operand": 20, "num_eval": 4, "operators": ["+"]}
    data["eval"] = {"batch_size": 4, "max_new_tokens": 4}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21's from_pretrained
@pytest.mark.parametrize("command", ["sft", "rl", "dpo", "rft"])
def test_each_training_command_writes_the_merged_model_and_the_adapter(tmp_path, stand_in, command):
    config = stand_in_config(tmp_path, stand_in, sft={"steps": 2, "batch_size": 4},
                             rl={"steps": 2, "prompts_per_step": 2, "group_size": 2},
                             dpo={"steps": 2, "batch_size": 4, "num_pairs": 8},
                             rft={"rounds": 1, "prompts_per_round": 4, "samples": 2, "steps": 2, "batch_size": 2,
                                  "min_score": None, "max_new_tokens": 4})
    assert main([command, str(config)]) == 0
    final = tmp_path / "run" / "final"
    merged = AutoModelForCausalLM.from_pretrained(final)
    assert not any(".lora_" in k for k in merged.state_dict())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stand_in), final / "adapter").eval()
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max() < 1e-5
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["seed"] == 0


def test_a_bad_target_module_is_one_line_and_exit_code_2(tmp_path, stand_in, capsys):
    config = stand_in_config(tmp_path, stand_in)
    assert main(["sft", str(config), "model.lora.target_modules=[q_proj,c_attn]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'c_attn'" in err and "q_proj" in err
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("argv,what", [
    (["rm", "model.peft=prompt_tuning"], "`posttrain rm`"),  # backend ray takes an adapter: test_ray_lora.py
])
def test_what_does_not_take_an_adapter_yet_is_refused_in_one_line(tmp_path, stand_in, capsys, argv, what):
    config = stand_in_config(tmp_path, stand_in)
    assert main([argv[0], str(config), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and what in err and "model.peft=lora" in err
    assert not (tmp_path / "run" / "final").exists()


def lora_reward_model(tmp_path, *overrides):
    from posttrain.models.reward import RewardModel, with_adapter
    from posttrain.models.value import build_scalar_model

    cfg = build_config(tiny_run_dict(tmp_path), [*LORA, "rm.steps=3", "rm.batch_size=8", "rm.lr=1e-2",
                                                 "rm.warmup_steps=1", "rm.eval_every=0", "rm.calibration_size=8",
                                                 *overrides])
    _, tokenizer = load_policy(cfg.model.model_copy(update={"peft": None}))
    return cfg, RewardModel(with_adapter(build_scalar_model(cfg.model, tokenizer, cfg.seed), cfg.model, cfg.seed),
                            tokenizer)


def arithmetic_pairs(n):
    from posttrain.data import PreferencePair

    return [PreferencePair(f"{a}+{a % 7}=", str(a + a % 7), str(a + a % 7 + 1)) for a in range(n)]


def test_the_reward_model_trains_lora_on_its_backbone_and_its_head_fully(tmp_path):
    """Three steps: the head starts at 0 (so the backbone has no gradient on step 1), B at 0 (A none on step 2);
    after three, every adapter tensor and the head have moved, and no base tensor has."""
    from posttrain.recipes.reward_model import setup_rm, train_rm
    from posttrain.train.metrics import MetricsLogger

    cfg, rm = lora_reward_model(tmp_path)
    trainable = {n for n, p in rm.model.named_parameters() if p.requires_grad}
    heads = {n for n in trainable if ".lora_" not in n}
    assert heads == {"base_model.model.score.modules_to_save.default.weight"}
    state = setup_rm(cfg, rm, arithmetic_pairs(24), arithmetic_pairs(8))
    assert {id(p) for g in state.optimizer.param_groups for p in g["params"]} == {
        id(p) for p in rm.model.parameters() if p.requires_grad}
    before = snapshot(rm.model)
    with MetricsLogger(tmp_path / "metrics.jsonl") as logger:
        train_rm(cfg, state, logger)
    still, changed = moved(rm.model, before)
    assert still == [] and changed == list(heads)  # the trained head copy moves; the frozen original does not


def test_the_lora_reward_models_final_loads_as_a_reward_model_with_the_same_scores(tmp_path):
    from posttrain.models.reward import RewardModel

    _, rm = lora_reward_model(tmp_path)
    perturb = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in rm.model.named_parameters():
            if p.requires_grad:  # the adapter's B and the head away from their zero start
                p.add_(torch.randn(p.shape, generator=perturb) * 0.3)
    rm.model.eval()
    rm.set_normalization(0.25, 2.0)
    pairs = arithmetic_pairs(6)
    prompts, texts = [p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs]
    want = rm.score(prompts, texts)
    rm.save(tmp_path / "final")
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").is_file()
    loaded = RewardModel.load(tmp_path / "final")
    assert not any(".lora_" in k for k in loaded.model.state_dict())
    assert (loaded.mean, loaded.std) == (0.25, 2.0)
    assert (loaded.score(prompts, texts) - want).abs().max() < 1e-5
    assert want.std() > 0.01  # the scores differ between completions: the comparison is not of constants


def test_posttrain_rm_with_lora_writes_a_reward_model(tmp_path, stand_in):
    from posttrain.models.reward import RewardModel

    config = stand_in_config(tmp_path, stand_in, rm={"steps": 3, "num_pairs": 8, "batch_size": 4,
                                                     "calibration_size": 4, "eval_every": 0})
    assert main(["rm", str(config)]) == 0
    rm = RewardModel.load(tmp_path / "run" / "final")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert rm.mean == pytest.approx(summary["reward_mean"]) and rm.std == pytest.approx(summary["reward_std"])
    assert (tmp_path / "run" / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_an_rl_checkpoint_holds_the_adapter_and_its_optimizer_state_only(tmp_path):
    cfg = build_config(tiny_run_dict(tmp_path), LORA)
    model, tokenizer = load_policy(cfg.model, seed=0)
    run = RLRun.local(cfg, model, tokenizer, EvenFirstCharTask(cfg.task, cfg.seed))
    run.step()
    weights, state = run.snapshot(accuracy=0.0)
    adapter = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(weights["policy"]) == adapter
    assert len(state["optimizer"]["state"]) == len(adapter)  # AdamW moments of the adapter tensors only
