"""duquant-jax: DuQuant W4A8 quantization of openpi pi0 / pi0.5 policies in JAX.

The public surface; internals live in modules named for one idea each (see README, "Layout").
"""

from duquant_jax.version import __version__

from duquant_jax.attention_balance import (AttentionMoments, attention_moments, balance_attention,
                                           scale_outputs)
# `calibrate` (the function) is not re-exported: it would shadow the module `duquant_jax.calibrate`.
from duquant_jax.calibrate import CalibConfig, CalibStats, hessian_for, select_for
from duquant_jax.calib_data import calibration_batches, load_npz_batches, load_recordings
from duquant_jax.capture import calibrate_apply
from duquant_jax.checkpoint import load_packed, save_packed
from duquant_jax.lora import LoraSpec, merge_lora
from duquant_jax.openpi_checkpoint import (convert_checkpoint, infer_model, load_openpi_params,
                                          save_openpi_params)
from duquant_jax.config import (PRESETS, AttentionBalance, EmbeddingRule, LayerRule, QuantConfig, generic_config,
                                get_preset, match_rules, transforms_only)
from duquant_jax.embedding import PackedEmbedding, quantize_embedding
from duquant_jax.gptq import gptq_codes
from duquant_jax.layouts import LinearLayout, linear_layouts
from duquant_jax.openpi_runtime import load_into_openpi, openpi_interceptor, run_packed_in_openpi
from duquant_jax.model_rotation import rotate_residual, rotate_stats
from duquant_jax.nnx_models import calibrate_nnx, nnx_params, quantized_nnx_apply
from duquant_jax.models.observation import as_observation
from duquant_jax.openpi_io import OpenpiModel, load_norm_stats
from duquant_jax.packed import PackedLinear
from duquant_jax.quantize import quantize_params, rotated_model, summarize
from duquant_jax.runtime import (Execution, PackedRuntime, apply_packed, packed_interceptor,
                                 quantized_apply)
from duquant_jax.transforms import InputTransform, build_duquant_transform

__all__ = [
    "__version__",
    "AttentionBalance", "AttentionMoments", "attention_moments", "balance_attention",
    "scale_outputs",
    "CalibConfig", "CalibStats", "calibrate_apply", "calibration_batches", "hessian_for",
    "load_npz_batches", "load_recordings", "select_for",
    "load_openpi_params", "load_packed", "save_openpi_params", "save_packed",
    "LoraSpec", "merge_lora", "convert_checkpoint", "infer_model",
    "PRESETS", "EmbeddingRule", "LayerRule", "QuantConfig", "generic_config", "get_preset",
    "match_rules", "transforms_only",
    "PackedEmbedding", "quantize_embedding", "gptq_codes",
    "Execution", "PackedRuntime", "packed_interceptor", "quantized_apply",
    "calibrate_nnx", "nnx_params", "quantized_nnx_apply",
    "load_into_openpi", "openpi_interceptor", "run_packed_in_openpi",
    "LinearLayout", "linear_layouts", "PackedLinear", "apply_packed", "rotate_residual",
    "rotate_stats",
    "quantize_params", "rotated_model", "summarize", "InputTransform", "build_duquant_transform",
    "as_observation", "OpenpiModel", "load_norm_stats",
]
