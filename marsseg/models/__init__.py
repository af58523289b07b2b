"""Segmentation networks: the registry, the configurable U-Net and its blocks."""

from .registry import (
    MODELS,
    PRESETS,
    build_model,
    count_parameters,
    load_config,
    load_pretrained,
    save_pretrained,
    to_model_input,
)
from .unet import UNet, UNetConfig

__all__ = ["MODELS", "PRESETS", "UNet", "UNetConfig", "build_model", "count_parameters",
           "load_config", "load_pretrained", "save_pretrained", "to_model_input"]
