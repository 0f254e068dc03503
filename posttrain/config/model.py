"""`model`: the policy's architecture (the tiny model's, or a local Hugging Face directory), precision,
device, and its parameter-efficient training (model.lora, model.prompt_tuning)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config.sections import _Section

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
