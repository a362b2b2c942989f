"""Sizes of the pi0 / pi0.5 model: Gemma, SigLIP and policy configs.

Axis legend used throughout the models package (openpi's):
  B batch, T query tokens, S key tokens, N query heads, K kv heads, G query heads per kv head,
  H head dim, D model width, F MLP hidden width, L layers (the `nn.scan` axis).

Sizes:
  full   gemma_2b (LLM) + gemma_300m (action expert) + SigLIP So400m/14, 224x224 images (openpi's).
  dummy  openpi's `dummy` Gemma for both LLM and expert; SigLIP So400m/14 as openpi keeps it.
  demo   a small model that keeps the real structure (MQA, several heads, head_dim 64, 3 layers) and runs
         `sample_actions` on 2 CPU cores in tens of milliseconds.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ModelName = Literal["pi0", "pi05"]
SizeName = Literal["full", "dummy", "demo"]
MODELS: tuple[str, ...] = ("pi0", "pi05")
SIZES: tuple[str, ...] = ("full", "dummy", "demo")
IMAGE_KEYS: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
ATTENTIONS: tuple[str, ...] = ("einsum", "xla", "cudnn", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig:
  width: int  # D
  depth: int  # L
  mlp_dim: int  # F
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H


@dataclasses.dataclass(frozen=True, kw_only=True)
class SiglipConfig:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch: int
  image_size: int

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch) ** 2


GEMMA = {
    "gemma_2b": GemmaConfig(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_300m": GemmaConfig(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256),
    "dummy": GemmaConfig(width=64, depth=4, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
    "demo_llm": GemmaConfig(width=256, depth=3, mlp_dim=1024, num_heads=4, num_kv_heads=1, head_dim=64),
    "demo_expert": GemmaConfig(width=128, depth=3, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=64),
}
SIGLIP = {
    "So400m/14": SiglipConfig(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch=14, image_size=224),
    "demo": SiglipConfig(width=64, depth=2, mlp_dim=128, num_heads=4, patch=14, image_size=56),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pi0Config:
  """A pi0 (`pi05=False`) or pi0.5 (`pi05=True`) policy.

  pi0 embeds the robot state as one continuous suffix token and mixes the flow time into the action
  tokens with an MLP; pi0.5 feeds the state through the prompt and conditions the expert's adaptive
  RMSNorms on the time embedding.
  """

  pi05: bool = False
  llm: GemmaConfig = GEMMA["gemma_2b"]
  expert: GemmaConfig = GEMMA["gemma_300m"]
  vision: SiglipConfig = SIGLIP["So400m/14"]
  action_dim: int = 32
  action_horizon: int = 50
  max_token_len: int = 48
  vocab_size: int = 257_152
  dtype: str = "bfloat16"  # compute dtype; params are float32 when fresh, as in openpi.
  # Unroll the layer scans (Gemma and SigLIP) in the traced program. The params keep their stacked
  # (L, ...) layout either way; unrolled, each layer reads a static slice of the stack instead of a
  # dynamic slice inside a while loop (see BENCHMARKS.md for what that costs or saves).
  unroll_layers: bool = False
  # How the Gemma and SigLIP attention is computed from q, k, v. "pallas" (the default) computes
  # the Gemma attention with one Pallas kernel (`models.attention_kernel`) where the program is
  # lowered for CUDA, and in openpi's einsum form elsewhere; SigLIP keeps the einsum form under it.
  # "einsum" is openpi's own arithmetic everywhere (logits, mask, softmax, weighted sum as separate
  # ops); "xla" and "cudnn" go through `jax.nn.dot_product_attention` with that implementation
  # ("cudnn": cuDNN flash attention, which needs an NVIDIA GPU and a bfloat16 or float16 dtype).
  # The kernel is openpi's arithmetic in another order, no further from float32 than the einsum
  # form (tests/test_attention_kernel.py); on an H100 it made pi0 0.8 ms (`fast`) and 2.2 ms
  # (bf16) faster at batch 1, unrolled, and about 10 ms at batch 8 (BENCHMARKS.md, "Policy latency
  # (H100)"). Calibration runs "einsum" regardless: it reads the attention logits
  # (`models.gemma.Attention`).
  attention: str = "pallas"

  def __post_init__(self):
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
    if self.attention == "cudnn" and self.dtype not in ("bfloat16", "float16"):
      raise ValueError(f"attention='cudnn' needs dtype bfloat16 or float16, got {self.dtype!r}")
    if self.llm.depth != self.expert.depth:
      raise ValueError(f"LLM and expert must have the same depth: {self.llm.depth=} {self.expert.depth=}")
    for field in ("num_heads", "num_kv_heads", "head_dim"):
      if getattr(self.llm, field) != getattr(self.expert, field):
        raise ValueError(f"LLM and expert share attention, so {field} must match")
    if self.vision.image_size % self.vision.patch:
      raise ValueError(f"image_size {self.vision.image_size} is not a multiple of patch {self.vision.patch}")

  @property
  def name(self) -> str:
    return "pi05" if self.pi05 else "pi0"

  @property
  def prefix_len(self) -> int:
    return len(IMAGE_KEYS) * self.vision.num_patches + self.max_token_len

  @property
  def suffix_len(self) -> int:
    return self.action_horizon + (0 if self.pi05 else 1)


def get_config(model: str = "pi0", size: str = "demo", **overrides) -> Pi0Config:
  """Returns the config of `model` in {'pi0', 'pi05'} at `size` in {'full', 'dummy', 'demo'}."""
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
  pi05 = model == "pi05"
  kw: dict = dict(pi05=pi05, max_token_len=200 if pi05 else 48)
  if size == "full":
    kw.update(llm=GEMMA["gemma_2b"], expert=GEMMA["gemma_300m"], vision=SIGLIP["So400m/14"])
  elif size == "dummy":
    kw.update(llm=GEMMA["dummy"], expert=GEMMA["dummy"], vision=SIGLIP["So400m/14"])
  else:
    kw.update(llm=GEMMA["demo_llm"], expert=GEMMA["demo_expert"], vision=SIGLIP["demo"],
              max_token_len=16, vocab_size=1024, dtype="float32")
  kw.update(overrides)
  return Pi0Config(**kw)
