"""final/README.md: a Hugging Face model card for the model a run wrote.

    card = model_card(cfg, "rl", summary, command="posttrain rl configs/grpo.yaml", sizes={"training problems": 800})

A pure function of the run's config, its summary (summary.json's contents), the command that made it and the
sizes of its data: YAML front matter (library_name, base_model, tags, datasets, pipeline_tag) and the sections
method, data, held-out results, the full config (collapsed) and the command. train/run.py `write_model_card`
writes it into every final/ a command leaves.
"""

from __future__ import annotations

import yaml

# method -> (title, what it did, the config sections whose hyperparameters the card lists, pipeline_tag)
METHODS = {
    "sft": ("Supervised fine-tuning", "completion-only next-token loss on the task's demonstrations", ("sft",),
            "text-generation"),
    "rl": ("Online RL", "sampling, a verifiable or learned reward, and a policy-gradient update", ("rl",),
           "text-generation"),
    "dpo": ("Preference optimisation", "a policy trained directly on preference pairs", ("dpo",), "text-generation"),
    "rm": ("Reward model", "a Bradley-Terry scalar-head model trained on preference pairs", ("rm",),
           "text-classification"),
    "rft": ("Rejection-sampling fine-tuning", "sample n completions, keep the best, fine-tune on them, repeat",
            ("rft",), "text-generation"),
    "demo": ("SFT then GRPO", "posttrain's demo: SFT on imperfect demonstrations, then GRPO with the verifier",
             ("sft", "rl"), "text-generation"),
    "real": ("GRPO on a real model", "posttrain's real-model demo: GRPO with verifiable instruction-following "
             "rewards", ("rl",), "text-generation"),
    "rlhf": ("RLHF pipeline", "SFT, a reward model, then PPO against the reward model (InstructGPT)",
             ("sft", "rm", "rl"), "text-generation"),
    "tools": ("SFT then GRPO with tools", "posttrain's tools demo: SFT on demonstrations that call a calculator "
              "some of the time, then GRPO in the tools environment", ("sft", "rl"), "text-generation"),
}

# the hyperparameters worth reading first, per section (every one is in the full config)
KEY_SETTINGS = {
    "sft": ("steps", "batch_size", "lr", "warmup_steps", "weight_decay"),
    "rl": ("preset", "advantage", "policy_loss", "loss_agg", "kl_coef", "kl_estimator", "kl_placement", "reward",
           "reward_funcs", "steps", "prompts_per_step", "group_size", "lr", "temperature", "max_new_tokens",
           "ppo_epochs", "mini_batches"),
    "dpo": ("loss", "beta", "margin", "data", "steps", "batch_size", "lr"),
    "rm": ("data", "margin", "steps", "batch_size", "lr"),
    "rft": ("rounds", "prompts_per_round", "samples", "scorer", "min_score", "steps", "batch_size", "lr"),
}

# what the held-out numbers mean (posttrain's docs/metrics.md defines every one)
NOTES = {"policy": "Accuracy: the mean task reward of the greedy completions of the held-out problems.",
         "rm": "Accuracy: the share of held-out preference pairs the model scores chosen above rejected; margin: "
               "the mean score difference."}

# the command line that repeats a run from the config.yaml written beside final/
REPEAT = {"demo": "posttrain demo --config", "real": "posttrain demo --pipeline real --config",
          "rlhf": "posttrain demo --pipeline rlhf --config", "tools": "posttrain demo --pipeline tools --config"}


def front_matter(cfg, method: str) -> dict:
    """The card's metadata block (the Hub reads it): library, base model, tags, datasets, pipeline."""
    meta = {"library_name": "transformers"}
    if cfg.model.path:
        meta["base_model"] = cfg.model.path
    meta["tags"] = ["posttrain", method, *([cfg.rl.preset] if method == "rl" and cfg.rl.preset else [])]
    if cfg.task.hf_dataset:
        meta["datasets"] = [cfg.task.hf_dataset]
    meta["pipeline_tag"] = METHODS[method][3]
    return meta


def _settings(cfg, sections) -> list[str]:
    rows = []
    for section in sections:
        values = getattr(cfg, section)
        for key in KEY_SETTINGS[section]:
            value = getattr(values, key)
            if value is not None and value != ():
                rows.append(f"| `{section}.{key}` | {_show(value)} |")
    return rows


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(_show, value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def _data(cfg, method: str, summary: dict, sizes: dict) -> list[str]:
    t = cfg.task
    lines = [f"- task: `{t.name}`"]
    for key in ("path", "eval_path", "hf_dataset", "hf_config", "hf_split", "hf_eval_split"):
        if getattr(t, key):
            lines.append(f"- task.{key}: `{getattr(t, key)}`")
    if method in ("dpo", "rm"):
        lines.append(f"- preference pairs ({method}.data): `{getattr(cfg, method).data}`")
    counts = {**sizes, **{k.replace("_", " "): summary[k] for k in ("train_pairs", "eval_pairs") if k in summary}}
    lines += [f"- {name}: {n}" for name, n in counts.items()]
    return lines


def results(summary: dict) -> list[str]:
    """The summary's numbers as table rows (nested dicts one level down as `a.b`; timings and examples left out)."""
    rows = []
    for key, value in summary.items():
        if key.endswith("seconds") or key == "seed":
            continue
        if isinstance(value, dict):
            rows += [f"| {key}.{k} | {_show(v)} |" for k, v in value.items() if _number_like(v)]
        elif _number_like(value):
            rows.append(f"| {key} | {_show(value)} |")
    return rows


def _number_like(value) -> bool:
    if isinstance(value, (list, tuple)):
        return 0 < len(value) <= 8 and all(_number_like(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _table(header: str, rows: list[str]) -> str:
    return "\n".join([f"| {header} | value |", "|---|---|", *rows])


def model_card(cfg, method: str, summary: dict, command: str | None = None, sizes: dict | None = None) -> str:
    """The model card of a run (markdown with YAML front matter). `method`: a key of METHODS; `command`: the command
    line that started the run (None: not recorded); `sizes`: {"training problems": n, ...} as known."""
    title, what, sections, _ = METHODS[method]
    meta = yaml.safe_dump(front_matter(cfg, method), sort_keys=False).strip()
    config = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).strip()
    start = f"`{cfg.model.path}`" if cfg.model.path else "a randomly initialised tiny model"
    rows = results(summary)
    made_by = (f"```\n{command}\n```" if command else
               "Not recorded (the recipe was called directly, not through posttrain's command line or Python API).")
    blocks = [
        f"---\n{meta}\n---",
        f"# {title} with posttrain",
        f"Trained from {start} with posttrain, seed {cfg.seed}.",
        "## Method", f"{title}: {what}.", _table("setting", _settings(cfg, sections)),
        "## Data", "\n".join(_data(cfg, method, summary, sizes or {})),
        "## Held-out results", _table("metric", rows) if rows else "No held-out numbers in the summary.",
        NOTES.get(method, NOTES["policy"]),
        "## Config",
        f"<details>\n<summary>The resolved config (config.yaml in the run directory)</summary>\n\n```yaml\n{config}"
        "\n```\n\n</details>",
        "## Command", made_by,
        f"The same run again from its config and seed: `{REPEAT.get(method, f'posttrain {method}')} config.yaml`.",
    ]
    return "\n\n".join(blocks) + "\n"
