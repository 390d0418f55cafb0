"""The trainer's machinery on a toy model under FSDP2 on 2 gloo processes: checkpoints (atomic,
keep-last, exact resume), non-finite skipping, SIGTERM, export, schedule and parameter groups.

The VGGT end-to-end runs are in test_train_e2e.py; these are fast and cover the same code paths.
"""
from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vggt_fsdp.train import checkpoint as ckpt
from vggt_fsdp.train.config import OptimConfig, ScheduleConfig, TrainConfig
from vggt_fsdp.train.faults import NonFiniteLossError, StepShape
from vggt_fsdp.train.metrics import read_metrics
from vggt_fsdp.train.optim import build_optimizer, build_scheduler, clip_groups, lr_at, param_groups


# ------------------------------------------------------------------------------------- toy pieces
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.aggregator = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 16))
        self.depth_head = nn.Linear(16, 3)


class ToySampler:
    """Deterministic batches by position; its position is what a checkpoint saves."""

    def __init__(self, rank: int, seed: int = 0):
        self.rank, self.seed, self.position = rank, seed, 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


class ToyTask:
    def __init__(self, rank: int, nan_steps: tuple[int, ...] = (), group: int = 1):
        self.sampler = ToySampler(rank)
        self.group = group
        self.nan_steps = nan_steps
        gen = torch.Generator().manual_seed(123)
        self.target = torch.randn(6, 3, generator=gen)

    def batches(self):
        while True:
            # `group` consecutive micro-batches concatenated: what accumulation over them must equal.
            x = torch.cat([self._micro(self.sampler.position + i) for i in range(self.group)])
            self.sampler.position += self.group
            yield {"x": x, "y": x @ self.target, "nan": self.sampler.position in self.nan_steps}

    def _micro(self, position: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 * position + self.sampler.rank)
        return torch.randn(8, 6, generator=gen)

    def loss(self, model, batch):
        pred = model.depth_head(model.aggregator(batch["x"]))
        # Noise from the global RNG: resume is only exact if RNG state is restored too.
        loss = (pred - batch["y"]).pow(2).mean() + 1e-3 * torch.rand(()).item()
        if batch["nan"]:
            loss = loss * float("nan")
        return loss, {"mse": loss.detach()}

    def shape(self, batch) -> StepShape:
        return StepShape(scenes=8, frames_per_scene=1, height=1, width=6, tokens=8)

    def to_device(self, batch, device):
        return batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_toy(rank: int, world: int, port: int, cfg_dict: dict, out: str, nan_steps, sigterm_at,
             fused: bool, init_from: str | None, group: int) -> None:
    from accelerate import Accelerator
    from torch.distributed.fsdp import fully_shard

    from vggt_fsdp.train.faults import StopSignal
    from vggt_fsdp.train.loop import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=cfg_dict.get("grad_accum_steps", 1))
    torch.manual_seed(0)
    model = Toy()
    for sub in model.aggregator:
        fully_shard(sub)
    fully_shard(model.depth_head)
    fully_shard(model)
    if init_from:
        from vggt_fsdp.tasks.vggt import load_initial_weights
        load_initial_weights(model, init_from)
    cfg = TrainConfig(**cfg_dict)
    optim_cfg = OptimConfig(lr=1e-2, fused=fused)
    optimizer = build_optimizer(model, optim_cfg, "cpu")
    scheduler = build_scheduler(optimizer, ScheduleConfig(warmup_steps=2), optim_cfg.lr, cfg.max_steps)
    optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    task = ToyTask(rank, tuple(nan_steps), group)
    trainer = Trainer(cfg, accelerator, model, optimizer, scheduler, task,
                      clip_groups(model, optim_cfg.clip_groups), torch.device("cpu"), fused=fused)
    torch.manual_seed(1 + rank)  # the per-rank RNG stream a checkpoint must restore
    stop = StopSignal()
    if sigterm_at is not None:
        original = task.loss

        def loss_with_signal(model, batch):
            if task.sampler.position == sigterm_at and rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return original(model, batch)
        task.loss = loss_with_signal
    trainer.resume()
    error = None
    try:
        outcome = trainer.fit(stop)
    except NonFiniteLossError as err:
        error, outcome = str(err), None
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({"params": full, "error": error,
                    "preempted": outcome.preempted if outcome else None,
                    "step": outcome.step if outcome else None}, Path(out) / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_toy(out: Path, nan_steps=(), sigterm_at=None, fused=True, init_from=None, group=1, **cfg) -> dict:
    base = dict(max_steps=6, output_dir=str(out), log_every=1, checkpoint_every=3, keep_last=2,
                progress_bar=False, max_nonfinite_in_row=3)
    base.update(cfg)
    args = (2, _free_port(), base, str(out), list(nan_steps), sigterm_at, fused, init_from, group)
    mp.start_processes(_run_toy, args=args, nprocs=2, start_method="fork")
    return torch.load(out / "result.pt", weights_only=False)


# ------------------------------------------------------------------------------------- tests
def test_resume_is_exact(tmp_path):
    straight = run_toy(tmp_path / "a", max_steps=6)
    # Same recipe, stopped (SIGTERM on one rank) after step 3, then resumed: resume=auto -> step 3.
    assert run_toy(tmp_path / "b", max_steps=6, sigterm_at=3, checkpoint_every=0)["step"] == 3
    resumed = run_toy(tmp_path / "b", max_steps=6)
    for name, value in straight["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=1e-6)
    a = [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")]
    assert len(a) == 6 and len(b) == 6
    assert b == pytest.approx(a, rel=0, abs=1e-6)
    # keep_last=2: steps 3 and 6 of run b; both complete.
    kept = [step for step, _ in ckpt.complete_checkpoints(tmp_path / "b" / "checkpoints")]
    assert kept == [3, 6]


def test_grad_accumulation_equals_the_concatenated_batch(tmp_path):
    accumulated = run_toy(tmp_path / "accum", grad_accum_steps=2, max_steps=3, checkpoint_every=0)
    concatenated = run_toy(tmp_path / "concat", group=2, max_steps=3, checkpoint_every=0)
    for name, value in concatenated["params"].items():
        torch.testing.assert_close(accumulated["params"][name], value, rtol=1e-5, atol=1e-6)
    # Adam hides a scale error in the update; the logged pre-clip gradient norm does not.
    norms = [[r["grad_norm"] for r in read_metrics(tmp_path / run / "metrics.jsonl")] for run in ("accum", "concat")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


@pytest.mark.slow  # test_train_e2e.py kills the real VGGT run in the same place
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("VGGT_FSDP_CRASH_IN_SAVE", "6")
    with pytest.raises(Exception):
        run_toy(tmp_path, max_steps=6)
    root = tmp_path / "checkpoints"
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [3]
    assert (root / ".tmp-step-0000006").is_dir()  # the half-written one, never used
    assert ckpt.resolve_resume("auto", root).name == "step-0000003"
    monkeypatch.delenv("VGGT_FSDP_CRASH_IN_SAVE")
    straight = run_toy(tmp_path / "ref", max_steps=6)
    resumed = run_toy(tmp_path, max_steps=6)
    for name, value in straight["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=1e-6)
    assert not (root / ".tmp-step-0000006").exists()


@pytest.mark.parametrize("fused", [True, False])
def test_nonfinite_steps_are_skipped_then_abort(tmp_path, fused):
    # Step 2 is non-finite: its update is skipped (counted), training goes on with finite weights.
    # fused: the skip is decided on the device (found_inf); unfused: by the host.
    result = run_toy(tmp_path / "skip", nan_steps=(2,), max_steps=4, checkpoint_every=0, fused=fused)
    assert result["error"] is None
    records = read_metrics(tmp_path / "skip" / "metrics.jsonl")
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1]
    assert all(torch.isfinite(v).all() for v in result["params"].values())
    aborted = run_toy(tmp_path / "abort", nan_steps=(2, 3, 4), max_steps=6, checkpoint_every=0, fused=fused)
    assert aborted["error"] is not None and "3 steps in a row" in aborted["error"]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    result = run_toy(tmp_path, sigterm_at=2, max_steps=6, checkpoint_every=0)
    assert result["preempted"] is True and result["step"] == 2
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path / "checkpoints")] == [2]


def test_export_consolidates_full_model(tmp_path):
    from safetensors.torch import load_file

    result = run_toy(tmp_path, max_steps=3, checkpoint_every=0)
    out = tmp_path / "model.safetensors"
    ckpt.export_safetensors(tmp_path / "checkpoints" / "step-0000003", out)
    exported = load_file(str(out))
    assert set(exported) == set(result["params"])
    for name, value in result["params"].items():
        assert torch.equal(exported[name], value)
    model = Toy()
    model.load_state_dict(exported, strict=True)


def test_initial_weights_reach_every_shard(tmp_path):
    """Rank 0 reads the file; the other rank gets its shards by broadcast. The only step is
    non-finite, so its update is skipped and the final weights are exactly the loaded ones."""
    from safetensors.torch import save_file

    torch.manual_seed(7)
    source = {k: torch.randn_like(v) for k, v in Toy().state_dict().items()}
    path = tmp_path / "init.safetensors"
    save_file(source, str(path))
    result = run_toy(tmp_path / "run", init_from=str(path), nan_steps=(1,), max_steps=1,
                     checkpoint_every=0, max_nonfinite_in_row=2)
    for name, value in source.items():
        assert torch.equal(result["params"][name], value), name


def test_schedule_warmup_then_cosine():
    cfg = ScheduleConfig(warmup_steps=10, warmup_start_lr=0.0, min_lr=1e-5)
    lrs = [lr_at(s, 1e-3, cfg, 100) for s in range(101)]
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # rising in warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then never rising
    assert lrs[100] == pytest.approx(1e-5) and lrs[55] == pytest.approx((1e-3 + 1e-5) / 2)
    assert ScheduleConfig(warmup_fraction=0.05).warmup_for(200) == 10


def test_param_groups_exclude_norms_and_biases_from_decay():
    model = Toy()
    groups = {g["name"]: g for g in param_groups(model, OptimConfig(weight_decay=0.1))}
    decay = {id(p) for p in groups["decay"]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decay}
    assert names == {"aggregator.0.weight", "aggregator.2.weight", "depth_head.weight"}
    assert groups["no_decay"]["weight_decay"] == 0.0
    model.aggregator.requires_grad_(False)
    groups = param_groups(model, OptimConfig())
    assert sum(len(g["params"]) for g in groups) == 2  # frozen parameters get no optimizer state


def test_clip_groups_match_upstream_names():
    groups = {g.name: g for g in clip_groups(Toy(), OptimConfig().clip_groups)}
    assert set(groups) == {"aggregator", "depth"}  # camera/point/track match nothing here
    assert len(groups["aggregator"].params) == 6 and groups["depth"].max_norm == 1.0


def test_resolve_resume_ignores_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((5, True), (9, False)):
        d = root / ckpt.step_dir_name(step)
        d.mkdir(parents=True)
        if complete:
            (d / ckpt.MARKER).write_text(json.dumps({"step": step}))
    assert ckpt.resolve_resume("auto", root) == root / "step-0000005"
    assert ckpt.resolve_resume("none", root) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(root / "step-0000009"), root)


def test_prune_after_a_rollback_keeps_the_checkpoint_just_written(tmp_path):
    # A run resumed from step 4 (train.resume=PATH) while steps 6 and 9 of the abandoned run exist:
    # keep_last counts checkpoints up to the saved step, so step 4 survives and later ones are left.
    root = tmp_path / "checkpoints"
    for step in (3, 4, 6, 9):
        d = root / ckpt.step_dir_name(step)
        d.mkdir(parents=True)
        (d / ckpt.MARKER).write_text(json.dumps({"step": step}))
    (root / ".tmp-step-0000005").mkdir()
    ckpt._prune(root, keep_last=1, saved_step=4)
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [4, 6, 9]
    assert not (root / ".tmp-step-0000005").exists()


def test_pose_auc_and_absrel():
    from vggt_fsdp.train.validation import abs_rel_sums, auc_from_errors, pair_errors_deg

    gen = torch.Generator().manual_seed(0)
    rot = torch.linalg.qr(torch.randn(4, 3, 3, generator=gen))[0]
    rot = rot * torch.linalg.det(rot)[:, None, None]  # proper rotations
    gt = torch.cat([rot, torch.randn(4, 3, 1, generator=gen)], -1)
    errors = pair_errors_deg(gt, gt)
    assert errors.shape == (6,) and errors.max() < 0.1  # 4 frames -> 6 pairs, all exact
    assert auc_from_errors(errors) == pytest.approx(1.0)
    scaled = gt.clone()
    scaled[:, :, 3] *= 3.0  # a global scale changes no rotation and no translation direction
    assert pair_errors_deg(scaled, gt).max() < 0.1
    # Errors of 0.5, 10.5 and 40 degrees: below t for 30, 20 and 0 of the 30 thresholds.
    assert auc_from_errors(torch.tensor([0.5, 10.5, 40.0])) == pytest.approx((30 + 20 + 0) / 90)
    gt_depth = torch.full((2, 4, 4), 2.0)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[0] = False
    total, count = abs_rel_sums(gt_depth * 1.1, gt_depth, mask)
    assert count == 16 and total / count == pytest.approx(0.1)


def test_oom_report_names_size_and_settings():
    from vggt_fsdp.recipe import Recipe
    from vggt_fsdp.train.faults import oom_report

    recipe = Recipe()
    text = oom_report(12, StepShape(scenes=2, frames_per_scene=24, height=518, width=518, tokens=33000), recipe)
    assert "step 12" in text and "48 frames" in text and "33000 tokens" in text
    for setting in ("data.frames_per_gpu", "parallel.checkpoint.policy=block", "parallel.checkpoint.heads=chunks",
                    "parallel.sharding.cpu_offload=true"):
        assert setting in text
    recipe.parallel.checkpoint.policy = "block"
    assert "parallel.checkpoint.policy" not in oom_report(1, None, recipe)  # already the saving value


def test_auto_frames_per_gpu_is_the_largest_that_fits():
    from vggt_fsdp.data.sampler import image_hw_for
    from vggt_fsdp.memory.planner import plan
    from vggt_fsdp.recipe import load_recipe, model_config
    from vggt_fsdp.tasks.vggt import fit_frames_per_gpu

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "a100_80g.yaml")
    budget = 80 * 2**30
    frames = fit_frames_per_gpu(recipe, world=8, device_bytes=budget, gpus_per_node=8)
    hw = image_hw_for(max(recipe.data.aspect_range), recipe.data.image_width, recipe.data.patch_size)

    def peak_fits(n: int) -> bool:
        return plan(model_config(recipe.model), recipe.parallel, 8, n, hw, "cuda",
                    frames_range=tuple(recipe.data.frames_range), freeze=tuple(recipe.model.freeze),
                    gpus_per_node=8).fits(budget)

    assert frames >= recipe.data.frames_range[1] and peak_fits(frames) and not peak_fits(frames + 1)
    with pytest.raises(ValueError, match="not even"):
        fit_frames_per_gpu(recipe, world=8, device_bytes=2**30, gpus_per_node=8)


def test_progress_line_and_tensorboard_error(tmp_path):
    import importlib.util
    import io

    from vggt_fsdp.train.metrics import MetricsWriter, ProgressLine

    stream = io.StringIO()  # not a terminal: one line per update
    line = ProgressLine(max_steps=20, enabled=True, stream=stream)
    for step, mem in ((10, None), (20, 1.5)):
        line.update({"step": step, "loss": 0.25, "lr": 1e-4, "frames_per_s": 12.0, "peak_allocated_gib": mem})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "step 10/20" in lines[0] and "loss 0.2500" in lines[0]
    assert "12.0 frames/s" in lines[0] and "n/a (cpu)" in lines[0] and "1.50 GiB" in lines[1]
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(RuntimeError, match="pip install tensorboard"):
            MetricsWriter(tmp_path, tensorboard=True, static={})


def test_tensorboard_tags_include_nested_metrics():
    from vggt_fsdp.train.metrics import _scalars

    record = {"step": 3, "loss": 0.5, "loss_terms": {"loss_camera": 0.1}, "grad_norm_groups": {"depth": 2.0},
              "val": {"camera_auc30": 0.7}, "device": "cpu", "peak_allocated_gib": None, "flag": True}
    assert dict(_scalars(record)) == {"step": 3, "loss": 0.5, "loss_terms/loss_camera": 0.1,
                                      "grad_norm_groups/depth": 2.0, "val/camera_auc30": 0.7}


def test_freeze_by_name_patterns():
    from vggt_fsdp.model import build_model, get_preset
    from vggt_fsdp.tasks.vggt import freeze

    model = build_model(get_preset("vggt-tiny"), device="meta")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = freeze(model, ["aggregator.patch_embed.*"])
    expected = {n for n in trainable if n.startswith("aggregator.patch_embed.")}
    assert expected and {n for n, p in model.named_parameters() if n in trainable and not p.requires_grad} == expected
    assert frozen == sum(p.numel() for n, p in model.named_parameters() if n in expected)  # newly frozen
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze(model, ["aggregator.patch_embeds.*"])
