"""The sections around training: the RL environment (`env`), `logging`, `eval`, `checkpoint`, and the Ray
backend (`ray`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config.sections import _Section, _suggest

ENVIRONMENTS = ("single_turn", "reflection", "tools")  # built-ins (posttrain/rollout/env.py BUILTIN)


class EnvConfig(_Section):
    """The environment RL rollouts run in (posttrain/rollout/env.py, docs/multiturn.md): one assistant turn scored
    by the task's verifier (single_turn), or several turns with observations in between. rl.max_new_tokens is
    the longest assistant turn."""

    name: str = Field("single_turn", min_length=1, description="A built-in environment (" + ", ".join(ENVIRONMENTS)
                      + ") or a user's class as 'module:Class' or 'path/to/file.py:Class', built once per "
                      "trajectory as Class(ctx, **env.kwargs).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the environment class "
                                   "(reflection: feedback, threshold; a user's class: its own).")
    max_turns: int = Field(4, ge=1, description="Most assistant turns in a trajectory; one still going after its "
                           "last turn is truncated (finished false, reason max_turns). single_turn ends after one.")
    max_tool_calls: int = Field(8, ge=0, description="Most tool calls in a trajectory (as the environment counts "
                                "them in Observation.info['tool_calls']); more truncates it (reason max_tool_calls).")
    max_response_tokens: int | None = Field(None, ge=1, description="Most response tokens of a trajectory, sampled "
                                            "and environment tokens together; a turn or observation that would go "
                                            "past it truncates the trajectory (reason max_response_tokens). None: "
                                            "no limit beyond env.max_turns turns of rl.max_new_tokens.")
    tool_timeout_s: float = Field(10.0, gt=0, description="tools: wall-clock limit of one tool call; past it the "
                                  "call returns an error message to the model.")
    tools: tuple[str, ...] = Field(("calculator",), description="tools: the tools offered, built-in (calculator, "
                                   "python) or 'module:function'.")
    max_attempts: int = Field(3, ge=1, description="reflection: most answers to one problem; after a wrong one the "
                              "verifier's feedback is appended and the model answers again.")
    attempt_discount: float = Field(1.0, gt=0, le=1, description="reflection: the reward of a trajectory is the "
                                    "final attempt's score times attempt_discount ** (attempts - 1).")
    max_observation_chars: int = Field(2000, ge=16, description="An observation message longer than this is cut "
                                       "to it, with a note saying how much was cut.")

    @model_validator(mode="after")
    def _name(self) -> "EnvConfig":
        if ":" not in self.name and self.name not in ENVIRONMENTS:
            raise ValueError(f"env.name must be one of {', '.join(ENVIRONMENTS)} or 'module:Class' (got "
                             f"{self.name!r}){_suggest(self.name, list(ENVIRONMENTS))}")
        return self


class LoggingConfig(_Section):
    report_to: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = Field(
        ("jsonl",), description="Where metrics go: metrics.jsonl always; 'tensorboard': event files in "
        "OUTPUT_DIR/tensorboard (the tensorboard package); 'wandb': a Weights & Biases run (the wandb package; "
        "offline when there is no network or WANDB_MODE=offline).")
    wandb_project: str = Field("posttrain", min_length=1, description="wandb: the project name.")
    sample_generations: int = Field(4, ge=0, description="Held-out prompts whose greedy responses and rewards "
                                    "are logged as a table at each evaluation (TensorBoard text, W&B table; 0: "
                                    "none).")


class EvalConfig(_Section):
    batch_size: int = Field(500, ge=1, description="Prompts per greedy-decoding batch during evaluation.")
    max_new_tokens: int = Field(6, ge=1, description="Longest answer in tokens, EOS included.")


class CheckpointConfig(_Section):
    every: int = Field(50, ge=0, description="Save a checkpoint every N steps of each training phase, at its "
                       "last step and at the end of each RFT round (0: only when stopped by a signal or by "
                       "non-finite steps). Checkpoints are deleted when the run completes; final/ holds the result.")
    keep: int = Field(2, ge=1, description="Keep the newest N checkpoints (an older one is the fallback when the "
                      "newest is damaged).")
    max_skipped_steps: int = Field(5, ge=1, description="Stop the run (state saved) after this many consecutive "
                                   "steps with a non-finite loss or gradient, each skipped.")


class RayConfig(_Section):
    """`backend: ray`: the RL loop's roles as Ray actors (posttrain/distributed, docs/distributed.md). Ignored by
    the local backend."""

    address: str | None = Field(None, description="Ray cluster to join ('auto', 'HOST:6379' or "
                                "'ray://HOST:10001'); None: start a local instance for the run (its temporary "
                                "files in OUTPUT_DIR/ray) and stop it at the end.")
    cpus: int | None = Field(None, ge=1, description="Local instance only: logical CPUs it offers (None: the "
                             "machine's cores).")
    num_rollout_workers: int = Field(2, ge=1, description="Rollout workers, each holding a policy copy and "
                                     "generating an equal share of every rollout batch.")
    num_learners: int = Field(1, ge=1, description="Data-parallel learner ranks (torch.distributed: gloo on CPU, "
                              "NCCL on GPU); each takes an equal share of every minibatch.")
    num_reward_workers: int = Field(1, ge=0, description="Reward workers scoring the rollout shards (the task's "
                                    "reward, the sandbox for mbpp, or the reward model); 0: score in the driver "
                                    "process (cheap rewards such as arithmetic need no actor).")
    rollout_worker_cpus: float = Field(0.5, ge=0, description="CPUs Ray reserves for each rollout worker.")
    learner_cpus: float = Field(0.5, ge=0, description="CPUs Ray reserves for each learner rank.")
    reward_worker_cpus: float = Field(0.0, ge=0, description="CPUs Ray reserves for each reward worker.")
    rollout_worker_gpus: float = Field(0.0, ge=0, description="GPUs for each rollout worker (the vllm engine "
                                       "needs one).")
    learner_gpus: float = Field(0.0, ge=0, description="GPUs for each learner rank (> 0: the rank trains on "
                                "CUDA and all-reduces with NCCL).")
    threads_per_worker: int = Field(1, ge=1, description="torch CPU threads in each actor.")
    engine: Literal["torch", "vllm"] = Field("torch", description="Rollout engine: 'torch' (posttrain's "
                                             "generation with a KV cache) or 'vllm' (GPU, the vllm extra).")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vllm engine: share of the GPU's "
                                               "memory it may take.")
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="vllm engine: "
                                                                           "weight and activation dtype.")
    timeout_s: float = Field(600.0, gt=0, description="Longest wait for any one remote call (generate, score, "
                             "update, weight sync); a worker that takes longer is reported as hung and the run "
                             "stops.")
    startup_timeout_s: float = Field(180.0, gt=0, description="Longest wait for the actors to start (and for a "
                                     "restarted one).")
    max_restarts: int = Field(3, ge=0, description="Rollout and reward workers that die are restarted and their "
                              "share re-issued, up to this many restarts in the run; a learner rank that dies counts "
                              "too: every role is restarted and the run resumes from its newest checkpoint.")
    max_staleness: int = Field(0, ge=0, description="Off-policy rollouts: how many updates old the policy that "
                               "generated a trained batch may be. 0: on-policy (generate, then update). k > 0: the "
                               "rollout workers generate the batches of the next k steps while the learner trains "
                               "on this one (posttrain/rl/loop.py); log pi_old is recomputed by the learner and "
                               "rl.rollout_correction (required) weighs pi_old / pi_rollout. backend ray only.")
