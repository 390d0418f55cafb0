"""The trainer: `python -m vggt_fsdp.train RECIPE [key=value ...]` (one rank) and its parts.

config.py      the recipe's optim:, schedule: and train: sections
build.py       recipe -> Accelerator, sharded model, initial weights, optimizer, data, Trainer
loop.py        Trainer: steps, accumulation, clipping, non-finite skipping, logging, checkpoints
optim.py       AdamW parameter groups, warmup + cosine schedule, per-group gradient clipping
checkpoint.py  atomic sharded (DCP) checkpoints, resume, export to one .safetensors
safe_load.py   checkpoint files read as data only (weights-only, restricted DCP metadata unpickler)
checkpoint_errors.py  failed saves, loads and exports in the toolkit's words (disk full, DCP errors)
resume_check.py  the rule for a resume with a changed recipe; recipe.yaml and recipe-history.jsonl
faults.py      stop signals, a launcher gone, exit codes, non-finite losses, out-of-memory reports
metrics.py     device-side accumulation, metrics.jsonl, progress line, TensorBoard
validation.py  held-out loss, camera AUC@30, depth AbsRel
"""
