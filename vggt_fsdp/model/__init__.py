"""VGGT written for FSDP2 training: config, model, init and weights (upstream state-dict names)."""
from .config import VGGTConfig, get_preset
from .init import init_weights, materialize
from .layers import Attention, Block
from .vggt import VGGT, build_model
from .weights import LoadReport, WeightsMismatchError, load_weights, save_weights

__all__ = [
    "Attention", "Block", "LoadReport", "VGGT", "VGGTConfig", "WeightsMismatchError", "build_model",
    "get_preset", "init_weights", "load_weights", "materialize", "save_weights",
]
