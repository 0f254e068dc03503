"""Typed run configuration: YAML file + dotted command-line overrides, validated once, then frozen.

One schema (`RunConfig`) serves every recipe; each recipe reads its own section (`sft`, `rl`). The
defaults are the demo's settings, so `RunConfig()` is the embedded default run.

    cfg = load_config("configs/grpo_arithmetic.yaml", ["rl.lr=1e-4", "seed=3"])

Errors are `ConfigError` with a one-line message that names the bad key (and the closest valid key for
a misspelling) or the allowed values, after where that key was set: the YAML file or the command line
(`configs/x.yaml: unknown config key 'rl.lrr' ...`, `command line: unknown config key 'rl.lrr' ...`).

Where each part lives (each module imports only those above it; import the names from here):

    sections.py  the base of every section, the fields several share (_AdamW, _CosineDecay, _Sampling), _suggest
    model.py     model: ModelConfig, LoraConfig, PromptTuningConfig, LORA_TARGETS
    task.py      task: TaskConfig, MBPP_SPLITS
    recipes.py   the commands' sections: SFTConfig, RLConfig, RewardModelConfig, DPOConfig, BestOfNConfig, RFTConfig
    runtime.py   EnvConfig (and ENVIRONMENTS), LoggingConfig, EvalConfig, CheckpointConfig, RayConfig
    run.py       RunConfig: every section, and the checks that span sections
    loading.py   load_config, build_config, read_yaml, parse_overrides, merge_trees, dump_config, COMMAND_LINE,
                 and the error descriptions (_describe)
"""

from posttrain.config.loading import (
    COMMAND_LINE,
    build_config,
    dump_config,
    load_config,
    merge_trees,
    parse_overrides,
    read_yaml,
)
from posttrain.config.model import (
    LORA_TARGETS,
    LoraConfig,
    ModelConfig,
    PromptTuningConfig,
)
from posttrain.config.recipes import (
    BestOfNConfig,
    DPOConfig,
    RewardModelConfig,
    RFTConfig,
    RLConfig,
    SFTConfig,
)
from posttrain.config.run import RunConfig
from posttrain.config.runtime import (
    ENVIRONMENTS,
    CheckpointConfig,
    EnvConfig,
    EvalConfig,
    LoggingConfig,
    RayConfig,
)
from posttrain.config.task import MBPP_SPLITS, TaskConfig
from posttrain.errors import ConfigError

__all__ = [
    "COMMAND_LINE", "ENVIRONMENTS", "LORA_TARGETS", "MBPP_SPLITS",
    "BestOfNConfig", "CheckpointConfig", "ConfigError", "DPOConfig", "EnvConfig", "EvalConfig", "LoggingConfig",
    "LoraConfig", "ModelConfig", "PromptTuningConfig", "RFTConfig", "RLConfig", "RayConfig", "RewardModelConfig",
    "RunConfig", "SFTConfig", "TaskConfig",
    "build_config", "dump_config", "load_config", "merge_trees", "parse_overrides", "read_yaml",
]
