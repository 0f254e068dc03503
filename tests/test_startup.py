"""Start-up: `posttrain --help` and a config error answer without importing torch (or transformers)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = """
import sys
sys.argv = ["posttrain", *{args!r}]
from posttrain import cli
try:
    code = cli.main()
except SystemExit as exit:
    code = exit.code
print("RESULT", code, "torch" in sys.modules, "transformers" in sys.modules)
"""


def probe(*args: str) -> tuple[str, str, str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE.format(args=list(args))], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=False)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1]
    return (*line.split()[1:], out.stderr)


@pytest.mark.parametrize("args", [("--help",), ("rl", "--help"),
                                  ("rl", "configs/demo.yaml", "rl.bogus=1"),
                                  ("rl", "configs/demo.yaml", "rl.advantage=grp"),
                                  ("dpo", "configs/demo.yaml", "dpo.loss=dp"),
                                  ("rl", "configs/missing.yaml")])
def test_help_and_config_errors_do_not_import_torch(args):
    code, torch_loaded, transformers_loaded, stderr = probe(*args)
    assert (torch_loaded, transformers_loaded) == ("False", "False"), stderr
    assert code in ("0", "2", "None"), (code, stderr)
    if args[-1] != "--help":
        assert code == "2" and len(stderr.strip().splitlines()) == 1, stderr


# ----------------------------------------------------------------- the demo's path to its first SFT step

# Modules the default demo must not import before its first SFT step (docs/performance.md, "Start-up"): each one
# costs 0.1-1.5 s on a 2-core machine, and none is needed there. transformers.models is transformers' model registry
# (it reads the source of every model it ships); modeling_utils its modelling code (through LlamaForCausalLM or
# the Auto classes); posttrain.rl the GRPO phase (its reward model and critic import the modelling code).
DEFERRED = ("transformers.models", "transformers.modeling_utils", "matplotlib", "peft", "datasets", "tensorboard",
            "wandb", "ray", "posttrain.rl", "posttrain.train.report")
DEMO_PATH = """
import sys
from posttrain import cli
from posttrain.config import load_config
from posttrain.models import load_policy
from posttrain.recipes import demo

cfg = load_config(None, [])  # the demo's defaults
model, tokenizer = load_policy(cfg.model, cfg.seed, lean_tiny=True)  # as the demo's start_run loads it
loaded = [m for m in sys.modules if any(m == d or m.startswith(d + ".") for d in {deferred!r})]
print("RESULT", type(model).__name__, "torch" in sys.modules, ",".join(sorted(loaded)) or "-")
"""


def test_the_demo_path_up_to_its_model_does_not_import_the_deferred_modules():
    """posttrain.cli, the demo recipe, its config and its tiny model: torch and transformers' tokenizer, nothing
    of DEFERRED (a top-level import that brings one back fails here)."""
    out = subprocess.run([sys.executable, "-c", DEMO_PATH.format(deferred=DEFERRED)], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT")]
    assert lines, out.stderr[-3000:]
    name, torch_loaded, loaded = lines[-1].split()[1:]
    assert (name, torch_loaded) == ("TinyLlamaForCausalLM", "True"), out.stderr[-3000:]
    assert loaded == "-", f"imported before the demo's first step: {loaded}"


def test_the_lean_tiny_model_is_transformers_tiny_model_bit_for_bit(tmp_path, monkeypatch):
    """build_tiny_lean against build_tiny_model: the same parameters (names, order, values) and buffers from the same
    seed, the global RNG left alone, LlamaConfig's defaults, the same log-probs through the lean forward and the HF
    forward, and a save that transformers loads back."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from posttrain.config import ModelConfig
    from posttrain.models import build_char_tokenizer, build_tiny_model, save_pretrained
    from posttrain.models.chat import encode_prompts
    from posttrain.models.lean import lean_backbone
    from posttrain.models.logprobs import causal_lm_logits, response_logprobs
    from posttrain.models.tiny import TinyLlamaForCausalLM, build_tiny_lean, transformers_model
    from posttrain.rollout import generate

    tokenizer = build_char_tokenizer()
    for cfg, seed in ((ModelConfig(), 0), (ModelConfig(hidden_size=32, num_layers=2, intermediate_size=64), 7)):
        torch.manual_seed(123)
        expected = torch.rand(3)
        torch.manual_seed(123)
        lean = build_tiny_lean(cfg, tokenizer, seed=seed)
        assert torch.equal(torch.rand(3), expected)  # the build leaves the global RNG alone
        hf = build_tiny_model(cfg, tokenizer, seed=seed)
        assert isinstance(lean, TinyLlamaForCausalLM) and lean_backbone(lean) is not None
        a, b = lean.state_dict(), hf.state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
        assert [n for n, _ in lean.named_parameters()] == [n for n, _ in hf.named_parameters()]
        assert all(torch.equal(x, dict(hf.named_buffers())[n]) for n, x in lean.named_buffers())
        reference = LlamaConfig(**lean.config.kwargs)
        for key in ("rope_parameters", "initializer_range", "attention_dropout", "mlp_bias", "attention_bias",
                    "pretraining_tp", "head_dim", "max_position_embeddings", "rms_norm_eps", "vocab_size"):
            assert getattr(lean.config, key) == getattr(reference, key), key
        positions = torch.arange(20).unsqueeze(0)
        for x, y in zip(lean.model.rotary_emb(a["model.embed_tokens.weight"], positions),
                        hf.model.rotary_emb(b["model.embed_tokens.weight"], positions), strict=True):
            assert torch.equal(x, y)

    with torch.no_grad():  # off the initial values (norms start at exactly 1)
        g = torch.Generator().manual_seed(0)
        for p in lean.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    prompt_ids, prompt_mask = encode_prompts(tokenizer, ["1+2=", "37+58="])
    response = torch.tensor([[5, 6, 2], [7, 2, 0]])
    response_mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    twin = transformers_model(lean)
    assert twin is transformers_model(lean) and not isinstance(twin, TinyLlamaForCausalLM)
    assert all(p is q for p, q in zip(lean.parameters(), twin.parameters(), strict=True))  # shared, not copied
    lean_lp, _ = response_logprobs(lean, prompt_ids, prompt_mask, response, response_mask)
    twin_lp, _ = response_logprobs(twin, prompt_ids, prompt_mask, response, response_mask)
    assert torch.equal(lean_lp, twin_lp)
    ids, mask = torch.cat([prompt_ids, response], 1), torch.cat([prompt_mask.long(), response_mask.long()], 1)
    assert torch.equal(causal_lm_logits(lean, ids, mask, 3), causal_lm_logits(twin, ids, mask, 3))  # HF forward
    for switch in ("1", "0"):  # decoding through the lean forward, then through transformers' (and its KV cache)
        monkeypatch.setenv("POSTTRAIN_LEAN", switch)
        a, b = (generate(m, prompt_ids, prompt_mask, max_new_tokens=4, eos_token_id=2, pad_token_id=0,
                         generator=torch.Generator().manual_seed(1)) for m in (lean, twin))
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.rollout_logprobs, b.rollout_logprobs)
    loaded = AutoModelForCausalLM.from_pretrained(save_pretrained(lean, tokenizer, tmp_path / "m"))
    assert all(torch.equal(x, y) for x, y in zip(loaded.state_dict().values(), lean.state_dict().values(),
                                                 strict=True))
