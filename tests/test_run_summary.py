"""The summary `vggt-fsdp train` prints when a run ends (`make run` ended without saying where anything
was or how the loss went)."""
from __future__ import annotations

import json

from vggt_fsdp.commands.run_summary import summarize


def _run_dir(tmp_path, losses: list[float], log_every: int = 10):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "metrics.jsonl", "w") as f:
        for i, loss in enumerate(losses, 1):
            f.write(json.dumps({"step": i * log_every, "loss": loss, "lr": 1e-3}) + "\n")
        f.write('{"step": 99, "lo')  # a line a crash cut short is skipped
    return out


def test_the_summary_gives_the_loss_first_and_last_the_time_and_where_everything_is(tmp_path):
    out = _run_dir(tmp_path, [2.5, 1.75, 1.25, 0.5])
    for step in (20, 40):
        (out / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"\0" * 3 * 2**20)
    assert summarize(out, 3725.4).splitlines() == [
        f"[vggt-fsdp] run ended after 1h02m05s: {out}",
        "  loss         2.5000 (mean of steps 1-10) -> 0.5000 (mean of steps 31-40)",
        f"  metrics      {out / 'metrics.jsonl'} (4 records, one per train.log_every steps)",
        f"  checkpoints  {out / 'checkpoints'} (step-0000020, step-0000040; resume: run the same command again)",
        f"  weights      {out / 'model.safetensors'} (3.0 MiB, upstream names)",
    ]


def test_a_run_with_nothing_logged_saved_or_exported_says_so(tmp_path):
    out = _run_dir(tmp_path, [])
    assert summarize(out, 42).splitlines()[1:] == [
        f"  metrics      none logged in {out / 'metrics.jsonl'}",
        f"  checkpoints  none in {out / 'checkpoints'}",
        "  weights      none exported (train.export_final, or `vggt-fsdp export` a checkpoint)",
    ]
    assert summarize(out, 42).splitlines()[0].startswith("[vggt-fsdp] run ended after 42s")
