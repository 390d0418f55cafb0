"""`vggt-fsdp train RECIPE [key=value ...]`: start the processes the recipe asks for and train.

First the recipe is loaded and checked (train/preflight.py: paths, initial weights, patterns against
the model built on the meta device, the output directory and its lock): every problem is printed as one
`error: key: ...` line and nothing starts. Then the recipe's `accelerate:` section is written out as
an Accelerate config file and handed to `accelerate launch -m vggt_fsdp.train RECIPE [key=value ...]`,
which starts num_processes training processes on this machine (one node of num_machines; override
accelerate.machine_rank and accelerate.main_process_ip per node). SIGTERM is passed on to the
launcher, whose processes save a checkpoint at the next step boundary (or, still starting, just stop)
and exit; this command then exits 0 (see faults.py). A SIGTERM before the launcher starts (during the
checks) stops here, with code 0. Exit codes: faults.EXIT_CODES (README's table).

The launcher dies with this command (Linux: PR_SET_PDEATHSIG), so a kill -9 of `vggt-fsdp train` or of
its process group ends the launcher, and its training processes end when they see it gone (faults.py).

When the launcher ends the run normally, this command prints a summary: the loss of the first and the
last steps logged, the time, and where the metrics, checkpoints and weights are (run_summary.py).

`--dry-run` does the checks, writes the config file where it stays (OUTPUT_DIR/accelerate_config.yaml
or --config-file) and prints the command that trains the recipe; it starts nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


EXAMPLES = """  vggt-fsdp train cpu_tiny                                 2 CPU processes, the bundled tiny recipe
  vggt-fsdp train recipes/a100_80g.yaml data.root=/data/co3d train.output_dir=runs/try1
  vggt-fsdp train cpu_tiny --dry-run train.max_steps=5     check, write the Accelerate config, print the command
  vggt-fsdp train runs/try1/recipe.yaml train.resume=auto  continue a run from its latest checkpoint
"""

def build_parser(parser: argparse.ArgumentParser) -> None:
    from vggt_fsdp.cli import add_recipe_arguments

    add_recipe_arguments(parser, "train.max_steps=50 train.output_dir=runs/try1")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the recipe, write the Accelerate config file and print the launch command; "
                             "start nothing")
    parser.add_argument("--config-file", type=Path, default=None,
                        help="where --dry-run writes the Accelerate config (default: "
                             "OUTPUT_DIR/accelerate_config.yaml)")


def launch_command(config_file: Path, recipe: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "-m", "vggt_fsdp.train", recipe, *overrides]


def run(args: argparse.Namespace) -> int:
    launcher = _Launcher()  # from here a SIGTERM is recorded (before the launch) or passed on
    try:
        return _check_and_launch(args, launcher)
    finally:
        launcher.close()


def _check_and_launch(args: argparse.Namespace, launcher: _Launcher) -> int:
    from vggt_fsdp.parallel.accelerate import accelerate_config_yaml
    from vggt_fsdp.recipe import RecipeError, load_recipe
    from vggt_fsdp.tasks import preflight
    from vggt_fsdp.train.faults import EXIT_OK, EXIT_REFUSED, STATUS_ENV

    try:
        recipe = load_recipe(args.recipe, args.overrides)  # fail here, before starting any process
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    problems = preflight(recipe)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        return EXIT_REFUSED
    acc = recipe.accelerate
    where = (f"{acc.get('num_processes')} process(es) ({'cpu' if acc.get('use_cpu') else 'gpu'}, "
             f"{acc.get('num_machines', 1)} machine(s))")
    if args.dry_run:
        config_file = args.config_file or Path(recipe.train.output_dir) / "accelerate_config.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(accelerate_config_yaml(recipe))
        print(f"[vggt-fsdp] recipe checked; would launch {where} with {config_file}:", file=sys.stderr)
        print(shlex.join(launch_command(config_file, args.recipe, list(args.overrides))))
        return EXIT_OK
    with tempfile.TemporaryDirectory(prefix="vggt-fsdp-") as tmp:
        config_file = Path(tmp) / "accelerate_config.yaml"
        config_file.write_text(accelerate_config_yaml(recipe, main_process_port=rendezvous_port(acc)))
        command = launch_command(config_file, args.recipe, list(args.overrides))
        env = dict(os.environ)
        # After a SIGTERM the launcher's agent SIGKILLs its workers once this many seconds pass; they
        # need a step and a checkpoint save (torch's default is 30 s). A user's own value wins. Read by
        # torch.distributed.launcher.api.LaunchConfig in torch 2.13; older releases (before 2.12, by
        # one public report) ignore it and keep 30 s.
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
        status = Path(tmp) / "status.json"  # rank 0 says there how far the run got (faults.write_status)
        env[STATUS_ENV] = str(status)
        if launcher.signalled:  # during the checks: nothing started
            _say_stopped_in_startup(launcher.signalled)
            return EXIT_OK
        print(f"[vggt-fsdp] launching {where}: {shlex.join(command)}", file=sys.stderr, flush=True)
        started = time.monotonic()
        code = launcher.run(command, env)
        if code == 0 and not launcher.signalled:
            from vggt_fsdp.commands.run_summary import summarize

            print(summarize(recipe.train.output_dir, time.monotonic() - started), file=sys.stderr)
        return _exit_code(code, launcher.signalled, status)


def rendezvous_port(acc: dict) -> int | None:
    """The port a one-machine launch rendezvous on: the recipe's `accelerate.main_process_port`, else
    MASTER_PORT, else a free port of this machine, so two runs on one machine (two users, two tests, two
    jobs on one node) never meet on torch's default 29500. None for several machines: all of them must
    agree on one port, which the recipe or the launcher's environment names."""
    if acc.get("main_process_port") is not None or acc.get("num_machines", 1) > 1:
        return None
    if os.environ.get("MASTER_PORT"):
        return int(os.environ["MASTER_PORT"])
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _exit_code(code: int, signalled: int | None, status: Path) -> int:
    """The launcher's code (-N, ended by signal N: 128+N), except after a SIGTERM this command passed on
    (or received before launching) that the run answered cleanly: 0, as for a direct run, with what
    happened. The agent exits non-zero when signalled, although every rank stopped as asked; rank 0's
    status file tells: still starting (or no process started), preempted with a checkpoint, or finished
    (the signal came during the final export)."""
    from vggt_fsdp.train import faults

    code = faults.signal_exit_code(code)
    if not signalled or code == faults.EXIT_OK:
        return code
    info = faults.read_status(status) or {"state": faults.STARTING}
    state = info.get("state")
    if state in (faults.STARTING, faults.STOPPED):
        _say_stopped_in_startup(signalled)
    elif state == faults.PREEMPTED:
        print(f"[vggt-fsdp] preempted at step {info['step']}; checkpoint {info['checkpoint']} saved. Run the "
              "same command again to resume.", file=sys.stderr)
    elif state == faults.FINISHED:
        print(f"[vggt-fsdp] finished (step {info['step']}, checkpoint {info['checkpoint']}) before signal "
              f"{signalled} could stop it.", file=sys.stderr)
    else:  # training, and no rank recorded a clean stop: killed before saving
        return code
    return faults.EXIT_OK


def _say_stopped_in_startup(signum: int) -> None:
    print(f"[vggt-fsdp] stopped by signal {signum} during start-up: nothing was trained, nothing saved. Run "
          "the same command again to start.", file=sys.stderr)


def _die_with_parent() -> None:
    """In the launcher's process, before exec: SIGKILL when this command dies (Linux; elsewhere a kill of
    this command alone leaves the launcher, a kill of the process group does not)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        return


class _Launcher:
    """SIGTERM: recorded before the launch, passed on to the launcher after it (SIGINT, a Ctrl-C,
    already reaches every process of the terminal's group)."""

    def __init__(self):
        self.child: subprocess.Popen | None = None
        self.signalled: int | None = None
        self._forwarded = False
        self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def close(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = self.signalled or signum
        self._forward()

    def _forward(self) -> None:
        if self.child is not None and self.signalled and not self._forwarded:
            self._forwarded = True
            self.child.send_signal(self.signalled)

    def run(self, command: list[str], env: dict[str, str]) -> int:
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.child = subprocess.Popen(command, env=env, preexec_fn=preexec)
        self._forward()  # a signal that came while it started
        try:
            return self.child.wait()
        except KeyboardInterrupt:
            return self.child.wait()
