"""Typed run configuration: YAML file + dotted command-line overrides, validated once, then frozen.

One schema (`RunConfig`) serves every recipe; each recipe reads its own section (`sft`, `rl`). The
defaults are the demo's settings, so `RunConfig()` is the embedded default run.

    cfg = load_config("configs/grpo_arithmetic.yaml", ["rl.lr=1e-4", "seed=3"])

Errors are `ConfigError` with a one-line message that names the bad key (and the closest valid key for
a misspelling) or the allowed values, after where that key was set: the YAML file or the command line
(`configs/x.yaml: unknown config key 'rl.lrr' ...`, `command line: unknown config key 'rl.lrr' ...`).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain.algos.names import KL_GRADIENT, NAMES
from posttrain.errors import ConfigError
from posttrain.presets import PRESETS, expand_preset


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)



class _AdamW(_Section):
    """The optimizer fields every training section shares (its lr and warm-up are its own)."""

    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this value.")


class _CosineDecay(_Section):
    lr_min_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of lr.")


class _Sampling(_Section):
    """The sampling fields every section that samples completions shares."""

    temperature: float = Field(1.0, gt=0, description="Sampling temperature (RL: the log-probs use the same).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1: off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")


# The projections of a Llama / Qwen2 / Mistral decoder layer: attention and MLP (the defaults of model.lora).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(_Section):
    """model.peft=lora: low-rank adapters (Hu et al. 2021) through the peft library (posttrain/models/adapters.py,
    docs/peft.md). Only the adapters train; the base weights stay frozen."""

    r: int = Field(16, ge=1, description="Rank of each adapter (W + (alpha / r) B A, A: r x in, B: out x r).")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the update is (alpha / r) B A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input while training (RL runs "
                           "the policy in eval mode, so it applies to sft, rm, dpo and rft only).")
    target_modules: tuple[str, ...] = Field(LORA_TARGETS, min_length=1, description="Module names (the last part "
                                            "of the dotted name) that get an adapter; default: the attention and "
                                            "MLP projections of Llama / Qwen2. Checked against the model when it "
                                            "loads: a name it lacks is an error listing the names it has.")


class PromptTuningConfig(_Section):
    """model.peft=prompt_tuning: learned soft-prompt embeddings put before every prompt (Lester et al. 2021),
    through the peft library; the whole model stays frozen (sft, rl, dpo, rft; docs/peft.md)."""

    num_virtual_tokens: int = Field(16, ge=1, description="Soft-prompt length in embedding vectors (each of the "
                                    "model's hidden size; they also take that many positions of the context).")
    init_text: str | None = Field(None, min_length=1, description="Initialise the soft prompt from this text's "
                                  "token embeddings (repeated or cut to num_virtual_tokens); None: the embeddings of "
                                  "num_virtual_tokens tokens drawn from the vocabulary with the run's seed.")


class ModelConfig(_Section):
    path: str | None = Field(None, description="Local Hugging Face causal-LM directory (config, weights, "
                             "tokenizer). None builds the tiny model below with the character tokenizer.")
    hidden_size: int = Field(128, ge=8, description="Tiny model: width of the residual stream.")
    num_layers: int = Field(4, ge=1, description="Tiny model: number of decoder layers.")
    num_heads: int = Field(4, ge=1, description="Tiny model: query heads.")
    num_kv_heads: int = Field(2, ge=1, description="Tiny model: key/value heads (grouped-query attention).")
    intermediate_size: int = Field(512, ge=8, description="Tiny model: SwiGLU hidden width.")
    max_position_embeddings: int = Field(64, ge=8, description="Tiny model: context window in tokens.")
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "float32", description="Compute precision. 'bfloat16': mixed precision (matmuls in bf16 through "
        "torch.autocast, float32 weights, gradients and optimizer state; log pi_old recomputed by the training "
        "forward); 'auto': bfloat16 where the CPU (AMX, AVX512-BF16) or GPU computes it natively, else float32. "
        "posttrain/models/precision.py.")
    gradient_checkpointing: bool = Field(False, description="Keep only each decoder layer's input for the backward "
                                         "pass and recompute the rest (the policy's training forward): less memory "
                                         "for about a third more update time. The lean forward applies it in any "
                                         "mode (the RL learner runs the policy in eval mode); transformers' forward "
                                         "only in training mode.")
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:[0-9]+)?)$", description="Where the model and every "
                        "tensor made for it live: 'cpu', 'cuda', 'cuda:N', or 'auto' (cuda when a GPU is visible, else "
                        "cpu). Honoured by sft, rl and the demo's SFT and GRPO (backend local; backend ray places "
                        "its learners with ray.learner_gpus); the other commands run on the CPU and refuse another "
                        "device.")

    peft: Literal["lora", "prompt_tuning"] | None = Field(
        None, description="Parameter-efficient training with the peft library: 'lora' (model.lora), "
        "'prompt_tuning' (model.prompt_tuning); None: every weight trains. docs/peft.md.")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    prompt_tuning: PromptTuningConfig = Field(default_factory=PromptTuningConfig)

    @model_validator(mode="after")
    def _heads(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads "
                             f"({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads "
                             f"({self.num_kv_heads})")
        return self


MBPP_SPLITS = ("prompt", "test", "validation", "train")  # the official task_id ranges (posttrain/tasks/mbpp.py)


class TaskConfig(_Section):
    """The task: `arithmetic` is generated; `gsm8k`, `math` and `mbpp` read data (task.path or task.hf_dataset)
    and need a model with a subword tokenizer (model.path). A field that does not apply to the chosen task must
    keep its default: each task declares the fields it reads when it registers (posttrain/tasks/registry.py).
    docs/rewards.md describes each task."""

    name: str = Field(
        "arithmetic", description="A registered task (posttrain/tasks/registry.py; a task.* field it does not read "
        "must keep its default). Built in: 'arithmetic' (generated problems, exact-match reward), 'gsm8k' "
        "(word problems, final-number reward), 'math' (competition problems, symbolic answer check), 'mbpp' "
        "(Python functions, tests run in the sandbox), 'ifeval' (generated requests with one IFEval-style "
        "verifiable constraint each; RL only, needs the if-verifiable package).")
    instructions: tuple[str, ...] | None = Field(None, description="ifeval: the IFEval instruction ids to draw "
                                                 "constraints from (None: all eight of posttrain/tasks/"
                                                 "instructions.py).")
    min_operand: int = Field(0, ge=0, description="arithmetic: smallest operand.")
    max_operand: int = Field(99, ge=0, description="arithmetic: largest operand.")
    operators: tuple[Literal["+", "-", "*"], ...] = Field(("+",), min_length=1,
                                                          description="arithmetic: operators to draw from.")
    num_eval: int = Field(500, ge=1, description="arithmetic, gsm8k, math, ifeval: held-out evaluation problems, disjoint "
                          "from training prompts (gsm8k, math: drawn from the training data by a seeded shuffle "
                          "unless task.eval_path or task.hf_eval_split is set).")
    demo_error: Literal["none", "drop_carry", "trailing_period"] = Field(
        "drop_carry", description="arithmetic: systematic mistake in the SFT demonstrations: 'drop_carry' forgets "
        "the carry out of the units digit of an addition (37+58=85), as a hurried human demonstrator might; "
        "'trailing_period' writes the answer with a full stop (37+58=95.), which the exact-match gold rule "
        "(the bare number) rejects.")
    demo_error_rate: float = Field(0.6, ge=0.0, le=1.0, description="arithmetic: fraction of the demonstrations "
                                   "that could contain the mistake which do.")
    path: str | None = Field(None, description="gsm8k, math, mbpp: JSON Lines data file (gsm8k: train.jsonl of "
                             "openai/grade-school-math; math: MATH-500-style rows; mbpp: mbpp.jsonl of "
                             "google-research, split by task_id). None: read task.hf_dataset instead; one of the "
                             "two is required.")
    eval_path: str | None = Field(None, description="gsm8k, math: held-out JSON Lines file (e.g. gsm8k "
                                  "test.jsonl); None: hold out task.num_eval training rows.")
    hf_dataset: str | None = Field(None, description="gsm8k, math, mbpp: a Hugging Face dataset (hub name such as "
                                   "openai/gsm8k, or a local directory of data files) read with `datasets` "
                                   "instead of task.path.")
    hf_config: str | None = Field(None, description="Config name of task.hf_dataset; None: the task's own for a "
                                  "hub name (gsm8k 'main', mbpp 'full', math none), none for a local directory.")
    hf_split: str | None = Field(None, description="gsm8k, math, mbpp: training split; None: the task's default "
                                 "(gsm8k 'train', math 'test', mbpp 'train'). mbpp: one of prompt, test, "
                                 "validation, train, which in task.path also selects that task_id range.")
    hf_eval_split: str | None = Field(None, description="Held-out split (gsm8k, math: of task.hf_dataset; None: "
                                      "hold out task.num_eval training rows. mbpp: as task.hf_split; None: "
                                      "'validation').")
    sandbox_timeout_s: float = Field(5.0, gt=0, description="mbpp: wall-clock limit per program run in the "
                                     "sandbox (interpreter start-up included).")
    workers: int = Field(2, ge=1, description="mbpp: sandboxed programs run at the same time.")
    chat_template: Literal["auto", "none"] = Field(
        "auto", description="'auto': when the model's tokenizer has a chat template, every prompt is rendered "
        "through it as the user's turn with the generation prompt (add_generation_prompt=True), and SFT "
        "demonstrations and preference pairs are trained as the assistant's turn (loss on the answer and its "
        "end-of-turn token only); the tiny character tokenizer has none, so nothing changes there. 'none': "
        "prompts as written. Generation stops at EOS and at the template's end-of-turn token either way.")
    system_prompt: str | None = Field(None, description="With a chat template: a system message put before "
                                      "every prompt. None: none (the template may add its own default).")
    prompt_field: str = Field("prompt", min_length=1, description="custom: the column holding the prompt (text, "
                              "or a list of chat messages); a row without it may have a 'messages' column "
                              "instead (chat format, the last assistant turn being the SFT demonstration).")
    completion_field: str = Field("completion", min_length=1, description="custom: the column holding the SFT "
                                  "demonstration (when 'messages' does not end with the assistant's turn).")

    @model_validator(mode="after")
    def _applies(self) -> "TaskConfig":
        if self.name == "arithmetic" and self.max_operand < self.min_operand:
            raise ValueError(f"task.max_operand ({self.max_operand}) must be >= task.min_operand "
                             f"({self.min_operand})")
        if self.path is not None and self.hf_dataset is not None:
            raise ValueError("task.path and task.hf_dataset are both set; give one data source (set the other "
                             "to null)")
        if self.name == "mbpp":
            for key in ("hf_split", "hf_eval_split"):
                value = getattr(self, key)
                if value is not None and value not in MBPP_SPLITS:
                    raise ValueError(f"task.{key} must be one of {', '.join(MBPP_SPLITS)} for mbpp"
                                     f"{_suggest(value, list(MBPP_SPLITS))}")
        return self




class SFTConfig(_AdamW, _CosineDecay):
    steps: int = Field(1000, ge=0, description="Optimizer steps (the demo: 1000; at 2000, with its slower cosine decay, the tiny model sometimes stays on the plateau before it learns addition).")
    batch_size: int = Field(64, ge=1, description="Demonstrations per step.")
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (decoupled). 0.1: with 0, the demo's "
                                "tiny model found digit alignment (its loss drop) late or not at all on some seeds "
                                "(docs/demo.md).")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps, then cosine decay to lr_min_ratio*lr.")
    eval_every: int = Field(250, ge=0, description="Evaluate held-out accuracy every N steps (0: only at the end).")
    log_every: int = Field(10, ge=1, description="Write a metrics line every N steps.")


class RLConfig(_AdamW, _Sampling):
    preset: str | None = Field(None, description="A named algorithm (" + ", ".join(PRESETS) + ") that fills "
                               "the estimator, policy loss, KL and aggregation keys this section leaves "
                               "unset (posttrain/presets.py, docs/algorithms.md); None: the keys as given.")
    steps: int = Field(150, ge=0, description="Rollout steps (each: generate, score, update).")
    prompts_per_step: int = Field(32, ge=1, description="Distinct prompts per rollout step.")
    group_size: int = Field(8, ge=1, description="Samples per prompt (G in GRPO).")
    lr: float = Field(2e-4, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps, then constant.")
    advantage: str = Field("grpo", description="Advantage estimator (posttrain.algos.advantages). One that "
                           "needs values (gae) makes the loop train a critic; one that needs a baseline reward "
                           "(remax) makes it decode each prompt greedily and score that.")
    adv_eps: float = Field(1e-6, gt=0, description="Epsilon in the group-std normalisation.")
    policy_loss: str = Field("ppo_clip", description="Policy loss (posttrain.algos.policy_losses): ppo_clip, gspo, "
                             "reinforce, cispo, gmpo, sapo.")
    loss_agg: str = Field("token-mean", description="Loss aggregation mode (posttrain.algos.aggregation).")
    clip_eps_low: float = Field(0.2, gt=0, lt=1, description="PPO clip: ratio lower bound is 1 - clip_eps_low.")
    clip_eps_high: float = Field(0.2, gt=0, description="PPO clip: ratio upper bound is 1 + clip_eps_high.")
    kl_coef: float = Field(0.01, ge=0, description="KL-to-reference coefficient beta (in the loss or the reward, "
                           "rl.kl_placement); 0 loads no reference model at all.")
    kl_estimator: str = Field("k3+", description="Per-token KL estimator (posttrain.algos.kl): k1, k2, k3, k3+ (k3's "
                              "value, k2's gradient). In the loss k2 and k3+ give the gradient of KL(pi || pi_ref), k3 "
                              "that of the forward KL(pi_ref || pi), k1 none (refused); in the reward only k1 is "
                              "unbiased (docs/algorithms.md).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each rollout batch.")
    mini_batches: int = Field(1, ge=1, description="Optimizer steps per pass (the batch is split evenly).")
    max_new_tokens: int = Field(6, ge=1, description="Longest completion in tokens, EOS included.")
    speculative: Literal["none", "ngram"] = Field("none", description="Speculative sampling in posttrain's rollout "
                                                  "engine (posttrain/rollout/speculative.py, docs/speculative.md): "
                                                  "'ngram' drafts by prompt lookup and verifies in one forward pass; "
                                                  "the samples and log-probs are exactly the policy's. 'none': off.")
    speculative_tokens: int = Field(4, ge=1, le=32, description="rl.speculative=ngram: most draft tokens per "
                                    "verify pass (k).")
    speculative_ngram: int = Field(3, ge=1, le=16, description="rl.speculative=ngram: length of the suffix matched "
                                   "in the row's context (n).")
    eval_every: int = Field(25, ge=0, description="Evaluate held-out accuracy every N steps (0: only at the end).")
    micro_batch_size: int | None = Field(None, ge=1, description="Sequences per forward/backward pass inside "
                                         "a minibatch (gradient accumulation); None: the whole minibatch.")
    # Where the outcome score comes from.
    reward: Literal["task", "reward_model"] = Field(
        "task", description="'task': the task's verifiable reward. 'reward_model': a trained reward model "
        "(rl.reward_model_path); the task's reward is then logged as the gold score.")
    reward_model_path: str | None = Field(None, description="Directory written by `posttrain rm`.")
    reward_funcs: tuple[str, ...] = Field((), description="Reward functions by name, as 'module:function', "
                                          "'module:factory(args)' or 'file.py:function' (posttrain/rewards/resolve.py)"
                                          ": their weighted sum is the task's reward in training and evaluation, "
                                          "the data's columns passed by name. Empty: the task's own verifier. "
                                          "Required by task.name=custom.")
    reward_weights: tuple[float, ...] | None = Field(None, description="One weight per rl.reward_funcs entry "
                                                     "(None: 1 each).")
    missing_eos_penalty: float = Field(0.0, ge=0, description="Subtracted from the score of a response that "
                                       "hit max_new_tokens without EOS.")
    # KL to the reference.
    kl_placement: Literal["loss", "reward"] = Field(
        "loss", description="'loss': kl_coef * KL estimator added to the per-token loss (GRPO). 'reward': "
        "r_t -= kl_coef * KL estimator at every response token before advantages (PPO-RLHF).")
    kl_target: float | None = Field(None, gt=0, description="Adaptive KL controller target (summed KL per "
                                    "sequence); None: fixed kl_coef.")
    kl_horizon: float = Field(10000.0, gt=0, description="Adaptive KL controller horizon, in samples.")
    # Critic (loaded when advantage == 'gae').
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(False, description="Masked whitening of advantages over the batch.")
    critic_init: Literal["auto", "reward_model", "policy"] = Field(
        "auto", description="Initialise the critic from the reward model or from the policy (model.path) "
        "with a fresh zero head; 'auto': the reward model when rl.reward_model_path is set, else the policy.")
    critic_lr: float = Field(5e-4, gt=0, description="Peak AdamW learning rate of the critic.")
    value_loss: Literal["clipped", "unclipped"] = Field("clipped", description="Critic loss.")
    value_clip: float = Field(0.2, gt=0, description="Clipped value loss: |V - V_old| band.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient (subtracted from the loss).")
    dual_clip_c: float | None = Field(None, gt=1, description="Dual-clip bound c (> 1) for negative "
                                      "advantages; None: off.")
    sapo_tau_pos: float = Field(1.0, gt=0, description="policy_loss sapo: gate temperature of tokens with a "
                                "positive advantage (the paper's 1.0).")
    sapo_tau_neg: float = Field(1.05, gt=0, description="policy_loss sapo: gate temperature of the other tokens "
                                "(the paper's 1.05).")
    # Rollout/trainer mismatch (posttrain/algos/rollout_correction.py).
    rollout_correction: str = Field("none", description="Importance weight on the policy loss for the gap between "
                                    "the rollout engine's log-probs and the trainer's (vLLM, bf16): none, tis "
                                    "(min(rho, C)), mis (rho, 0 above C), icepop (rho, 0 outside [1/C, C]).")
    rollout_correction_level: Literal["token", "sequence"] = Field(
        "token", description="rho per token, or per sequence (the product of its tokens' ratios).")
    rollout_correction_cap: float = Field(2.0, gt=1, description="C of the rollout correction.")
    rollout_mismatch_threshold: float = Field(0.1, gt=0, description="|log pi_old - log pi_rollout| above which a "
                                              "token counts in the logged rollout_logprob_diff_frac.")
    # Pretraining mix (InstructGPT's PPO-ptx).
    ptx_coef: float = Field(0.0, ge=0, description="lambda_ptx: weight of the next-token loss on a ptx "
                            "minibatch added to the actor's loss at every optimizer step (0: off).")
    ptx_data: str = Field("task", description="'task': the task's SFT demonstrations; or a .txt file (one "
                          "text per line) or .jsonl file ('text', or 'prompt' + 'completion').")
    ptx_batch_size: int = Field(32, ge=1, description="Sequences per ptx minibatch.")
    # DAPO's extras.
    dynamic_sampling: bool = Field(False, description="Keep only groups whose scores are not all equal and "
                                   "sample more prompts until prompts_per_step groups are kept (DAPO).")
    dynamic_sampling_max_rounds: int = Field(8, ge=1, description="Dynamic sampling: most generation rounds "
                                             "per step; if still short, the batch is filled with dropped groups "
                                             "(logged as ds_filled_groups).")
    overlong_buffer_frac: float = Field(0.0, ge=0, lt=1, description="DAPO soft overlong punishment: the last "
                                        "fraction of max_new_tokens over which the score falls linearly to "
                                        "-overlong_penalty_factor (0: off).")
    overlong_penalty_factor: float = Field(1.0, ge=0, description="Largest overlong penalty.")
    mask_truncated: bool = Field(False, description="Exclude responses cut at max_new_tokens without EOS from "
                                 "the loss (DAPO's overlong filtering).")
    # Invariants checked during training.
    check_invariants: bool = Field(True, description="Check, every step, that the first minibatch's "
                                   "probability ratio is 1, the response mask is not empty and the advantages "
                                   "are finite; stop with a clear error otherwise.")
    ratio_tolerance: float = Field(1e-3, gt=0, description="Largest |log ratio| allowed on the first minibatch "
                                   "(fp32 CPU: ~1e-6; loosen for bf16 or an external inference engine).")
    log_rollouts_every: int = Field(0, ge=0, description="Write every N steps the step's trajectories to "
                                    "OUTPUT_DIR/rollouts/step_NNNNNN.jsonl: segments (role, text, tokens, in the "
                                    "loss mask), reward, turns, tool calls (0: never).")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data):
        return expand_preset(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _batches(self) -> "RLConfig":
        n = self.prompts_per_step * self.group_size
        if n % self.mini_batches:
            raise ValueError(f"rl.prompts_per_step * rl.group_size ({n}) must be divisible by "
                             f"rl.mini_batches ({self.mini_batches})")
        if self.micro_batch_size is not None and (n // self.mini_batches) % self.micro_batch_size:
            raise ValueError(f"rl.micro_batch_size ({self.micro_batch_size}) must divide the minibatch "
                             f"size ({n // self.mini_batches} sequences)")
        if self.reward == "reward_model" and self.reward_model_path is None:
            raise ValueError("rl.reward_model_path is required when rl.reward is 'reward_model'")
        if self.critic_init == "reward_model" and self.reward_model_path is None:
            raise ValueError("rl.critic_init 'reward_model' needs rl.reward_model_path (or set "
                             "rl.critic_init=policy)")
        if self.dynamic_sampling and self.group_size < 2:
            raise ValueError("rl.dynamic_sampling needs rl.group_size >= 2 (a group of one never has unequal scores)")
        if self.overlong_buffer_frac > 0 and round(self.overlong_buffer_frac * self.max_new_tokens) < 1:
            raise ValueError(f"rl.overlong_buffer_frac ({self.overlong_buffer_frac}) of rl.max_new_tokens "
                             f"({self.max_new_tokens}) is less than one token")
        for key, value, valid in (("advantage", self.advantage, list(NAMES["advantage"])),
                                  ("policy_loss", self.policy_loss, list(NAMES["policy_loss"])),
                                  ("loss_agg", self.loss_agg, list(NAMES["loss_agg"])),
                                  ("kl_estimator", self.kl_estimator, list(NAMES["kl_estimator"])),
                                  ("rollout_correction", self.rollout_correction,
                                   ["none", *NAMES["rollout_correction"]])):
            if value not in valid:
                raise ValueError(f"rl.{key} must be one of {', '.join(valid)}{_suggest(value, valid)}")
        if self.kl_coef > 0 and self.kl_placement == "loss" and KL_GRADIENT[self.kl_estimator]["loss"] == "zero":
            raise ValueError(f"rl.kl_estimator={self.kl_estimator} in the loss has expected gradient 0 (it only adds "
                             "noise); use rl.kl_estimator=k3+ (or k2) in the loss, or rl.kl_placement=reward")
        return self


class RewardModelConfig(_AdamW, _CosineDecay):
    data: str = Field("synthetic", description="Preference pairs: 'synthetic' (built from the task and the "
                      "policy's own samples, labelled by the task's gold rule), or a JSONL / .jsonl.gz / "
                      "Parquet file or a saved HF dataset directory.")
    format: Literal["auto", "prompt_chosen_rejected", "hh"] = Field(
        "auto", description="Pair format: {prompt, chosen, rejected}, or HH-RLHF dialogues {chosen, rejected} "
        "sharing a prefix; 'auto' reads the keys of the first row.")
    split: str | None = Field(None, description="Split of a saved HF DatasetDict (default 'train').")
    limit: int | None = Field(None, ge=1, description="Use at most this many pairs from `data`.")
    eval_data: str | None = Field(None, description="Held-out pairs file; None: hold out eval_fraction of data.")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="Share of the pairs held out when eval_data is None.")
    num_pairs: int = Field(8000, ge=2, description="Synthetic data: training pairs to build.")
    steps: int = Field(600, ge=0, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Preference pairs per step.")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(30, ge=0, description="Linear warm-up, then cosine decay to lr_min_ratio * lr.")
    margin: float = Field(0.0, ge=0, description="Bradley-Terry margin m: loss = -log sigmoid(r_c - r_r - m).")
    max_length: int | None = Field(None, ge=2, description="Keep the last max_length tokens of each sequence "
                                   "(default: the model's context).")
    calibration_size: int = Field(1000, ge=1, description="Training pairs whose scores (both sides) give the "
                                  "normalisation mean and std stored with the model.")
    eval_every: int = Field(100, ge=0, description="Held-out accuracy every N steps (0: only at the end).")
    log_every: int = Field(10, ge=1, description="Write a metrics line every N steps.")


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


class DPOConfig(_AdamW, _CosineDecay):
    """`posttrain dpo`: a policy from preference pairs (DPO, IPO, SLiC-HF, SimPO). Settings left None take the
    loss's paper default (posttrain.algos.preference.PREFERENCE_SPECS)."""

    data: str = Field("synthetic", description="Preference pairs: 'synthetic' (the built-in arithmetic preference "
                      "task: the starting policy's own samples and plausible wrong answers, labelled by the task's "
                      "hidden gold rule), or a JSONL / .jsonl.gz / Parquet file or a saved HF dataset directory.")
    format: Literal["auto", "prompt_chosen_rejected", "hh"] = Field(
        "auto", description="Pair format: {prompt, chosen, rejected}, or HH-RLHF dialogues {chosen, rejected} "
        "sharing a prefix; 'auto' reads the keys of the first row.")
    split: str | None = Field(None, description="Split of a saved HF DatasetDict (default 'train').")
    limit: int | None = Field(None, ge=1, description="Use at most this many pairs from `data`.")
    eval_data: str | None = Field(None, description="Held-out pairs file; None: hold out eval_fraction of data "
                                  "(synthetic data: pairs built on the task's held-out problems).")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="Share of the pairs held out when eval_data is None.")
    num_pairs: int = Field(8000, ge=2, description="Synthetic data: training pairs to build.")
    loss: str = Field("dpo", description="Preference loss (posttrain.algos.preference): dpo, ipo, slic, simpo.")
    beta: float | None = Field(None, gt=0, description="Scale of the reward gap (DPO's KL coefficient, IPO's "
                               "tau); None: the loss's default (dpo 0.1, ipo 0.1, slic 1, simpo 2).")
    margin: float | None = Field(None, ge=0, description="DPO offset, SLiC delta, SimPO gamma (IPO ignores it); "
                                 "None: the loss's default (dpo 0, slic 1, simpo 1).")
    reference_free: bool | None = Field(None, description="Compare log pi(y|x) without subtracting log pi_ref "
                                        "(no reference pass); None: the loss's own (slic, simpo: true).")
    length_normalize: bool | None = Field(None, description="Divide each sequence's reward by its token count "
                                          "(EOS included); None: the loss's own (simpo: true).")
    sft_coef: float | None = Field(None, ge=0, description="Weight of the SFT regulariser (token-mean negative "
                                   "log-likelihood of the chosen completion) added to the loss, as SLiC-HF's "
                                   "lambda; None: the loss's default (slic 0.1, others 0).")
    max_length: int | None = Field(None, ge=2, description="Longest prompt + completion in tokens: a longer pair "
                                   "keeps the end of its prompt and the start of its completions (None: no limit).")
    steps: int = Field(300, ge=0, description="Optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Preference pairs per step (and per reference / held-out "
                            "scoring batch).")
    lr: float = Field(1e-4, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up, then cosine decay to lr_min_ratio * lr.")
    eval_every: int = Field(100, ge=0, description="Held-out gold accuracy and pair metrics every N steps (0: only "
                            "at the end).")
    log_every: int = Field(10, ge=1, description="Write a metrics line every N steps.")

    @model_validator(mode="after")
    def _loss(self) -> "DPOConfig":
        if self.loss not in NAMES["preference_loss"]:
            valid = list(NAMES["preference_loss"])
            raise ValueError(f"dpo.loss must be one of {', '.join(valid)}{_suggest(self.loss, valid)}")
        return self


class BestOfNConfig(_Sampling):
    """`posttrain bon`: sample n completions per held-out prompt, keep the one the scorer likes best."""

    n: int = Field(16, ge=1, description="Samples per prompt; best-of-k is reported for k = 1, 2, 4, ... up to n.")
    scorer: str = Field("task", description="'task': the task's verifiable reward; or a reward-model directory "
                        "written by `posttrain rm` (its normalised score).")
    num_prompts: int | None = Field(None, ge=1, description="Use the first N held-out problems (None: all "
                                    "task.num_eval).")
    batch_size: int = Field(64, ge=1, description="Prompts per generation batch (each sampled n times).")
    max_new_tokens: int = Field(6, ge=1, description="Longest completion in tokens, EOS included.")


class RFTConfig(_AdamW, _CosineDecay, _Sampling):
    """`posttrain rft`: rejection-sampling fine-tuning (generate n per prompt, keep the best, SFT on it, repeat)."""

    rounds: int = Field(2, ge=1, description="Rounds of generate -> filter -> fine-tune.")
    prompts_per_round: int = Field(2000, ge=1, description="Distinct training problems sampled each round.")
    samples: int = Field(8, ge=1, description="Completions sampled per problem.")
    scorer: str = Field("task", description="'task': the task's verifiable reward; or a reward-model directory "
                        "written by `posttrain rm`.")
    min_score: float | None = Field(0.5, description="Keep a problem's best completion only if its score is at "
                                    "least this (0.5 with the 0/1 verifier: only correct ones); None: always keep "
                                    "the best.")
    max_new_tokens: int = Field(6, ge=1, description="Longest completion in tokens, EOS included.")
    generate_batch_size: int = Field(256, ge=1, description="Prompts per generation batch.")
    steps: int = Field(200, ge=0, description="SFT optimizer steps per round, on that round's kept completions.")
    batch_size: int = Field(64, ge=1, description="Kept completions per SFT step.")
    lr: float = Field(5e-4, gt=0, description="Peak AdamW learning rate (a fresh optimizer each round).")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up, then cosine decay to lr_min_ratio * lr.")
    log_every: int = Field(10, ge=1, description="Write a metrics line every N SFT steps.")


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
        if self.model.peft is not None and self.ray.engine == "vllm":
            raise ValueError(f"model.peft={self.model.peft} is not available with ray.engine=vllm yet (the sync "
                             "sends the adapter alone, and vLLM's LoRA path is not written); set ray.engine=torch")
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


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _fields_at(loc: tuple) -> list[str]:
    """Valid field names of the section that holds the key at `loc`."""
    model: Any = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return []
        model = field.annotation
    return list(model.model_fields)


COMMAND_LINE = "command line"


def _key_paths(tree: dict, prefix: tuple = ()) -> set[tuple]:
    """Every key path a nested dict sets, sections included: {"rl": {"lr": 1}} -> {("rl",), ("rl", "lr")}."""
    paths = set()
    for key, value in tree.items():
        paths.add((*prefix, str(key)))
        if isinstance(value, dict):
            paths |= _key_paths(value, (*prefix, str(key)))
    return paths


def _origin(keys: list[tuple], cli: set[tuple], file: set[tuple], source: str | None) -> str | None:
    """Where the keys an error is about were set: the command line if any of them was set there (it wins over
    the file), else `source` (the YAML file); a key set in neither is placed by its nearest section."""
    origins = set()
    for key in keys:
        for n in range(len(key), 0, -1):
            if key[:n] in cli or key[:n] in file:
                origins.add(COMMAND_LINE if key[:n] in cli else source)
                break
    return COMMAND_LINE if COMMAND_LINE in origins else source if source in origins else None


def _describe(err: ValidationError, cli: set[tuple] = frozenset(), file: set[tuple] = frozenset(),
              source: str | None = None) -> str:
    """One line for every problem, each after where its key was set (`source: ...; command line: ...`)."""
    parts: dict[str | None, list[str]] = {}
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        keys = [tuple(str(p) for p in loc)]
        if e["type"] == "extra_forbidden":
            prefix = ".".join(str(p) for p in loc[:-1])
            valid = [f"{prefix}.{f}" if prefix else f for f in _fields_at(loc)]
            text = f"unknown config key '{key}'{_suggest(key, valid)}"
        elif e["type"] in ("value_error", "assertion_error"):
            msg = str(e["msg"]).removeprefix("Value error, ")
            text = msg if not key or msg.startswith(key) else f"{key}: {msg}"
            named = [tuple(k.split(".")) for k in re.findall(r"\b[a-z_]+(?:\.[a-z_0-9]+)+", msg)]
            keys = [k for k in named if k in cli or k in file] or keys  # a check across keys names them
        else:
            text = f"{key or 'config'}: {e['msg']} (got {e.get('input')!r})"
        parts.setdefault(_origin(keys, cli, file, source), []).append(text)
    return "; ".join(f"{where}: {'; '.join(texts)}" if where else "; ".join(texts) for where, texts in parts.items())


def parse_overrides(overrides: list[str]) -> dict:
    """`["rl.lr=1e-4", "seed=3"]` -> nested dict; values are parsed as YAML scalars."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. rl.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return tree


def merge_trees(base: dict, extra: dict) -> dict:
    """`base` with `extra` on top, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def build_config(data: dict | None = None, overrides: list[str] | None = None, source: str | None = None,
                 defaults: dict | None = None) -> RunConfig:
    """Validate `defaults` < `data` < overrides into a frozen RunConfig; raise ConfigError on any problem, its
    message attributed to `source` (the file `data` was read from) or to the command line (the overrides)."""
    try:
        tree = parse_overrides(overrides or [])
    except ConfigError as err:
        raise ConfigError(f"{COMMAND_LINE}: {err}") from None
    try:
        return RunConfig.model_validate(merge_trees(merge_trees(defaults or {}, data or {}), tree))
    except ValidationError as err:
        raise ConfigError(_describe(err, _key_paths(tree), _key_paths(data or {}), source)) from None


def read_yaml(path: str | Path | None) -> dict:
    """A YAML config file's top-level mapping ({} for None); ConfigError names the file and line."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config keys")
    return loaded or {}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (None: the embedded defaults), apply dotted overrides, validate once."""
    return build_config(read_yaml(path), overrides, source=None if path is None else str(path))


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config as YAML (loads back to an equal RunConfig)."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
