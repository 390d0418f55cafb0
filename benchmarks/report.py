"""The Markdown report and PNG charts of a recipe comparison (`benchmarks.compare_recipes`).

Every figure in the report comes from the comparison's JSON; the targets are judged from measured
numbers only, and only when the measurement is the one the target names (device, model, image size,
world size): anything else is "not measured". CPU results are labelled as such throughout. The
communication section is a model and says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks import comm_model

GIB = 2**30
TARGET_IMAGE = (518, 518)
TARGET_WORLD = 8
TARGET_PRESET = "vggt-1b"


# --------------------------------------------------------------------------------------- reading results
def ok(result: dict) -> bool:
    return result.get("status") == "ok"


def role(result: dict) -> str:
    return result.get("config", {}).get("role", "")


def peak_bytes(result: dict) -> int | None:
    """The memory figure a result is judged by: peak allocated device memory (CUDA only)."""
    memory = result.get("memory") or {}
    return memory.get("peak_allocated_bytes") if memory.get("kind") == "cuda" else None


def is_target_shape(result: dict) -> bool:
    """Measured where the targets are set: a GPU, VGGT-1B, 518x518, world size 8."""
    spec = result.get("spec") or {}
    return (
        ok(result)
        and result.get("device", {}).get("type") == "cuda"
        and (result.get("model") or {}).get("preset") == TARGET_PRESET
        and (spec.get("height"), spec.get("width")) == TARGET_IMAGE
        and spec.get("world_size") == TARGET_WORLD
    )


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def device_line(results: list[dict]) -> tuple[str, bool]:
    """(a description of the device the results were measured on, whether it was a CPU)."""
    dev = next((r["device"] for r in results if "device" in r), None)
    if dev is None:
        return "unknown (no configuration produced a result)", False
    if dev["type"] == "cpu":
        return f"{dev['name']}, {dev['torch_threads']} torch threads, torch {dev['torch']}", True
    return (f"{dev['name']} ({gib(dev.get('total_memory_bytes'))} GiB), torch {dev['torch']}, "
            f"CUDA {dev.get('cuda')}", False)


# --------------------------------------------------------------------------------------- targets
@dataclass
class Verdict:
    target: str
    status: str  # met | not met | not measured
    evidence: str


def _best_fitting(results: list[dict], roles: tuple[str, ...], limit_gib: float) -> dict | None:
    """The largest frames per GPU of these roles measured at the target shape under `limit_gib`."""
    fitting = [r for r in results if role(r) in roles and is_target_shape(r)
               and peak_bytes(r) is not None and peak_bytes(r) < limit_gib * GIB]
    return max(fitting, key=lambda r: r["spec"]["frames_per_gpu"], default=None)


def _fits_target(results: list[dict], name: str, role_name: str, frames: int, limit: float) -> Verdict:
    target = f"{name}: >= {frames} frames/GPU with peak < {limit:g} GiB"
    measured = [r for r in results if role(r) == role_name and is_target_shape(r)]
    if not measured:
        return Verdict(target, "not measured", "no successful GPU run at VGGT-1B, 518 px, world size 8")
    best = _best_fitting(results, (role_name,), limit)
    if best is None:
        worst = min(measured, key=lambda r: peak_bytes(r) or 0)
        return Verdict(target, "not met", f"smallest peak measured {gib(peak_bytes(worst))} GiB at "
                                          f"{worst['spec']['frames_per_gpu']} frames")
    frames_fit = best["spec"]["frames_per_gpu"]
    return Verdict(target, "met" if frames_fit >= frames else "not met",
                   f"{frames_fit} frames/GPU at peak {gib(peak_bytes(best))} GiB")


def _recipe_result(results: list[dict], role_name: str, mix: bool = False) -> dict | None:
    """The role's run at the target shape: its worst case (scenes of up to 24 frames) or its mix."""
    return next((r for r in results if role(r) == role_name and is_target_shape(r)
                 and bool(r.get("config", {}).get("mix")) == mix), None)


def judge_targets(results: list[dict]) -> list[Verdict]:
    verdicts = [
        _fits_target(results, "40GB recipe", "recipe_40g", 24, 38),
        _fits_target(results, "80GB recipe", "recipe_80g", 48, 76),
    ]
    r80, r40 = _recipe_result(results, "recipe_80g"), _recipe_result(results, "recipe_40g")
    target = "80GB recipe: MFU >= 45% on an H100"
    if r80 is None or r80["throughput"]["mfu"] is None:
        verdicts.append(Verdict(target, "not measured",
                                "no GPU run of the 80GB recipe with an MFU (FLOP count and the card's peak known)"))
    else:
        value = r80["throughput"]["mfu"]
        name = r80["device"]["name"]
        if "H100" in name:
            verdicts.append(Verdict(target, "met" if value >= 0.45 else "not met", f"MFU {value:.1%} on {name}"))
        else:
            verdicts.append(Verdict(target, "not measured",
                                    f"no H100 run; on {name}: MFU {value:.1%} (met there: "
                                    f"{'yes' if value >= 0.45 else 'no'})"))
    target = "40GB recipe: >= 0.8 of the 80GB recipe's frames/s per GPU"
    if r80 is None or r40 is None:
        verdicts.append(Verdict(target, "not measured", "needs both recipes measured at the target shape"))
    else:
        ratio = r40["throughput"]["frames_per_s"] / r80["throughput"]["frames_per_s"]
        verdicts.append(Verdict(target, "met" if ratio >= 0.8 else "not met",
                                f"{r40['throughput']['frames_per_s']:.2f} / "
                                f"{r80['throughput']['frames_per_s']:.2f} frames/s = {ratio:.2f}"))
    return verdicts


# Issue 10's acceptance on a lent GPU, all ratios within one run.
SPEEDUP_40G_OVER_BLOCK = 1.25
SPEEDUP_80G_OVER_40G = 1.15
MFU_80G = 0.30
STEP_TIME_TOLERANCE = 0.15
THROUGHPUT_ROLES = ("block_40g", "recipe_40g", "recipe_80g", "compiled_40g", "baseline")


def _ratio_verdict(target: str, num_r: dict | None, den_r: dict | None, least: float) -> Verdict:
    if num_r is None or den_r is None:
        return Verdict(target, "not measured", "needs both configurations measured in this run at the target shape")
    ratio = num_r["throughput"]["frames_per_s"] / den_r["throughput"]["frames_per_s"]
    return Verdict(target, "met" if ratio >= least else "not met",
                   f"{num_r['throughput']['frames_per_s']:.2f} / {den_r['throughput']['frames_per_s']:.2f} "
                   f"frames/s = {ratio:.2f}x")


def step_time_error(r: dict) -> float | None:
    """(predicted - measured) / measured median step time, where the planner predicted one."""
    predicted = (r.get("predicted") or {}).get("step_s")
    if predicted is None or not ok(r) or r.get("config", {}).get("mix"):
        return None
    return (predicted - r["timing"]["median"]) / r["timing"]["median"]


def judge_throughput(results: list[dict]) -> list[Verdict]:
    """Issue 10's GPU targets, from this run's measurements only."""
    block, r40, r80 = (_recipe_result(results, name) for name in ("block_40g", "recipe_40g", "recipe_80g"))
    verdicts = [
        _ratio_verdict(f"40GB recipe >= {SPEEDUP_40G_OVER_BLOCK}x the block policy's frames/s (worst case)",
                       r40, block, SPEEDUP_40G_OVER_BLOCK),
        _ratio_verdict(f"80GB recipe >= {SPEEDUP_80G_OVER_40G}x the 40GB recipe's frames/s per GPU (worst case)",
                       r80, r40, SPEEDUP_80G_OVER_40G),
    ]
    target = f"80GB recipe: MFU >= {MFU_80G:.0%} with scenes of 24 frames"
    if r80 is None or r80["throughput"]["mfu"] is None:
        verdicts.append(Verdict(target, "not measured", "no GPU run of the 80GB recipe with an MFU"))
    else:
        value = r80["throughput"]["mfu"]
        verdicts.append(Verdict(target, "met" if value >= MFU_80G else "not met",
                                f"MFU {value:.1%} on {r80['device']['name']}"))
    errors = {r["config"]["name"]: step_time_error(r) for r in results if role(r) in THROUGHPUT_ROLES}
    errors = {name: e for name, e in errors.items() if e is not None}
    target = f"planner's step time within {STEP_TIME_TOLERANCE:.0%} of measured, each configuration"
    if not errors:
        verdicts.append(Verdict(target, "not measured", "no configuration with both a prediction and a measurement"))
    else:
        worst = max(errors.items(), key=lambda item: abs(item[1]))
        verdicts.append(Verdict(target, "met" if abs(worst[1]) <= STEP_TIME_TOLERANCE else "not met",
                                f"{len(errors)} configurations, worst {worst[0]}: {worst[1]:+.1%}"))
    return verdicts


def throughput_table(results: list[dict], cpu: bool) -> list[str]:
    """The issue-10 comparison: each configuration against the block policy measured in the same run on
    the same batches (worst case against worst case, mix against mix)."""
    rows = [r for r in results if role(r) in THROUGHPUT_ROLES and ok(r)]
    if not rows:
        return []
    reference = {bool(r["config"].get("mix")): r for r in rows if role(r) == "block_40g"}
    mem_name = "saved for backward (MiB, CPU)" if cpu else "peak allocated (GiB)"
    header = ["configuration", "batches", "frames/s/GPU", "x block policy", "recompute / model FLOPs (planned)",
              "MFU", mem_name, "step (s)", "planned step (s)", "error"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        mix = r["config"].get("mix")
        ref = reference.get(bool(mix))
        fps = r["throughput"]["frames_per_s"]
        mem = (r.get("memory") or {}).get("saved_tensor_bytes") if cpu else peak_bytes(r)
        predicted = r.get("predicted") or {}
        error = step_time_error(r)
        lines.append("| " + " | ".join([
            r["config"]["name"],
            f"sampler mix of {mix}" if mix else f"{r['shape']['scenes']} x {r['shape']['frames_per_scene']} frames",
            f"{fps:.2f}", "-" if ref is None else f"{fps / ref['throughput']['frames_per_s']:.2f}",
            num(predicted.get("recompute_fraction"), "{:.1%}"), num(r["throughput"].get("mfu"), "{:.1%}"),
            mib(mem) if cpu else gib(mem), f"{r['timing']['median']:.3f}",
            num(predicted.get("step_s"), "{:.3f}"), num(error, "{:+.1%}")]) + " |")
    return lines


def baseline_findings(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        if role(r) != "baseline":
            continue
        cfg = r["config"]
        cap = cfg.get("gpu_memory_gib")
        where = f"at {cfg['frames']} frames/GPU" + (f" under a {cap:g} GiB cap" if cap else "")
        if r.get("status") == "oom":
            lines.append(f"- {where}: **out of memory** (during {r.get('phase', '?')})")
        elif ok(r):
            mem = peak_bytes(r)
            cpu_mem = r.get("memory") or {}
            lines.append(f"- {where}: ran, peak {gib(mem)} GiB" if mem is not None else
                         f"- {where}: ran (CPU: model states {mib(cpu_mem.get('model_state_bytes'))} MiB, "
                         f"saved for backward {mib(cpu_mem.get('saved_tensor_bytes'))} MiB)")
        else:
            lines.append(f"- {where}: {r.get('status')}: {r.get('error', '')}")
    return lines


# --------------------------------------------------------------------------------------- tables
def _cap_cell(r: dict) -> str:
    """The memory cap of a run: as asked, '(card)' where the card was no larger, '!' where the run
    reserved more than the cap (the emulation did not hold)."""
    asked = r.get("config", {}).get("gpu_memory_gib")
    if asked is None:
        return "-"
    cap = r.get("memory_cap") or {}
    text = f"{asked:g}" + (" (card)" if cap.get("applied") is False else "")
    return text + (" !" if (r.get("memory") or {}).get("cap_respected") is False else "")


def _cell_status(r: dict) -> str:
    status = r.get("status", "?")
    return "ok" if status == "ok" else f"**{status}**"


def results_table(results: list[dict], cpu: bool) -> list[str]:
    mem_header = ("model states per rank (MiB, CPU)", "saved for backward (MiB, CPU)",
                  "host peak RSS (MiB, CPU)") if cpu else (
        "peak allocated (GiB)", "peak reserved (GiB)")
    header = ["configuration", "frames/GPU", "world size", "cap (GiB)", "status", "step (s) median [min-max]",
              "frames/s/GPU", "tokens/s/GPU", "TFLOP/s", "MFU", *mem_header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        if role(r) == "volumes":
            continue  # not a measurement: it feeds the communication model
        cfg = r.get("config", {})
        t, thr, mem = r.get("timing"), r.get("throughput") or {}, r.get("memory") or {}
        step = "-" if not t else f"{t['median']:.3f} [{t['min']:.3f}-{t['max']:.3f}]"
        if cpu:
            mem_cells = (mib(mem.get("model_state_bytes")), mib(mem.get("saved_tensor_bytes")),
                         mib(mem.get("host_peak_rss_bytes")))
        else:
            mem_cells = (gib(mem.get("peak_allocated_bytes")), gib(mem.get("peak_reserved_bytes")))
        cells = [cfg.get("name", r.get("name", "?")), str(cfg.get("frames", "-")), str(cfg.get("world_size", "-")),
                 _cap_cell(r), _cell_status(r), step,
                 num(thr.get("frames_per_s")), num(thr.get("tokens_per_s"), "{:.0f}"),
                 num(thr.get("achieved_tflops"), "{:.3f}" if cpu else "{:.1f}"),
                 num(thr.get("mfu"), "{:.1%}"), *mem_cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def frontier_rows(results: list[dict], cpu: bool) -> list[dict]:
    """Successful runs of the 80GB recipe's sweep (and its own point), with Pareto-optimal flags:
    no other run has both more frames/s and less memory."""
    def memory(r: dict) -> float | None:
        mem = r.get("memory") or {}
        return mem.get("saved_tensor_bytes") if cpu else mem.get("peak_allocated_bytes")

    rows = [{"policy": r["config"].get("policy") or r["parallel"]["checkpoint"],
             "frames": r["spec"]["frames_per_gpu"], "memory": memory(r),
             "fps": r["throughput"]["frames_per_s"], "name": r["config"]["name"]}
            for r in results if ok(r) and role(r) in ("sweep", "recipe_80g") and memory(r) is not None]
    for row in rows:
        row["pareto"] = not any(o["fps"] >= row["fps"] and o["memory"] <= row["memory"]
                                and (o["fps"] > row["fps"] or o["memory"] < row["memory"]) for o in rows)
    return sorted(rows, key=lambda row: (row["policy"], row["frames"]))


@dataclass
class CommSource:
    """Unit volumes to model, and the measured compute time to overlap them with (None on the CPU)."""

    label: str
    volumes: list
    compute_s: float | None
    frames: int | None
    device_name: str


def comm_sources(results: list[dict]) -> list[CommSource]:
    """Each recipe measured on a GPU (its own units and step time); otherwise the VGGT-1B volumes job."""
    sources = []
    for role_name in ("recipe_40g", "recipe_80g"):
        r = next((r for r in results if role(r) == role_name and ok(r) and r.get("comm_units")
                  and r["device"]["type"] == "cuda"), None)
        if r is not None:
            sources.append(CommSource(r["config"]["name"], [comm_model.UnitVolume(**u) for u in r["comm_units"]],
                                      r["timing"]["median"], r["spec"]["frames_per_gpu"], r["device"]["name"]))
    if not sources:
        r = next((r for r in results if role(r) == "volumes" and ok(r)), None)
        if r is not None:
            sources.append(CommSource(r["config"]["name"], [comm_model.UnitVolume(**u) for u in r["comm_units"]],
                                      None, None, ""))
    return sources


def comm_section(results: list[dict], cpu: bool) -> list[str]:
    lines = ["## Communication at scale (a model, not a measurement)", ""]
    sources = comm_sources(results)
    if not sources:
        return lines + ["No FSDP unit volumes were recorded (no configuration succeeded).", ""]
    cluster = comm_model.cluster_for(sources[0].device_name)
    lines += [
        "Per step each FSDP unit's parameters are all-gathered before forward, and again before backward where "
        "the unit is resharded after forward, and its gradients are reduce-scattered (hybrid sharding: "
        "all-reduced across nodes too); each GPU moves (n-1)/n of each over the ring. "
        f"Cluster assumed: {cluster.name}; NVLink {cluster.nvlink_gbs:g} GB/s and InfiniBand "
        f"{cluster.nic_gbs:g} GB/s per GPU per direction, at {cluster.efficiency:.0%} efficiency; "
        f"{cluster.latency_intra_s * 1e6:g}/{cluster.latency_inter_s * 1e6:g} us per collective inside/across "
        "nodes. Step time = measured compute (world size 8 over a fake process group, so no communication) + "
        "the communication that cannot overlap with it (benchmarks/comm_model.py).",
        "",
    ]
    header = ["source", "GPUs", "sharding", "all-gather GB/GPU", "reduce GB/GPU", "comm (s)", "exposed (s)",
              "step (s)", "scaling efficiency", "frames/s (all GPUs)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for src in sources:
        for row in comm_model.scaling_table(src.volumes, cluster, src.compute_s, src.frames):
            lines.append("| " + " | ".join([
                src.label, str(row["gpus"]), row["sharding"], f"{row['all_gather_gb']:.2f}", f"{row['reduce_gb']:.2f}",
                f"{row['comm_s']:.3f}", f"{row['exposed_s']:.3f}", num(row["step_s"], "{:.3f}"),
                num(row["efficiency"], "{:.0%}"), num(row["frames_per_s_total"], "{:.1f}")]) + " |")
    lines.append("")
    if all(src.compute_s is None for src in sources):
        lines += ["No GPU measurement: there is no compute time to overlap with, so only the communication time "
                  "per step is predicted.", ""]
    return lines


# --------------------------------------------------------------------------------------- charts
def chart_label(r: dict) -> str:
    """A bar's name: the configuration with its frames per GPU and memory cap."""
    cfg = r["config"]
    cap = cfg.get("gpu_memory_gib")
    return f"{cfg['name']} ({cfg['frames']} frames/GPU{f', cap {cap:g} GiB' if cap else ', no cap'})"


def chart_provenance(doc: dict) -> str:
    """The device and date a chart's figures were measured on."""
    device = next((r["device"] for r in doc["results"] if r.get("device")), None) or doc.get("device") or {}
    name = device.get("name", "unknown device") if isinstance(device, dict) else str(device)
    return f"{name}, measured {str(doc.get('date_utc', ''))[:10]}"


def write_charts(doc: dict, out: Path, stem: str, cpu: bool) -> list[str]:
    """PNG charts beside the report; returns their file names. Needs matplotlib (the `plots` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    mem_key = "saved_tensor_bytes" if cpu else "peak_allocated_bytes"
    mem_label = "saved for backward, MiB (CPU)" if cpu else "peak allocated, GiB"
    unit = 2**20 if cpu else GIB
    label = " (CPU, tiny model)" if cpu else ""
    files = []

    main = [r for r in results if role(r) in ("block_40g", "recipe_40g", "recipe_80g", "compiled_40g", "baseline")
            and r.get("status") != "skipped"]
    if main:
        names = [chart_label(r) for r in main]
        fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(main) + 2.2))
        # A run that did not finish has no bar (no figure was measured): its status is written instead.
        fps = [r["throughput"]["frames_per_s"] if ok(r) else 0.0 for r in main]
        axes[0].barh(names, fps, color="tab:blue")
        axes[0].set_xlabel("frames/s per GPU (measured)" + label)
        mem = [((r.get("memory") or {}).get(mem_key) or 0) / unit if ok(r) else 0.0 for r in main]
        axes[1].barh(names, mem, color="tab:green")
        axes[1].set_xlabel(mem_label + " (measured)")
        for ax in axes:
            for i, r in enumerate(main):
                if not ok(r):
                    ax.text(0, i, f" {str(r.get('status')).upper()}", va="center", color="tab:red", fontweight="bold")
        if not cpu:
            caps = sorted({r["config"].get("gpu_memory_gib") for r in main if r["config"].get("gpu_memory_gib")})
            for cap in caps:
                axes[1].axvline(cap, color="grey", linestyle="--", linewidth=1)
                axes[1].text(cap, len(main) - 0.5, f" cap {cap:g} GiB", color="grey", fontsize=8)
        fig.suptitle(f"Recipes side by side{label}: {chart_provenance(doc)}", fontsize=10)
        fig.tight_layout()
        files.append(_save(fig, out, f"{stem}-recipes.png"))
        plt.close(fig)

    rows = frontier_rows(results, cpu)
    if rows:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for policy in sorted({row["policy"] for row in rows}):
            pts = sorted((row["frames"], row["memory"] / unit) for row in rows if row["policy"] == policy)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"checkpoint: {policy}")
        # A sweep point that ran out of memory has no figure: marked at the top, not plotted as a value.
        top = max(row["memory"] / unit for row in rows)
        for r in results:
            if role(r) == "sweep" and r.get("status") == "oom":
                ax.plot([r["config"]["frames"]], [top], marker="x", color="tab:red", linestyle="none")
                ax.annotate(f"OOM ({r['config'].get('policy')})", (r["config"]["frames"], top), color="tab:red",
                            textcoords="offset points", xytext=(-30, 6), fontsize=8)
        ax.set_xlabel("frames per GPU")
        ax.set_ylabel(mem_label + " (measured)")
        ax.set_title(f"Memory against frames (80GB recipe, no cap){label}\n{chart_provenance(doc)}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        files.append(_save(fig, out, f"{stem}-memory-vs-frames.png"))
        plt.close(fig)
    return files


def _save(fig, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=110)
    return name


# --------------------------------------------------------------------------------------- the report
def render(doc: dict, charts: list[str] | None, charts_note: str) -> str:
    results = doc["results"]
    device, cpu = device_line(results)
    first = next((r for r in results if "device" in r), {})
    lines = [f"# Recipe benchmark: {device}", ""]
    if cpu:
        lines += ["> **CPU results.** These runs check that the benchmark machinery works, with the tiny model; "
                  "none of their figures is a GPU result, and no GPU target is judged from them. "
                  "The GPU comparison is run with `python -m benchmarks.compare_recipes --profile gpu "
                  "--out DIR --budget-s 270` (VGGT-1B, 518 px, world size 8).", ""]
    lines += [
        f"- Date (UTC): {doc['date_utc']}",
        f"- Device: {device}",
        f"- torch: {first.get('device', {}).get('torch', '?')}; allocator: "
        f"`PYTORCH_CUDA_ALLOC_CONF={first.get('device', {}).get('alloc_conf')}`",
        f"- Command: `{doc['command']}`",
        f"- Profile: image {doc['profile']['image'][0]}x{doc['profile']['image'][1]}, "
        f"{doc['profile']['warmup']} warm-up and {doc['profile']['steps']} measured steps per configuration, "
        "each configuration in a fresh process",
        "",
        "Method: `benchmarks/bench_step.py`. One GPU's share of an N-GPU run is measured over a fake "
        "process group (true buffer sizes, free collectives): memory is what one GPU holds; step time is "
        "compute without communication (see the model below). FLOPs are counted once, without "
        "checkpoint recompute; MFU is against the dense BF16 peak (A100 312, H100 SXM/H200 989 TFLOP/s). "
        "A memory cap emulates a smaller card on a larger one. The baseline runs upstream's choices at "
        "world size 1 (each GPU holds all model states, as under DDP; DDP's own gradient buckets are not "
        "included, which flatters the baseline).",
        "",
        "## Recipes side by side",
        "",
        *results_table(results, cpu),
        "",
    ]
    if not cpu:
        lines += ["## Targets (VGGT-1B, trainable aggregator, camera + depth + point heads, 518 px, world size 8)",
                  "", "| target | status | measured |", "|---|---|---|"]
        lines += [f"| {v.target} | {v.status} | {v.evidence} |" for v in judge_targets(results)]
        lines += [""]
    else:
        lines += ["## Targets", "", "Not judged: the targets are for VGGT-1B on GPUs, and these are CPU runs.", ""]
    throughput = throughput_table(results, cpu)
    if throughput:
        lines += ["## Throughput: the block policy before against the recipes now (issue 10)", "",
                  "Measured in this run, on the same batches: the worst case (scenes of up to 24 frames) and a "
                  "realistic mix (the recipe sampler's first batches: scene lengths and aspect ratios as in "
                  "training). Recompute fraction and planned step time are the planner's (`vggt-fsdp plan`).",
                  "", *throughput, ""]
        if not cpu:
            lines += ["| target | status | measured |", "|---|---|---|"]
            lines += [f"| {v.target} | {v.status} | {v.evidence} |" for v in judge_throughput(results)] + [""]
    findings = baseline_findings(results)
    if findings:
        lines += ["## Upstream-style baseline at the same shapes", "", *findings, ""]
    rows = frontier_rows(results, cpu)
    if rows:
        mem_name = "saved for backward (MiB, CPU)" if cpu else "peak allocated (GiB)"
        lines += ["## Memory/throughput frontier (80GB recipe, swept frames and checkpoint policy)", "",
                  f"| checkpoint | frames/GPU | {mem_name} | frames/s/GPU | on the frontier |",
                  "|---|---|---|---|---|"]
        size = mib if cpu else gib
        lines += [f"| {r['policy']} | {r['frames']} | {size(r['memory'])} | {r['fps']:.2f} | "
                  f"{'yes' if r['pareto'] else ''} |" for r in rows]
        lines += [""]
    failed = [r for r in results if r.get("status") not in ("ok", "oom")]
    if failed:
        lines += ["## Configurations without a result", ""]
        lines += [f"- {r.get('config', {}).get('name', '?')}: {r.get('status')}: {r.get('error', '')}"
                  for r in failed] + [""]
    lines += comm_section(results, cpu)
    lines += ["## Charts", ""]
    if charts:
        lines += [f"![{name}]({name})" for name in charts] + [""]
    else:
        lines += [charts_note, ""]
    lines += ["## Reproduce", "", "```bash", doc["command"], "```", "", "Each configuration alone:", "", "```bash"]
    lines += [r["command"] for r in results if r.get("command")] + ["```", ""]
    return "\n".join(lines)


def write_report(doc: dict, out: Path, stem: str, charts: bool = True) -> Path:
    """Write `out/<stem>.md` (and `out/<stem>-*.png` when charts are wanted and matplotlib is present)."""
    _, cpu = device_line(doc["results"])
    files: list[str] | None = None
    note = "Charts were not drawn for this intermediate report."
    if charts:
        try:
            files = write_charts(doc, out, stem, cpu)
        except ImportError:
            note = ("Charts skipped: matplotlib is not installed (install the `plots` extra: "
                    "`pip install -e .[plots]`).")
    path = out / f"{stem}.md"
    path.write_text(render(doc, files, note))
    return path


def main(argv: list[str] | None = None) -> int:
    """Re-render a comparison's report and charts from its JSON (e.g. GPU results on a machine with
    matplotlib): `python -m benchmarks.report RESULTS.json [--out DIR]`."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=main.__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the <date>-<device>.json a comparison wrote")
    parser.add_argument("--out", type=Path, default=None, help="directory to write to (default: beside the JSON)")
    parser.add_argument("--no-charts", action="store_true")
    parser.add_argument("--charts-only", action="store_true", help="redraw the charts, leave the report as it is")
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="show configuration OLD as NEW (e.g. what a recipe was when it was measured)")
    args = parser.parse_args(argv)
    doc = json.loads(args.results.read_text())
    renames = dict(item.split("=", 1) for item in args.rename)
    for r in doc["results"]:
        r["config"]["name"] = renames.get(r["config"]["name"], r["config"]["name"])
    out = args.out or args.results.parent
    out.mkdir(parents=True, exist_ok=True)
    if args.charts_only:
        cpu = not any((r.get("device") or {}).get("type") == "cuda" for r in doc["results"])
        print("wrote " + ", ".join(write_charts(doc, out, args.results.stem, cpu)))
        return 0
    path = write_report(doc, out, args.results.stem, charts=not args.no_charts)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
