"""The fastest checkpointing that fits a card: a search over per-group block policies and DPT chunking.

A candidate sets a checkpoint policy for each block group (DINO, frame, global: every label of
`planner.BLOCK_POLICIES`, selective with each save set included) and the DPT heads' chunk recompute
(`planner.HEAD_POLICIES`); the camera trunk keeps the recipe's setting. Each candidate's step time
comes from `steptime` (its recompute, counted), its memory from `planner` (the same plan as
`vggt-fsdp plan` prints).

Memory is screened before it is planned: block activations add up across groups and shift every phase
of the plan alike, so a candidate's peak is close to the all-block plan plus each group's own change
(measured by one plan per group and policy). Screening orders the work; every figure reported is a
full plan: the frontier's points, and the fastest candidate that fits, found by planning candidates
in order of predicted step time until one fits with the margin (its plan covers every scene split).

`search_context` repeats the search for each context group size N (parallel.context_parallel) that the
heads, the process count and a node's GPUs allow, keeping the frames a group holds (so the longest
scene) fixed, and ranks the sizes by frames per second per GPU, the exchange's estimated time included.
"""
from __future__ import annotations

import copy
import itertools
import shlex
from dataclasses import dataclass

from vggt_fsdp import hardware
from vggt_fsdp.memory import context_terms, planner, steptime

GROUPS = ("dino", "frame", "global")
SCREEN_SLACK = 1.10  # a candidate screened above 110% of the usable memory is not planned
FRONTIER_STEP = 0.05  # frontier points shown: each saves 5% of the frontier's memory span or more


@dataclass(frozen=True)
class Candidate:
    blocks: tuple[tuple[str, str], ...]  # (group, policy label)
    heads: str
    parallel: object  # ParallelConfig
    step: steptime.StepTime
    recompute_fraction: float

    @property
    def label(self) -> str:
        return ", ".join(f"{g} {p}" for g, p in self.blocks) + f", heads {self.heads}"

    def overrides(self) -> list[str]:
        """`key=value` overrides that give a recipe this candidate's checkpointing (shell-quoted)."""
        groups = self.parallel.checkpoint.groups
        out = [f"parallel.checkpoint.groups.{g}={_flow(groups[g])}" for g, _ in self.blocks]
        out.append(f"parallel.checkpoint.heads={self.heads}")
        return [shlex.quote(o) for o in out]

    def checkpoint_yaml(self) -> str:
        """The `parallel.checkpoint` section of a recipe with this candidate's checkpointing."""
        groups = self.parallel.checkpoint.groups
        lines = ["  checkpoint:", "    groups:"]
        lines += [f"      {name}: {_flow(group)}" for name, group in groups.items()]
        lines.append(f"    heads: {self.heads}")
        return "\n".join(lines)


@dataclass(frozen=True)
class Planned:
    candidate: Candidate
    plan: planner.MemoryPlan

    def fits(self, memory_bytes: int, margin: float) -> bool:
        return self.plan.device_bytes <= memory_bytes * (1 - margin)

    def to_dict(self, memory_bytes: int, margin: float) -> dict:
        c = self.candidate
        return {"blocks": dict(c.blocks), "heads": c.heads, "predicted_step_s": c.step.to_dict()["predicted_step_s"],
                "predicted_mfu": round(c.step.mfu, 4), "recompute_fraction": round(c.recompute_fraction, 4),
                "peak_GiB": round(self.plan.peak_bytes / planner.GiB, 3),
                "device_GiB": round(self.plan.device_bytes / planner.GiB, 3),
                "fits_with_margin": self.fits(memory_bytes, margin), "overrides": c.overrides(),
                "checkpoint_yaml": c.checkpoint_yaml()}


@dataclass(frozen=True)
class SearchResult:
    frontier: list[Planned]  # planned, Pareto-optimal in (device memory, step time), fastest first
    best: Planned | None  # the fastest candidate that fits with the margin
    candidates: int
    planned: int  # candidates planned in full
    batch: planner.Batch  # the slowest split, whose step time ranks the candidates


def group_checkpoint(label: str):
    """The `parallel.checkpoint.groups` entry for a `planner.BLOCK_POLICIES` label."""
    from vggt_fsdp.parallel.config import GroupCheckpoint

    if label.startswith("every_"):
        return GroupCheckpoint(policy="every_n", n=int(label.split("_")[1]))
    if label.startswith("selective("):
        from vggt_fsdp.parallel.config import parse_policy_label

        policy, save = parse_policy_label(label)
        return GroupCheckpoint(policy=policy, save=list(save))
    return GroupCheckpoint(policy=label)


def candidate_config(parallel_cfg, blocks: dict[str, str], heads: str):
    """`parallel_cfg` with these block group policies and DPT chunking (other groups as they were)."""
    cfg = copy.deepcopy(parallel_cfg)
    for group, label in blocks.items():
        cfg.checkpoint.groups[group] = group_checkpoint(label)
    cfg.checkpoint.heads = heads
    return cfg


def search(model_cfg, parallel_cfg, *, world_size: int, frames_per_gpu: int, image_hw: tuple[int, int],
           frames_range: tuple[int, int], memory_bytes: int, card: hardware.Card, margin: float = 0.05,
           device_kind: str = "cuda", freeze: tuple[str, ...] = (), gpus_per_node: int = 8,
           track_points: int = 0) -> SearchResult:
    """Every candidate's step time; the frontier of memory against step time; the fastest that fits.
    `track_points`: the track head's query points per scene (planner.plan)."""
    frames_range = planner.clip_range(frames_range, frames_per_gpu, parallel_cfg.context_parallel)
    time_batch = steptime.slowest_step(model_cfg, parallel_cfg, frames_per_gpu, frames_range, image_hw, card,
                                       world_size=world_size, gpus_per_node=gpus_per_node, freeze=freeze).batch
    usable = memory_bytes * (1 - margin)

    def plan(cfg, one_split: int | None = None) -> planner.MemoryPlan:
        rng = (one_split, one_split) if one_split else frames_range
        return planner.plan(model_cfg, cfg, world_size, frames_per_gpu, image_hw, device_kind, frames_range=rng,
                            freeze=freeze, gpus_per_node=gpus_per_node, track_points=track_points)

    # Recompute is a sum over units: a candidate's is the sum of its groups' parts, each taken from the
    # step in which every group runs that group's policy (one counted step per policy and head setting).
    uniform = {(label, heads): steptime.step_work(model_cfg, candidate_config(parallel_cfg, dict.fromkeys(GROUPS, label),
                                                                              heads),
                                                  time_batch, world_size=world_size, gpus_per_node=gpus_per_node,
                                                  freeze=freeze)
               for label in planner.BLOCK_POLICIES for heads in planner.HEAD_POLICIES}

    def candidate(labels: tuple[str, ...], heads: str) -> Candidate:
        blocks = dict(zip(GROUPS, labels))
        rest = uniform[(labels[0], heads)]
        parts = {name: w for name, w in rest.recompute_parts.items() if steptime.part_group(name) not in GROUPS}
        for group, label in blocks.items():
            parts.update({name: w for name, w in uniform[(label, heads)].recompute_parts.items()
                          if steptime.part_group(name) == group})
        work = rest.with_recompute(parts)
        return Candidate(tuple(blocks.items()), heads, candidate_config(parallel_cfg, blocks, heads),
                         steptime.predict(work, card), work.recompute_fraction)

    # Memory is set by the split with the most images (blocks and heads scale with them): screen there.
    split = plan(parallel_cfg).frames_per_scene
    screen: dict[tuple, int] = {}
    for heads in planner.HEAD_POLICIES:
        all_block = dict.fromkeys(GROUPS, "block")
        base = plan(candidate_config(parallel_cfg, all_block, heads), split).device_bytes
        delta = {(g, label): plan(candidate_config(parallel_cfg, {**all_block, g: label}, heads), split).device_bytes
                 - base for g in GROUPS for label in planner.BLOCK_POLICIES}
        for labels in itertools.product(planner.BLOCK_POLICIES, repeat=len(GROUPS)):
            screen[(labels, heads)] = base + sum(delta[(g, label)] for g, label in zip(GROUPS, labels))

    candidates = {key: candidate(*key) for key in screen}
    by_time = sorted(candidates, key=lambda key: candidates[key].step.total_s)

    planned: dict[tuple, Planned] = {}

    def full(key) -> Planned:
        if key not in planned:
            planned[key] = Planned(candidates[key], plan(candidates[key].parallel))
        return planned[key]

    best = None
    for key in by_time:
        if screen[key] <= usable * SCREEN_SLACK and full(key).fits(memory_bytes, margin):
            best = planned[key]
            break
    # The frontier of the screened memory, thinned to points each saving at least FRONTIER_STEP of its
    # memory span over the faster one before it (the least-memory point always kept), then planned in
    # full and filtered again.
    pareto, lowest = [], None
    for key in by_time:
        if lowest is None or screen[key] < lowest:
            pareto.append(key)
            lowest = screen[key]
    step = (screen[pareto[0]] - screen[pareto[-1]]) * FRONTIER_STEP
    frontier_keys = [pareto[0]]
    for key in pareto[1:]:
        if screen[key] <= screen[frontier_keys[-1]] - step or key == pareto[-1]:
            frontier_keys.append(key)
    points = sorted((full(k) for k in frontier_keys), key=lambda p: p.candidate.step.total_s)
    frontier, lowest = [], None
    for p in points:
        if lowest is None or p.plan.device_bytes < lowest:
            frontier.append(p)
            lowest = p.plan.device_bytes
    if best is not None and best not in frontier:
        frontier = sorted([*frontier, best], key=lambda p: p.candidate.step.total_s)
    return SearchResult(frontier, best, len(candidates), len(planned), time_batch)


@dataclass(frozen=True)
class GroupSize:
    """The checkpoint search at one context group size."""

    size: int  # N
    frames_per_gpu: int
    found: SearchResult
    exchange_s: float  # all-to-all seconds a step of the fastest fitting candidate (estimate, not overlapped)

    @property
    def frames_per_s(self) -> float | None:
        """Frames a second per GPU with the fastest fitting candidate, exchange included (None: none fits)."""
        if self.found.best is None:
            return None
        return self.found.batch.images / (self.found.best.candidate.step.total_s + self.exchange_s)

    def overrides(self) -> list[str]:
        extra = [] if self.found.best is None else self.found.best.candidate.overrides()
        return [f"parallel.context_parallel={self.size}", f"data.frames_per_gpu={self.frames_per_gpu}", *extra]


def context_sizes(num_heads: int, world_size: int, gpus_per_node: int, frames_range: tuple[int, int],
                  track_head: bool) -> list[int]:
    """The group sizes N worth planning: N divides the heads (each rank attends with H/N of them), the
    process count and a node's GPUs (the exchange stays on the node's GPU links), and the scene lengths
    hold a multiple of N. N = 1 only with the track head (context parallelism refuses it)."""
    lo, hi = frames_range
    return [n for n in range(1, num_heads + 1)
            if num_heads % n == 0 and world_size % n == 0 and gpus_per_node % n == 0 and hi // n * n >= lo
            and (n == 1 or not track_head)]


def search_context(model_cfg, parallel_cfg, *, world_size: int, frames_per_gpu: int, image_hw: tuple[int, int],
                   frames_range: tuple[int, int], memory_bytes: int, card: hardware.Card, margin: float = 0.05,
                   device_kind: str = "cuda", freeze: tuple[str, ...] = (), gpus_per_node: int = 8,
                   track_points: int = 0, known: SearchResult | None = None) -> list[GroupSize]:
    """`search` at every context group size (`context_sizes`), each GPU holding its 1/N of the frames the
    recipe's group holds (frames_per_gpu x its N). `known`: the search already made at the recipe's N."""
    group_frames = frames_per_gpu * parallel_cfg.context_parallel
    out = []
    for size in context_sizes(model_cfg.aggregator.num_heads, world_size, gpus_per_node, frames_range,
                              model_cfg.enable_track):
        cfg = copy.deepcopy(parallel_cfg)
        cfg.context_parallel = size
        per_gpu = -(-group_frames // size)
        found = known if known is not None and size == parallel_cfg.context_parallel else search(
            model_cfg, cfg, world_size=world_size, frames_per_gpu=per_gpu, image_hw=image_hw,
            frames_range=frames_range, memory_bytes=memory_bytes, card=card, margin=margin, device_kind=device_kind,
            freeze=freeze, gpus_per_node=gpus_per_node, track_points=track_points)
        exchange = 0.0 if found.best is None else context_terms.exchange_seconds(
            model_cfg, dict(found.best.candidate.blocks)["global"], found.batch, size,
            parallel_cfg.precision.param_dtype, card.name)
        out.append(GroupSize(size, per_gpu, found, exchange))
    return out


def _flow(group) -> str:
    """A GroupCheckpoint as a YAML flow mapping with only the keys it sets."""
    parts = [f"policy: {group.policy}"]
    if group.policy == "every_n" and group.n is not None:
        parts.append(f"n: {group.n}")
    save = getattr(group, "save", None)
    if group.policy == "selective" and save is not None:
        parts.append(f"save: [{', '.join(save)}]")
    return "{" + ", ".join(parts) + "}"
