"""VGGT's prediction heads: camera (camera.py), dense DPT (dpt.py, M2) and tracking (track*.py, M2)."""
from .camera import CameraHead
from .dpt import DPTHead
from .track import TrackHead

__all__ = ["CameraHead", "DPTHead", "TrackHead"]
