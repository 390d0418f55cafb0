"""The trainer's recipe sections: `optim:`, `schedule:` and `train:`.

Plain typed dataclasses with defaults. recipe.py (the sharding engine) loads YAML into them, checks
types and unknown keys generically and then calls `validate()` for the cross-field checks below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

# Step counts above this are typos (`1e21`, an extra digit): a billion steps is decades of any real run.
MAX_STEPS = 10**9


def _upstream_clip_groups() -> dict[str, float]:
    # Upstream's default clips aggregator, depth head and camera head each to norm 1.0; point and
    # track are added so those heads are clipped too when a recipe enables them.
    return {"aggregator": 1.0, "depth": 1.0, "camera": 1.0, "point": 1.0, "track": 1.0}


@dataclass
class OptimConfig:
    """AdamW with decoupled weight decay and per-group gradient clipping."""

    # Upstream's fine-tuning defaults (AdamW, lr 5e-5, weight decay 0.05, torch's betas and eps).
    lr: float = 5e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Parameter-name substrings that get no weight decay; every 1-D tensor (biases, norm scales,
    # layer scales) is also excluded when `no_decay_1d` is true.
    no_decay: list[str] = field(default_factory=lambda: ["bias", "norm", "ls1", "ls2", "pos_embed",
                                                          "camera_token", "register_token",
                                                          "empty_pose_tokens"])
    no_decay_1d: bool = True
    # "auto": fused AdamW where the device supports it (CUDA), the foreach path elsewhere.
    fused: Union[Literal["auto"], bool] = "auto"
    # Per-group gradient-norm clipping as upstream: {name substring: max L2 norm}. Each group is
    # clipped on its own norm, so a spike in one head does not shrink the aggregator's update.
    # A trainable parameter matching no group is not clipped.
    clip_groups: dict[str, float] = field(default_factory=_upstream_clip_groups)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ValueError(f"optim.eps must be > 0, got {self.eps}")
        for name, max_norm in self.clip_groups.items():
            if max_norm <= 0:
                raise ValueError(f"optim.clip_groups.{name} must be > 0, got {max_norm}")


@dataclass
class ScheduleConfig:
    """Linear warmup from `warmup_start_lr` to optim.lr, then cosine decay to `min_lr` (as upstream).

    Warmup length: `warmup_steps` when > 0, otherwise `warmup_fraction * train.max_steps`.
    """

    warmup_fraction: float = 0.05
    warmup_steps: int = 0
    warmup_start_lr: float = 1e-8
    min_lr: float = 1e-8

    def validate(self) -> None:
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"schedule.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 <= self.warmup_steps <= MAX_STEPS:
            raise ValueError(f"schedule.warmup_steps must be in [0, {MAX_STEPS:,}], got {self.warmup_steps}")
        if self.warmup_start_lr < 0:
            raise ValueError(f"schedule.warmup_start_lr must be >= 0, got {self.warmup_start_lr}")
        if self.min_lr < 0:
            raise ValueError(f"schedule.min_lr must be >= 0, got {self.min_lr}")

    def warmup_for(self, max_steps: int) -> int:
        """Warmup length in optimizer steps for a run of `max_steps`."""
        if self.warmup_steps > 0:
            return min(self.warmup_steps, max_steps)
        return int(self.warmup_fraction * max_steps)


@dataclass
class TrainConfig:
    """Steps, checkpoints, logging, validation and fault handling."""

    max_steps: int = 1000
    output_dir: str = "runs/default"
    # "auto": continue from the latest complete checkpoint in output_dir/checkpoints if any;
    # "none": start fresh (existing checkpoints are left alone and newer ones are added);
    # a path: that checkpoint directory.
    resume: str = "auto"
    checkpoint_every: int = 500  # optimizer steps; 0 = only at the end
    keep_last: int = 3  # complete checkpoints kept; 0 = keep all
    log_every: int = 10
    grad_accum_steps: int = 1
    max_nonfinite_in_row: int = 5
    seed: int = 0
    val_every: int = 0  # 0 = no periodic validation
    val_batches: int = 4
    tensorboard: bool = False
    # Experiment trackers, as Accelerate names them (tensorboard, wandb, mlflow, comet_ml, aim, clearml,
    # dvclive, swanlab, trackio): every logged step's scalars go to each (train/metrics.py). Each needs
    # its package (`pip install vggt-fsdp[tracking]`); W&B runs offline with WANDB_MODE=offline.
    log_with: list[str] = field(default_factory=list)
    # Items per process and step of a task's dataset (`task:` recipes); the VGGT task batches by
    # data.frames_per_gpu instead.
    batch_size: Union[int, None] = None
    progress_bar: bool = True
    export_final: bool = True  # write output_dir/model.safetensors at the end of the run

    def validate(self) -> None:
        positive = {"max_steps": self.max_steps, "log_every": self.log_every,
                    "grad_accum_steps": self.grad_accum_steps,
                    "max_nonfinite_in_row": self.max_nonfinite_in_row, "val_batches": self.val_batches}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"train.{name} must be >= 1, got {value}")
        for name in ("checkpoint_every", "keep_last", "val_every"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"train.{name} must be >= 0 (0 disables it), got {value}")
        for name in ("max_steps", "checkpoint_every", "log_every", "val_every", "grad_accum_steps"):
            if getattr(self, name) > MAX_STEPS:
                raise ValueError(f"train.{name}={getattr(self, name):,} is above {MAX_STEPS:,} steps: "
                                 "a typo? give a step count a run can reach")
        if not self.output_dir:
            raise ValueError("train.output_dir must be a non-empty path")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if len(set(self.log_with)) != len(self.log_with):
            raise ValueError(f"train.log_with names a tracker twice: {self.log_with}")
        if not self.resume:
            raise ValueError('train.resume must be "auto", "none" or a checkpoint path, got an empty string')
