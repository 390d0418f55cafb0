"""What `vggt-fsdp train` says when a run ends: how the loss went, how long it took, and where its
metrics, checkpoints and weights are. Read from the run directory after the launcher returns (rank 0
wrote everything there), so it costs nothing during training and holds for a resumed run too.

The loss of each metrics.jsonl record is the mean over the steps since the record before (train.log_every
steps), so the first and the last record give the mean loss of the first and the last steps logged.
"""
from __future__ import annotations

import json
from pathlib import Path


def _records(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: the others still tell the story
            continue
        if isinstance(record, dict) and "step" in record and "loss" in record and "val" not in record:
            records.append(record)
    return records


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:,.1f} MiB"


def summarize(output_dir: str | Path, seconds: float) -> str:
    """Lines for the end of a run in `output_dir` that took `seconds`."""
    out = Path(output_dir)
    metrics = out / "metrics.jsonl"
    records = _records(metrics)
    lines = [f"[vggt-fsdp] run ended after {_duration(seconds)}: {out}"]
    if records:
        first, last = records[0], records[-1]
        last_from = records[-2]["step"] + 1 if len(records) > 1 else 1
        lines.append(f"  loss         {first['loss']:.4f} (mean of steps 1-{first['step']}) -> {last['loss']:.4f} "
                     f"(mean of steps {last_from}-{last['step']})")
        lines.append(f"  metrics      {metrics} ({len(records)} records, one per train.log_every steps)")
    else:
        lines.append(f"  metrics      none logged in {metrics}")
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*") if p.is_dir())
    lines.append(f"  checkpoints  {out / 'checkpoints'} ({', '.join(checkpoints)}; resume: run the same command "
                 "again)" if checkpoints else f"  checkpoints  none in {out / 'checkpoints'}")
    weights = out / "model.safetensors"
    lines.append(f"  weights      {weights} ({_size(weights)}, upstream names)" if weights.is_file()
                 else "  weights      none exported (train.export_final, or `vggt-fsdp export` a checkpoint)")
    return "\n".join(lines)
