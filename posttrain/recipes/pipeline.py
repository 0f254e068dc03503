"""The three-stage RLHF pipeline (InstructGPT) on the built-in task, as one command:

    posttrain demo --pipeline rlhf

    1. SFT          on the task's (imperfect) demonstrations                 -> sft/
    2. reward model Bradley-Terry on synthetic pairs labelled by a hidden
                    gold rule (the correct result beats any other answer)    -> rm/
    3. PPO          actor = SFT model, critic initialised from the reward
                    model, frozen reference = SFT model, reward = the reward
                    model's normalised score - beta * KL per token, + ptx    -> final/
    4. ablation     the same PPO with beta = 0 and lambda_ptx = 0, from the
                    same SFT model and reward model                          -> ablation/

The gold score is the task's verifiable reward, which PPO never sees: it measures whether optimising the
learned reward model helped (the SFT -> PPO change in held-out greedy accuracy, with a 95% confidence
interval over the held-out problems) or was gamed (reward-model score up, gold score down).
"""

from __future__ import annotations

from posttrain.models.adapters import refuse_peft as _no_peft
from posttrain.train.run import start_run

import copy
import json
import math
import time
from pathlib import Path

import torch

from posttrain.config import RunConfig, build_config
from posttrain.models import load_policy, save_pretrained
from posttrain.models.chat import encode_prompts
from posttrain.models.logprobs import response_logprobs
from posttrain.models.reward import RewardModel
from posttrain.models.value import scalar_model_from_pretrained
from posttrain.recipes.reward_model import load_pairs, setup_rm, train_rm
from posttrain.rl.loop import train_rl
from posttrain.rl.roles import InlineRoles
from posttrain.recipes.sft import setup_sft, train_sft
from posttrain.rollout import generate
from posttrain.train.checkpoint import load_weights_into, weights_sha256
from posttrain.train.control import (
    Resumed,
    RunControl,
    finish_run,
    metrics_logger,
    open_run,
)
from posttrain.train.evaluate import greedy_completions
from posttrain.train.metrics import read_metrics
from posttrain.train.report import plot_report
from posttrain.train.report_rlhf import plot_rlhf
from posttrain.train.run import (
    dropped_prompts,
    progress_bar,
    seed_everything,
    write_json,
    write_model_card,
)

# The pipeline's defaults on top of RunConfig's (configs/rlhf_demo.yaml holds the same values).
RLHF_DEFAULTS: dict = {
    "output_dir": "runs/rlhf",
    "task": {"demo_error": "trailing_period", "demo_error_rate": 0.5},
    "rl": {"steps": 150, "prompts_per_step": 64, "group_size": 1, "advantage": "gae", "gamma": 1.0, "lam": 0.95,
           "whiten_advantages": True, "reward": "reward_model", "critic_init": "reward_model",
           "kl_placement": "reward", "kl_estimator": "k1", "kl_coef": 0.05, "ptx_coef": 0.1, "ptx_data": "task",
           "ptx_batch_size": 32, "missing_eos_penalty": 1.0, "mini_batches": 2, "ppo_epochs": 2, "lr": 2e-4,
           "critic_lr": 5e-4, "eval_every": 25},
}
ABLATION = ["rl.kl_coef=0", "rl.ptx_coef=0"]


def rlhf_config(data: dict | None, overrides: list[str], source: str | None = None) -> tuple[RunConfig, RunConfig]:
    """(main, ablation) configs: RLHF_DEFAULTS < `data` (a YAML file's contents, read from `source`) <
    overrides, with the reward model read from <output_dir>/rm unless set; the ablation differs only in beta
    and lambda_ptx."""
    from posttrain.config import COMMAND_LINE, merge_trees, parse_overrides
    from posttrain.errors import ConfigError

    try:
        merged = merge_trees(merge_trees(RLHF_DEFAULTS, data or {}), parse_overrides(overrides))
    except ConfigError as err:
        raise ConfigError(f"{COMMAND_LINE}: {err}") from None
    if not merged.get("rl", {}).get("reward_model_path"):
        out = merged.get("output_dir", RLHF_DEFAULTS["output_dir"])
        overrides = [*overrides, f"rl.reward_model_path={json.dumps(str(Path(out) / 'rm'))}"]  # a path, not YAML
    cfg = build_config(data, overrides, source=source, defaults=RLHF_DEFAULTS)
    return cfg, build_config(cfg.model_dump(mode="json"), ABLATION)


def confidence_interval(before: list[float], after: list[float]) -> tuple[float, float, float]:
    """Mean paired difference after - before and its normal-approximation 95% interval."""
    d = [a - b for a, b in zip(after, before, strict=True)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@torch.no_grad()
def held_out(cfg: RunConfig, policy, tokenizer, task, rm: RewardModel, reference) -> dict:
    """On the held-out problems: per-problem gold score and mean normalised reward-model score of the greedy
    completions, and KL(pi || pi_ref) of sampled ones (k1 summed per response, mean; 0 for the reference)."""
    problems = task.eval_problems
    prompts = [p.prompt for p in problems]
    completions, finished = greedy_completions(policy, tokenizer, prompts, cfg.eval.batch_size,
                                               cfg.eval.max_new_tokens)
    gold = [float(r) for r in task.reward(prompts, completions, problems)]
    rm_score = rm.score(prompts, completions, finished).mean().item()
    was_training = policy.training
    policy.eval()
    ids, mask = encode_prompts(tokenizer, prompts)
    sample = generate(policy, ids, mask, max_new_tokens=cfg.rl.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, temperature=cfg.rl.temperature,
                      generator=torch.Generator().manual_seed(cfg.seed))
    ref_logprobs, _ = response_logprobs(reference, ids, mask, sample.response_ids, sample.response_mask,
                                        temperature=cfg.rl.temperature)
    policy.train(was_training)
    kl = ((sample.rollout_logprobs - ref_logprobs) * sample.response_mask).sum(-1).mean().item()
    examples = [p + c for p, c in zip(prompts[:6], completions[:6], strict=True)]
    return {"gold": gold, "accuracy": sum(gold) / len(gold), "rm_score": rm_score, "kl": kl, "examples": examples}


STAGES = ("sft", "rm", "rl", "ablation")  # checkpoint phases in run order; a resume skips the finished stages


def _ppo(cfg: RunConfig, policy, tokenizer, task, out: Path, label: str, ctl: RunControl,
         resumed: Resumed | None, names: dict | None = None) -> list[dict]:
    """Train with PPO, logging to out/metrics.jsonl (cut back to the checkpoint when `resumed` is inside this
    stage); return the RL records."""
    out.mkdir(parents=True, exist_ok=True)
    with metrics_logger(out, resumed, cfg) as logger:
        ctl.stage(logger, names)
        roles = InlineRoles.local(cfg, policy, tokenizer, task)
        with progress_bar(cfg.rl.steps, label, cfg.progress) as bar:
            train_rl(cfg, roles, task, logger, bar, ctl)
    return [r for r in read_metrics(out / "metrics.jsonl") if r.get("phase") == "rl"]


def _tail_mean(records: list[dict], key: str, n: int = 10) -> float:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))][-n:]
    return sum(values) / len(values) if values else float("nan")


def run_rlhf(cfg: RunConfig, ablation_cfg: RunConfig | None, resume: bool = False, overwrite: bool = False) -> dict:
    """SFT -> reward model -> PPO (-> the beta = 0, lambda_ptx = 0 ablation); returns the summary.

    Checkpoints (phases sft, rm, rl, ablation) go to <output_dir>/checkpoints; `resume` continues from the
    newest valid one, loading the models of the stages finished before it (sft/, the reward model, final/)
    after checking that their content hashes are the ones the checkpoint recorded.
    """
    _no_peft(cfg.model, "demo rlhf", "its phases reload full weights from each other's outputs")
    start = time.perf_counter()
    _, resumed = open_run(cfg, resume, overwrite)
    out, task, policy, tokenizer = start_run(cfg, min_train=cfg.rl.prompts_per_step)
    print(f"posttrain RLHF pipeline: SFT -> reward model -> PPO on {task.name}, output {out}")
    at = STAGES.index(resumed.phase) if resumed is not None else -1  # the stage the run resumes in
    rm_path = Path(cfg.rl.reward_model_path)
    with RunControl.for_run(cfg, out, None, resumed) as ctl:
        times = ctl.extra["times"] = dict(resumed.state.get("times", {})) if resumed is not None else {}
        if at <= 1:
            with metrics_logger(out, resumed, cfg) as logger:
                ctl.stage(logger)
                if at <= 0:
                    sft_state = setup_sft(cfg, policy, tokenizer, task)
                    with progress_bar(cfg.sft.steps, "SFT ", cfg.progress) as bar:
                        train_sft(cfg, sft_state, logger, bar, ctl)
                    del sft_state
                    save_pretrained(policy, tokenizer, out / "sft")
                    times["sft_seconds"] = time.perf_counter() - start
                else:
                    load_weights_into(policy, out / "sft")
                ctl.check_frozen("sft_sha256", weights_sha256(out / "sft"), f"the SFT model {out / 'sft'}")
                t0 = time.perf_counter()
                train_pairs, eval_pairs = load_pairs(cfg, task, policy, tokenizer)
                rm = RewardModel(scalar_model_from_pretrained(out / "sft", tokenizer.pad_token_id), tokenizer,
                                 cfg.rm.max_length)
                rm_state = setup_rm(cfg, rm, train_pairs, eval_pairs)
                with progress_bar(cfg.rm.steps, "RM  ", cfg.progress) as bar:
                    rm_result = train_rm(cfg, rm_state, logger, bar, ctl)
                del rm_state
                rm.save(rm_path)
                times["rm_seconds"] = time.perf_counter() - t0
                n_pairs = [len(train_pairs), len(eval_pairs)]
        else:  # SFT and the reward model finished before the checkpoint
            load_weights_into(policy, out / "sft")
            ctl.check_frozen("sft_sha256", weights_sha256(out / "sft"), f"the SFT model {out / 'sft'}")
            rm_result, n_pairs = dict(resumed.state["rm_result"]), list(resumed.state["rm_pairs"])
        ctl.check_frozen("rm_sha256", weights_sha256(rm_path), f"the reward model {rm_path}")
        ctl.extra.update(rm_result=rm_result, rm_pairs=n_pairs)
        rm = RewardModel.load(rm_path)  # as PPO reads it
        rm.model.eval().requires_grad_(False)
        reference = copy.deepcopy(policy).eval().requires_grad_(False)
        sft_eval = held_out(cfg, policy, tokenizer, task, rm, reference)

        t0 = time.perf_counter()
        if at <= 2:
            records = _ppo(cfg, policy, tokenizer, task, out / "ppo", "PPO ", ctl, resumed if at == 2 else None)
            save_pretrained(policy, tokenizer, out / "final")
            times["ppo_seconds"] = time.perf_counter() - t0
        else:  # PPO finished before the checkpoint
            load_weights_into(policy, out / "final")
            records = [r for r in read_metrics(out / "ppo" / "metrics.jsonl") if r.get("phase") == "rl"]
        ctl.check_frozen("ppo_sha256", weights_sha256(out / "final"), f"the PPO model {out / 'final'}")
        ppo_eval = held_out(cfg, policy, tokenizer, task, rm, reference)
        mean, lo, hi = confidence_interval(sft_eval["gold"], ppo_eval["gold"])
        summary = {"sft_accuracy": sft_eval["accuracy"], "ppo_accuracy": ppo_eval["accuracy"],
                   "improvement": mean, "improvement_ci95": [lo, hi], "eval_problems": len(task.eval_problems),
                   "rm_eval_accuracy": rm_result["eval_accuracy"], "rm_eval_margin": rm_result["eval_margin"],
                   "rm_train_pairs": n_pairs[0], "rm_eval_pairs": n_pairs[1],
                   "sft_rm_score": sft_eval["rm_score"], "sft_kl": sft_eval["kl"], "sft_examples": sft_eval["examples"],
                   "ppo_rm_score": ppo_eval["rm_score"], "ppo_kl": ppo_eval["kl"], "ppo_examples": ppo_eval["examples"],
                   "ppo_kl_train": _tail_mean(records, "kl"), "ppo_kl_coef": cfg.rl.kl_coef,
                   "ppo_ptx_coef": cfg.rl.ptx_coef, **dropped_prompts(task), "seed": cfg.seed}
        pipeline_seconds = time.perf_counter() - start
        if ablation_cfg is not None:
            t0 = time.perf_counter()
            policy, _ = load_policy(ablation_cfg.model.model_copy(update={"path": str(out / "sft")}), seed=cfg.seed)
            seed_everything(cfg.seed, cfg.threads)
            _ppo(ablation_cfg, policy, tokenizer, task, out / "ablation", "PPO beta=0 ptx=0", ctl,
                 resumed if at == 3 else None, names={"rl": "ablation"})
            save_pretrained(policy, tokenizer, out / "ablation" / "final")
            ab_eval = held_out(cfg, policy, tokenizer, task, rm, reference)
            times["ablation_seconds"] = time.perf_counter() - t0
            ab_mean, ab_lo, ab_hi = confidence_interval(sft_eval["gold"], ab_eval["gold"])
            summary["ablation"] = {"accuracy": ab_eval["accuracy"], "improvement": ab_mean,
                                   "improvement_ci95": [ab_lo, ab_hi], "rm_score": ab_eval["rm_score"],
                                   "kl": ab_eval["kl"], "examples": ab_eval["examples"]}
    plot_report(out / "metrics.jsonl", out / "report.png", title=f"RLHF pipeline: SFT and reward model (seed {cfg.seed})")
    plot_rlhf(out, summary, out / "rlhf.png")
    summary.update({k: round(v, 1) for k, v in times.items()})
    summary["pipeline_seconds"] = round(pipeline_seconds, 1)
    summary["wall_seconds"] = round(time.perf_counter() - start, 1)
    write_model_card(cfg, out, "rlhf", {k: v for k, v in summary.items() if k != "ablation"}, task)
    if ablation_cfg is not None:
        write_model_card(ablation_cfg, out, "rlhf", summary["ablation"], task, model_dir="ablation/final")
    write_json(out / "summary.json", summary)
    finish_run(out)
    print(rlhf_table(summary))
    return summary


def rlhf_table(s: dict) -> str:
    """The summary as a few aligned lines."""
    lo, hi = s["improvement_ci95"]
    lines = [f"reward model: held-out pair accuracy {s['rm_eval_accuracy']:.3f}, mean margin {s['rm_eval_margin']:.2f} "
             f"({s['rm_eval_pairs']} pairs)",
             f"{'policy':<22}{'gold accuracy':>14}{'RM score':>10}{'KL':>8}",
             f"{'SFT':<22}{s['sft_accuracy']:>14.3f}{s['sft_rm_score']:>10.2f}{s['sft_kl']:>8.2f}",
             f"{'PPO (beta, ptx)':<22}{s['ppo_accuracy']:>14.3f}{s['ppo_rm_score']:>10.2f}{s['ppo_kl']:>8.2f}"]
    if "ablation" in s:
        a = s["ablation"]
        lines.append(f"{'PPO beta=0, ptx=0':<22}{a['accuracy']:>14.3f}{a['rm_score']:>10.2f}{a['kl']:>8.2f}")
    lines.append("held-out greedy examples: SFT " + " ".join(s["sft_examples"][:3]) + " | PPO "
                 + " ".join(s["ppo_examples"][:3])
                 + (" | PPO beta=0, ptx=0 " + " ".join(s["ablation"]["examples"][:3]) if "ablation" in s else ""))
    lines.append(f"gold accuracy SFT -> PPO: {s['improvement']:+.3f} (95% CI {lo:+.3f} .. {hi:+.3f}, "
                 f"{s['eval_problems']} held-out problems)")
    return "\n".join(lines)
