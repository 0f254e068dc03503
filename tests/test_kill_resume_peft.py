"""kill -9 with a parameter-efficient policy: `posttrain rl` with LoRA (and a KL term, whose reference is the policy
with its adapter off), killed with SIGKILL at random points and resumed each time, ends bit for bit where the
uninterrupted run ends: final/ (merged weights and final/adapter/) and metrics.jsonl without timings.
The harness is tests/kill_resume_harness.py's (which kills `posttrain demo` in tests/test_kill_resume.py). A soft
prompt's checkpoint goes through the same trainable-state path; its crash-and-resume is tested in-process
(tests/recipes/test_peft_prompt.py), which saves this file a process start per kill."""

import sys
from pathlib import Path

import pytest

from tests.kill_resume_harness import kill_and_resume

pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # a process start per kill: tens of seconds

STEPS = 8
PEFT = {"lora": {"peft": "lora", "lora": {"r": 4, "alpha": 8}}}


def tiny_rl(peft: str) -> dict:
    return {
        "seed": 0, "threads": 1, "progress": False,
        "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 64,
                  **PEFT[peft]},
        "task": {"max_operand": 20, "num_eval": 12},
        "rl": {"steps": STEPS, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "warmup_steps": 1,
               "eval_every": 3, "lr": 5e-3, "kl_coef": 0.05},
        "eval": {"batch_size": 12, "max_new_tokens": 4},
        "checkpoint": {"every": 1, "keep": 2},
    }


def rl_command(config: Path, out: Path, resume: bool) -> list[str]:
    exe = Path(sys.executable).with_name("posttrain")
    return [str(exe), "rl", str(config), f"output_dir={out}", *(["--resume"] if resume else [])]


@pytest.mark.parametrize("peft", list(PEFT))
def test_sigkill_twice_then_resume_equals_straight_run(tmp_path, peft):
    result = kill_and_resume(tmp_path, kills=2, seed=0, log=lambda *_: None, tiny=tiny_rl(peft), argv=rl_command,
                             total=STEPS)
    assert result["kills"] == 2
    assert result["equal_weights"], result
    assert result["equal_metrics"], result
    assert (tmp_path / "killed" / "final" / "adapter" / "adapter_model.safetensors").is_file()
