"""Train your own model (not VGGT) from a recipe with your own loop: examples/own_model.py's transformer
on a synthetic regression task, sharded with FSDP2 over the processes the launcher starts.

    torchrun --nproc-per-node 2 examples/train_own_model.py examples/own_model.yaml train.max_steps=20
    python examples/train_own_model.py examples/own_model.yaml        # one process: the same code path

The toolkit does what a project's loop should not have to write again:
- the recipe: typed, checked at load, `key=value` overrides (`load_recipe`);
- the Accelerator with FSDP2 on GPUs and on CPU processes, and a notice when the launcher's process
  count differs from the recipe's (`build_accelerator`);
- sharding, checkpoint wrappers and precision from `parallel:` (`prepare_model`, `prepare_optimizer`);
- the model built on the meta device and initialised by its own `reset_parameters()`/`reset_buffers()`,
  the same on every rank whatever the per-rank seeds (`materialize_module`);
- checkpoints and export: the trainer's own code (`vggt_fsdp.train.checkpoint`), which needs no
  scheduler. Chosen over `accelerator.save_state` because a save is atomic (written aside, verified
  by its checksums, renamed only when every rank has written: a crash never leaves a checkpoint that
  looks complete), the last K are kept, a resume picks the newest intact one on every rank alike, and
  `export_safetensors` makes one file with the model's own parameter names.

The loop reads train.{max_steps, checkpoint_every, keep_last, log_every, resume, seed, output_dir} and
optim.lr. The data of step s on rank r is drawn from (seed, s, r) alone, so the loop needs no data
state to resume exactly: 2N steps straight and N + kill + resume give the same losses (CI checks it:
tests/test_own_model.py). It writes output_dir/losses.jsonl, checkpoints/ and model.safetensors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # own_model.py beside this script

from own_model import OwnConfig, build  # noqa: E402  (your project's model)

from vggt_fsdp.parallel import build_accelerator, prepare_model, prepare_optimizer  # noqa: E402
from vggt_fsdp.parallel.materialize import materialize_module  # noqa: E402
from vggt_fsdp.recipe import load_recipe_or_exit  # noqa: E402
from vggt_fsdp.train import checkpoint as ckpt  # noqa: E402

SEQUENCES_PER_RANK = 8


def batch(seed: int, step: int, rank: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `step`'s inputs on `rank` and their targets: a fixed random linear map of each token plus a
    sine of its position, which the model can learn."""
    cfg = OwnConfig()
    teacher = torch.randn(cfg.in_dim, cfg.out_dim, generator=torch.Generator().manual_seed(seed)) / cfg.in_dim**0.5
    data = torch.Generator().manual_seed(hash((seed, step, rank)) % 2**63)
    x = torch.randn(SEQUENCES_PER_RANK, cfg.seq_len, cfg.in_dim, generator=data)
    position = torch.sin(torch.arange(cfg.seq_len, dtype=torch.float32) / 4)[None, :, None]
    return x.to(device), (x @ teacher + position).to(device)


def log(text: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[own-model] {text}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: train_own_model.py RECIPE [key=value ...]", file=sys.stderr)
        return 2
    recipe = load_recipe_or_exit(argv[0], argv[1:])
    cfg = recipe.train
    accelerator = build_accelerator(recipe)
    device, rank = accelerator.device, accelerator.process_index

    with torch.device("meta"):
        model = build()  # shapes only: any size fits
    prepare_model(accelerator, model, recipe.parallel)  # checkpoint wrappers, then FSDP2 units, on meta
    torch.manual_seed(cfg.seed)  # rank 0's seed makes the weights (torch's own start-up seed is random)
    materialize_module(model, device)  # each rank's shards, initialised as one process with that seed
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.optim.lr)
    model, optimizer = prepare_optimizer(accelerator, model, optimizer)
    torch.manual_seed(cfg.seed + rank)  # per-rank streams from here on (the weights are already made)

    out = Path(cfg.output_dir)
    root = out / "checkpoints"
    inner = optimizer.optimizer  # the torch optimizer inside Accelerate's wrapper: what checkpoints hold
    state = ckpt.TrainState(step=0)  # no scheduler, no sampler: the data follows the step
    resume = ckpt.agreed_resume(cfg.resume, root)
    if resume is not None:
        for notice in ckpt.load_checkpoint(resume, model, inner, state, device):
            log(notice)
        log(f"resumed from {resume} at step {state.step}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    last = resume
    while state.step < cfg.max_steps:
        x, y = batch(cfg.seed, state.step, rank, device)
        loss = F.mse_loss(model(x).float(), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        mean = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
        if rank == 0:
            with open(out / "losses.jsonl", "a") as f:
                f.write(json.dumps({"step": state.step, "loss": mean.item(),
                                    "world_size": accelerator.num_processes}) + "\n")
        if state.step % cfg.log_every == 0:
            log(f"step {state.step}/{cfg.max_steps} loss {mean.item():.5f}")
        if state.step == cfg.max_steps or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
            last = ckpt.save_checkpoint(root, model, inner, state, device, cfg.keep_last)

    if rank == 0 and last is not None:
        # verify=False: the checkpoint was just written and checksummed, or verified by agreed_resume
        # (verifying is collective: rank 0 alone must not ask for it).
        count = ckpt.export_safetensors(last, out / "model.safetensors", verify=False)
        log(f"exported {count} tensors to {out / 'model.safetensors'}")
    if dist.is_initialized():
        dist.barrier()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
