"""The sections of the training commands: `sft`, `rl` (online RL, every algorithm), `rm` (reward model),
`dpo`, `bon` (best-of-n) and `rft` (rejection-sampling fine-tuning)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.algos.names import KL_GRADIENT, NAMES
from posttrain.config.sections import _AdamW, _CosineDecay, _Sampling, _suggest
from posttrain.presets import PRESETS, expand_preset


class SFTConfig(_AdamW, _CosineDecay):
    steps: int = Field(1000, ge=0, description="Optimizer steps (the demo: 1000; at 2000, with its slower cosine decay, the tiny model sometimes stays on the plateau before it learns addition).")
    batch_size: int = Field(64, ge=1, description="Demonstrations per step.")
    lr: float = Field(2e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.3, ge=0, description="AdamW weight decay (decoupled). 0.3: with 0 or 0.1, the "
                                "demo's tiny model found digit alignment (its loss drop) late or not at all on some "
                                "seeds and machines (docs/demo.md).")
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
