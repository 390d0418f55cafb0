"""vggt-fsdp: train VGGT-class 3D vision transformers with FSDP2, BF16 and attention checkpointing."""

__version__ = "0.1.0"
