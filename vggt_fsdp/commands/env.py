"""`vggt-fsdp env [--json]`: what a bug report needs about the machine and the install.

Versions (python, torch and the CUDA / cuDNN / NCCL it was built with, accelerate, vggt_fsdp and where it is
imported from, safetensors, pyyaml, psutil), the accelerator devices torch sees with their memory, CPU
count, host memory, the platform, Accelerate's default config file (which `accelerate launch` reads
when given none), and the git commit of the checkout vggt_fsdp runs from, if it is one.
Nothing here fails: what cannot be read is reported as such.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

EXAMPLES = """  vggt-fsdp env                  paste the output into a bug report
  vggt-fsdp env --json > env.json
"""

PACKAGES = ("torch", "accelerate", "safetensors", "pyyaml", "psutil", "numpy")


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git_commit(where: Path) -> str | None:
    """The commit of the git checkout holding `where` (with `+changes` when its tracked files differ),
    or None outside a checkout or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty else "")


def _devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        devices.append(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                       f"compute capability {props.major}.{props.minor}")
    return devices


def _torch_build(torch) -> str:
    if not torch.version.cuda:
        return "no CUDA (a CPU build)" if not getattr(torch.version, "hip", None) else f"ROCm {torch.version.hip}"
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as err:  # a build without NCCL: say so, the report is still wanted
        nccl = f"unknown ({type(err).__name__})"
    return f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}"


def collect() -> dict[str, object]:
    import psutil
    import torch

    import vggt_fsdp

    package_dir = Path(vggt_fsdp.__file__).resolve().parent
    info: dict[str, object] = {
        "vggt_fsdp": f"{vggt_fsdp.__version__} ({package_dir})",
        "git commit": git_commit(package_dir) or "not a git checkout",
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "platform": platform.platform(),
        **{name: _version(name) for name in PACKAGES},
        "torch built with": _torch_build(torch),
        "devices": _devices() or ["none: torch sees no CUDA device"],
        "CPUs": f"{os.cpu_count()} (this process may use {len(os.sched_getaffinity(0))})"
        if hasattr(os, "sched_getaffinity") else str(os.cpu_count()),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB, "
                  f"{psutil.virtual_memory().available / 2**30:.1f} GiB available",
    }
    # `accelerate launch` without --config_file reads this file: it changes what a launch does.
    from accelerate.commands.config.config_args import default_config_file

    info["accelerate default config"] = default_config_file if Path(default_config_file).is_file() else "none"
    for name in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF"):
        if name in os.environ:
            info[name] = os.environ[name]
    return info


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(key) for key in info)
    for key, value in info.items():
        values = value if isinstance(value, list) else [value]
        for i, text in enumerate(values):
            print(f"{key if i == 0 else '':<{width}}  {text}")
    return 0
