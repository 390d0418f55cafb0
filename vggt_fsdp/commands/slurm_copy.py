"""The SLURM script that `vggt-fsdp recipe copy RECIPE DEST --slurm` writes: the bundled
recipes/slurm/train_multinode.sbatch with the resources RECIPE needs on each node filled in between its
`# >>> resources` and `# <<< resources` lines, so that `sbatch --nodes N` runs it unedited.

Per node: one task (the script's), `--gpus-per-node` = the recipe's processes per machine for a GPU recipe
and no GPU request for a CPU one (accelerate.use_cpu), and `--cpus-per-task` = those processes times
(1 + data.num_workers): each training process and its data workers get a core. Nothing else (no
--exclusive, no memory): sbatch's command line adds what a cluster wants.
"""
from __future__ import annotations

from pathlib import Path

BEGIN, END = "# >>> resources", "# <<< resources"


def resource_lines(recipe, name: str) -> list[str]:
    acc = recipe.accelerate
    machines = int(acc.get("num_machines") or 1)
    per_node = max(1, int(acc.get("num_processes") or 1) // machines)
    cpus = per_node * (1 + int(recipe.data.num_workers))
    on_cpu = bool(acc.get("use_cpu"))
    lines = [f"{BEGIN} for {name}: {per_node} {'CPU' if on_cpu else 'GPU'} process(es) a node, "
             f"{recipe.data.num_workers} data worker(s) each (written by `vggt-fsdp recipe copy --slurm`)"]
    if not on_cpu:
        lines.append(f"#SBATCH --gpus-per-node={per_node}")
    lines.append(f"#SBATCH --cpus-per-task={cpus}")
    return lines + [END]


def script_for(recipe_file: Path, script: Path) -> str:
    """`script`'s text with `recipe_file`'s resources between its markers."""
    from vggt_fsdp.recipe import load_recipe

    lines = script.read_text().splitlines()
    begins = [i for i, line in enumerate(lines) if line.startswith(BEGIN)]
    ends = [i for i, line in enumerate(lines) if line.startswith(END)]
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ValueError(f"{script}: expected one '{BEGIN}' line followed by one '{END}' line")
    resources = resource_lines(load_recipe(recipe_file), recipe_file.stem)
    return "\n".join(lines[:begins[0]] + resources + lines[ends[0] + 1:]) + "\n"
