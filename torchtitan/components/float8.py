"""Float8 training through torchao (optional dependency, CUDA with float8 tensor cores only).

`model.converters = ["float8"]` swaps eligible nn.Linear layers for torchao's
Float8Linear before parallelization; `float8.recipe_name` picks tensorwise or
rowwise scaling. Preflight rejects float8 where there is no CUDA GPU.
"""
from __future__ import annotations

import logging

from torch import nn

from torchtitan.config.job_config import Float8
from torchtitan.tools.errors import ConfigError

logger = logging.getLogger("torchtitan")


def float8_eligible(module: nn.Module, fqn: str, filter_fqns: list[str]) -> bool:
    """float8 matmuls need both dims divisible by 16; filtered layers (the output by default) stay bf16."""
    if not isinstance(module, nn.Linear) or any(f in fqn for f in filter_fqns):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_float8(model: nn.Module, cfg: Float8) -> None:
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise ConfigError("model.converters float8 needs torchao: pip install -e '.[float8]'") from None
    config = Float8LinearConfig.from_recipe_name(cfg.recipe_name)
    if cfg.recipe_name == "tensorwise" and cfg.enable_fsdp_float8_all_gather:
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    elif cfg.enable_fsdp_float8_all_gather:
        raise ConfigError("float8.enable_fsdp_float8_all_gather works only with float8.recipe_name = tensorwise")
    convert_to_float8_training(model, config=config,
                               module_filter_fn=lambda m, fqn: float8_eligible(m, fqn, cfg.filter_fqns))
    logger.info(f"float8 training ({cfg.recipe_name}) on eligible linear layers; kept in bf16: {cfg.filter_fqns}")


def precompute_float8_scales(model_parts: list[nn.Module], cfg: Float8) -> None:
    """One all-reduce for every float8 weight scale after the optimizer step (tensorwise + FSDP float8 all-gather)."""
    if cfg.precompute_float8_dynamic_scale_for_fsdp and cfg.enable_fsdp_float8_all_gather:
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        for part in model_parts:
            precompute_float8_dynamic_scale_for_fsdp(part)
