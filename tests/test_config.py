"""Config: validated once with one-line errors that name the key, dotted overrides, YAML round trip, frozen."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from posttrain.config import ConfigError, RunConfig, build_config, dump_config, load_config, parse_overrides

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.y*ml"))


def error_of(*overrides: str, data: dict | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        build_config(data, list(overrides))
    message = str(err.value)
    assert message and "\n" not in message
    return message


def test_defaults_validate():
    cfg = RunConfig()
    assert build_config() == cfg == load_config(None)
    assert cfg.model.hidden_size % cfg.model.num_heads == 0
    assert (cfg.rl.prompts_per_step * cfg.rl.group_size) % cfg.rl.mini_batches == 0


def test_unknown_key_is_named_with_a_suggestion():
    msg = error_of("rl.lrr=1e-4")
    assert "'rl.lrr'" in msg and "did you mean 'rl.lr'" in msg


def test_unknown_top_level_key_is_named_with_a_suggestion():
    assert "'sedd'" in error_of("sedd=1") and "did you mean 'seed'" in error_of("sedd=1")
    assert "did you mean 'model'" in error_of("modle.path=x")
    assert "'nonsense'" in error_of("nonsense=1")


def test_unknown_key_in_a_nested_dict_is_named():
    msg = error_of(data={"sft": {"steps": 5, "stepz": 3}})
    assert "'sft.stepz'" in msg and "did you mean 'sft.steps'" in msg


def test_wrong_type_names_the_key_and_the_value():
    msg = error_of("sft.steps=abc")
    assert "sft.steps" in msg and "'abc'" in msg
    msg = error_of(data={"rl": {"group_size": [4]}})
    assert "rl.group_size" in msg and "[4]" in msg


def test_out_of_range_names_the_key():
    assert "sft.steps" in error_of("sft.steps=-1")
    assert "rl.top_p" in error_of("rl.top_p=1.5")
    assert "task.demo_error_rate" in error_of("task.demo_error_rate=2")


def test_cross_field_rules_name_their_keys():
    assert "model.num_heads" in error_of("model.hidden_size=30")
    assert "model.num_kv_heads" in error_of("model.num_kv_heads=3")
    assert "rl.mini_batches" in error_of("rl.mini_batches=3", "rl.prompts_per_step=4", "rl.group_size=4")
    assert "task.max_operand" in error_of("task.min_operand=10", "task.max_operand=5")


def test_registry_names_are_checked_with_a_suggestion():
    msg = error_of("rl.advantage=grpoo")
    assert "rl.advantage" in msg and "did you mean 'grpo'" in msg
    assert "rl.policy_loss" in error_of("rl.policy_loss=ppo")
    assert "rl.loss_agg" in error_of("rl.loss_agg=mean")
    assert "did you mean 'k3'" in error_of("rl.kl_estimator=k4")
    assert "did you mean 'tis'" in error_of("rl.rollout_correction=tiss")


def test_k1_in_the_loss_is_refused_with_why_and_what_to_use():
    """k1's expected gradient in the loss is 0 (tests/algos/test_kl_gradients.py); in the reward it is exact."""
    msg = error_of("rl.kl_estimator=k1", "rl.kl_placement=loss", "rl.kl_coef=0.05")
    assert "rl.kl_estimator=k1" in msg and "gradient 0" in msg and "k3+" in msg and "rl.kl_placement=reward" in msg
    assert build_config(overrides=["rl.kl_estimator=k1", "rl.kl_placement=reward"]).rl.kl_estimator == "k1"
    assert build_config(overrides=["rl.kl_estimator=k1", "rl.kl_coef=0"]).rl.kl_coef == 0  # no KL term: no error


def test_several_errors_are_reported_on_one_line():
    msg = error_of("sft.steps=-1", "rl.lrr=1")
    assert "sft.steps" in msg and "rl.lrr" in msg


def test_dotted_overrides_parse_yaml_scalars():
    cfg = build_config(overrides=["rl.lr=1e-4", "sft.lr=0.5", "seed=3", "progress=false", "output_dir=runs/x",
                                  "task.operators=[+, '*']", "model.path=null"])
    assert isinstance(cfg.rl.lr, float) and cfg.rl.lr == 1e-4
    assert cfg.sft.lr == 0.5
    assert cfg.seed == 3 and isinstance(cfg.seed, int)
    assert cfg.progress is False
    assert cfg.output_dir == "runs/x"
    assert cfg.task.operators == ("+", "*")
    assert cfg.model.path is None
    assert parse_overrides(["a.b.c=1", "a.b.d=x", "e="]) == {"a": {"b": {"c": 1, "d": "x"}}, "e": ""}


def test_overrides_apply_on_top_of_the_file_and_later_ones_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 5\nrl:\n  lr: 0.1\n  group_size: 2\n")
    cfg = load_config(path, ["rl.lr=0.2", "rl.lr=0.3"])
    assert (cfg.seed, cfg.rl.lr, cfg.rl.group_size) == (5, 0.3, 2)


@pytest.mark.parametrize("bad", ["rl.lr", "=3", "rl=1 rl.lr=2"])
def test_malformed_overrides_are_config_errors(bad):
    overrides = bad.split(" ")
    with pytest.raises(ConfigError):
        build_config(overrides=overrides)


def test_missing_config_file_names_the_path(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="missing.yaml") as err:
        load_config(missing)
    assert str(missing) in str(err.value)


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 1\nrl:\n  lr: 0.1\n  group_size: [4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "line " in msg and "\n" not in msg


def test_invalid_value_in_a_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sft:\n  steps: -1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "sft.steps" in str(err.value)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_empty_file_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == RunConfig()


def test_dump_and_load_round_trip(tmp_path):
    cfg = build_config(overrides=["seed=7", "rl.lr=1e-4", "model.hidden_size=32", "task.operators=[+, -, '*']",
                                  "model.path=some/dir", "progress=false", "rl.kl_coef=0"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.model_dump() == cfg.model_dump()


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(ValidationError):
        cfg.seed = 1
    with pytest.raises(ValidationError):
        cfg.rl.lr = 1.0
    with pytest.raises(ValidationError):
        cfg.model = cfg.model


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), RunConfig)


def test_shipped_demo_config_equals_the_embedded_defaults():
    """configs/demo.yaml documents the default run; it must not drift from posttrain/config/."""
    path = Path(__file__).parent.parent / "configs" / "demo.yaml"
    assert load_config(path) == RunConfig()

    def keys(tree: dict, prefix: str = "") -> set[str]:
        return {k for key, v in tree.items() for k in (keys(v, f"{prefix}{key}.") if isinstance(v, dict)
                                                        else {f"{prefix}{key}"})}

    # every key is spelled out (output_dir is the demo's own, runs/demo)
    assert keys(yaml.safe_load(path.read_text())) | {"output_dir"} == keys(RunConfig().model_dump(mode="json"))


# The data tasks' keys (task.path, ...); building the tasks is tested in tests/tasks/test_build_task.py.

def test_data_task_fields_validate():
    cfg = build_config(overrides=["task.name=mbpp", "task.path=data/mbpp.jsonl", "task.hf_split=train",
                                  "task.hf_eval_split=test", "task.sandbox_timeout_s=2.5", "task.workers=4"])
    t = cfg.task
    assert (t.name, t.path, t.hf_split, t.hf_eval_split, t.sandbox_timeout_s, t.workers) == \
        ("mbpp", "data/mbpp.jsonl", "train", "test", 2.5, 4)
    g = build_config(overrides=["task.name=gsm8k", "task.hf_dataset=openai/gsm8k", "task.hf_eval_split=test",
                                "rl.prompts_per_step=100000"]).task  # its size is only known once loaded
    assert (g.path, g.hf_dataset, g.hf_config, g.num_eval) == (None, "openai/gsm8k", None, 500)


def test_arithmetic_defaults_are_unchanged():
    t = RunConfig().task
    assert (t.name, t.min_operand, t.max_operand, t.operators, t.num_eval, t.demo_error, t.demo_error_rate) == \
        ("arithmetic", 0, 99, ("+",), 500, "drop_carry", 0.6)
    assert (t.path, t.eval_path, t.hf_dataset, t.hf_split, t.sandbox_timeout_s, t.workers) == \
        (None, None, None, None, 5.0, 2)


def task_error_of(*overrides) -> str:
    """The one-line error of building the task of a config with `overrides` (the registry checks task.*)."""
    from posttrain.tasks import build_task

    with pytest.raises(ConfigError) as err:
        build_task(build_config(overrides=list(overrides)).task, 0)
    return str(err.value)


def test_unknown_task_name_lists_the_tasks():
    msg = task_error_of("task.name=gsm9k")
    assert "task.name" in msg and all(name in msg for name in ("arithmetic", "gsm8k", "math", "mbpp", "ifeval"))
    assert "did you mean 'gsm8k'" in msg


def test_task_fields_that_do_not_apply_are_named():
    assert "task.max_operand applies only to task.name arithmetic, not gsm8k" in \
        task_error_of("task.name=gsm8k", "task.max_operand=20")
    assert "task.path applies only to task.name custom or gsm8k or math or mbpp, not arithmetic" in task_error_of("task.path=x")
    msg = task_error_of("task.name=math", "task.workers=4", "task.sandbox_timeout_s=1")
    assert "task.workers" in msg and "task.sandbox_timeout_s" in msg
    assert "task.num_eval applies only" in task_error_of("task.name=mbpp", "task.num_eval=20")
    assert "task.eval_path applies only" in task_error_of("task.name=mbpp", "task.eval_path=x")


def test_bad_data_task_values_are_named():
    assert "give one data source" in error_of("task.name=gsm8k", "task.path=a", "task.hf_dataset=b")
    assert "did you mean 'validation'" in error_of("task.name=mbpp", "task.hf_eval_split=valid")
    assert "task.workers" in error_of("task.name=mbpp", "task.workers=0")
    assert "task.sandbox_timeout_s" in error_of("task.name=mbpp", "task.sandbox_timeout_s=0")
    assert "'task.pth'" in error_of("task.name=gsm8k", "task.pth=x") and "did you mean 'task.path'" in \
        error_of("task.name=gsm8k", "task.pth=x")


def test_arithmetic_size_rules_apply_only_to_arithmetic():
    assert "task.num_eval=500" in error_of("task.max_operand=5")  # 36 problems, none left for training
    assert build_config(overrides=["task.name=math", "task.path=x", "task.num_eval=20"]).task.num_eval == 20


def test_a_data_task_config_round_trips(tmp_path):
    cfg = build_config(overrides=["task.name=gsm8k", "task.path=data/train.jsonl", "task.eval_path=data/test.jsonl"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
