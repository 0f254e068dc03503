"""`RunConfig`: the whole run, every section in one schema, and the checks that span sections."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config.model import ModelConfig
from posttrain.config.recipes import (
    BestOfNConfig,
    DPOConfig,
    RewardModelConfig,
    RFTConfig,
    RLConfig,
    SFTConfig,
)
from posttrain.config.runtime import (
    CheckpointConfig,
    EnvConfig,
    EvalConfig,
    LoggingConfig,
    RayConfig,
)
from posttrain.config.sections import _Section
from posttrain.config.task import TaskConfig


class RunConfig(_Section):
    seed: int = Field(0, description="Seeds every random generator; same seed and config give the same numbers.")
    output_dir: str = Field("runs/demo", description="Where config.yaml, metrics.jsonl, checkpoints go. Unset, "
                            "the CLI picks runs/<command>_<config name> (posttrain/cli.py: default_output_dir; the "
                            "demo: runs/demo, its rlhf pipeline: runs/rlhf).")
    threads: int | Literal["auto"] = Field("auto", description="torch CPU threads, or 'auto': the cores free "
                                           "when the run starts (measured over 0.2 s; at least 1). Float results "
                                           "can depend on the thread count: for bit-identical repeats on a machine "
                                           "whose load varies, set a number.")
    progress: bool = Field(True, description="Show a progress bar.")
    backend: Literal["local", "ray"] = Field("local", description="'local': everything in this process. 'ray': "
                                             "`posttrain rl` with Ray actors (rollout workers, reward workers, "
                                             "data-parallel learner), configured in the ray section.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    rm: RewardModelConfig = Field(default_factory=RewardModelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    bon: BestOfNConfig = Field(default_factory=BestOfNConfig)
    rft: RFTConfig = Field(default_factory=RFTConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _task_size(self) -> "RunConfig":
        """Arithmetic's problem count is known here; a data task's only once loaded (posttrain.tasks.fit_task)."""
        t = self.task
        if t.name != "arithmetic":
            return self
        total = len(set(t.operators)) * (t.max_operand - t.min_operand + 1) ** 2
        train = total - t.num_eval
        if train < 1:
            raise ValueError(f"task: only {total} distinct problems in the operand range, none left for "
                             f"training after task.num_eval={t.num_eval}")
        if self.rl.prompts_per_step > train:
            raise ValueError(f"rl.prompts_per_step ({self.rl.prompts_per_step}) exceeds the {train} "
                             f"training problems of the task")
        return self

    @model_validator(mode="after")
    def _ray_layout(self) -> "RunConfig":
        """backend ray: every rollout worker and learner rank gets an equal share (posttrain/distributed)."""
        if self.backend != "ray":
            if self.ray.max_staleness > 0:
                raise ValueError(f"ray.max_staleness={self.ray.max_staleness} needs backend=ray (it overlaps "
                                 "generation with the update on separate actors; in one process there is nothing "
                                 "to overlap, only staler samples): set backend=ray or ray.max_staleness=0")
            return self
        if self.ray.engine == "vllm" and self.rl.speculative != "none":
            raise ValueError(f"rl.speculative={self.rl.speculative} is posttrain's own engine's (ray.engine=torch); "
                             "vLLM has its own speculative decoding: set rl.speculative=none with ray.engine=vllm")
        if self.ray.max_staleness > 0 and self.rl.rollout_correction == "none":
            raise ValueError(f"ray.max_staleness={self.ray.max_staleness} trains on samples of a policy up to "
                             f"{self.ray.max_staleness} update(s) old: set rl.rollout_correction (tis, mis or "
                             "icepop) so that the policy loss weighs pi_old / pi_rollout (docs/distributed.md)")
        if self.model.peft == "prompt_tuning" and self.ray.engine == "vllm":
            raise ValueError("model.peft=prompt_tuning is not available with ray.engine=vllm (vLLM serves no soft "
                             "prompts); set ray.engine=torch")
        if self.model.dtype != "float32":
            raise ValueError(f"model.dtype={self.model.dtype} is not available with backend=ray yet (its actors "
                             "compute in float32); set model.dtype=float32 or backend=local")
        r, c = self.ray, self.rl
        n = c.prompts_per_step * c.group_size
        if n % r.num_rollout_workers:
            raise ValueError(f"rl.prompts_per_step * rl.group_size ({n}) must be divisible by "
                             f"ray.num_rollout_workers ({r.num_rollout_workers})")
        minibatch = n // c.mini_batches
        if minibatch % r.num_learners:
            raise ValueError(f"the minibatch (rl.prompts_per_step * rl.group_size / rl.mini_batches = {minibatch} "
                             f"sequences) must be divisible by ray.num_learners ({r.num_learners})")
        share = minibatch // r.num_learners
        if c.micro_batch_size is not None and c.micro_batch_size < share and share % c.micro_batch_size:
            raise ValueError(f"rl.micro_batch_size ({c.micro_batch_size}) must divide each learner's share of a "
                             f"minibatch ({share} sequences with ray.num_learners={r.num_learners})")
        if r.address is not None and r.cpus is not None:
            raise ValueError("ray.cpus applies only to a local instance (ray.address null); a cluster offers its "
                             "own CPUs")
        if c.ptx_coef > 0 and r.learner_gpus > 0:
            raise ValueError("rl.ptx_coef > 0 needs CPU learner ranks (ray.learner_gpus=0): the ptx loss is computed "
                             "on CPU tensors")
        if r.engine == "vllm" and r.rollout_worker_gpus <= 0:
            raise ValueError("ray.engine 'vllm' needs a GPU per rollout worker: set ray.rollout_worker_gpus=1")
        return self
