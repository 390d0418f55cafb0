"""What a GPU session measured and what it still owes, so that a later session at the same code runs only
what is owed (benchmarks/gpu_session.sh).

Each stage records its items as it goes: `record(stage_dir, item, status, why)` rewrites
`stage_dir/measurements.json` at once, so a session killed mid-stage keeps every item it finished. Items
are named `<stage>/<item>` (the stage is the stage directory's name). At the end the session merges them
into `$OUT/ledger.json`:

    {"code_key": "...", "commit": "...", "measured": {item: {...}}, "owed": {item: why}}

Commit that file as benchmarks/results/gpu-ledger.json with the results; the next session reads it
(GPU_SESSION_LEDGER overrides the path) and, when its code key is the current one, its stages skip the
items already measured. The code key hashes the files a measurement depends on (package, recipes,
benchmark scripts; not benchmarks/results), so committing results does not make everything owed again.

    python -m benchmarks.session_ledger done-file LEDGER OUT_FILE   # the items to skip, for the stages
    python -m benchmarks.session_ledger finish OUT                  # merge, print measured / owed / fastest
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
CODE_PATHS = ("vggt_fsdp", "recipes", "benchmarks", "setup.py", "setup.cfg", "pyproject.toml")
EXCLUDED = "benchmarks/results/"
DEFAULT_LEDGER = REPO / "benchmarks" / "results" / "gpu-ledger.json"
MEASURED, OWED, FAILED = "measured", "owed", "failed"


def code_key(repo: Path = REPO) -> str:
    """A hash of the tracked files measurements depend on, uncommitted changes included."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return proc.stdout if proc.returncode == 0 else f"(git {' '.join(args)} failed)"

    listed = "".join(line + "\n" for line in git("ls-files", "-s", "--", *CODE_PATHS).splitlines()
                     if EXCLUDED not in line)
    changes = git("diff", "HEAD", "--", *CODE_PATHS, f":(exclude){EXCLUDED}")
    return hashlib.sha1((listed + changes).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- in a stage
def recording() -> bool:
    """Inside a GPU session (it exports GPU_SESSION_RECORD=1): outside one, a benchmark records nothing."""
    return os.environ.get("GPU_SESSION_RECORD") == "1"


def record(stage_dir: Path, item: str, status: str, why: str | None = None, **figures) -> None:
    """Record one item of the stage now (measured / failed / owed, with why and any small figures)."""
    if not recording():
        return
    stage_dir = Path(stage_dir)
    path = stage_dir / "measurements.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"stage": stage_dir.name, "items": {}}
    doc["items"][item] = {"status": status, **({"why": why} if why else {}), **figures}
    path.write_text(json.dumps(doc, indent=1, default=str))


def already_measured(stage_dir: Path, item: str) -> bool:
    """True when the ledger the session was given (GPU_SESSION_DONE: a file of `stage/item` names for
    this code key) lists this item: a later session runs only what is owed."""
    path = os.environ.get("GPU_SESSION_DONE")
    if not path or not Path(path).is_file():
        return False
    return f"{Path(stage_dir).name}/{item}" in set(json.loads(Path(path).read_text()))


def skip_if_measured(stage_dir: Path, item: str) -> bool:
    """already_measured, recorded as such in this session's measurements (it stays measured)."""
    if already_measured(stage_dir, item):
        record(stage_dir, item, MEASURED, why="in an earlier session at this code (ledger)")
        print(f"[ledger] {Path(stage_dir).name}/{item}: measured in an earlier session at this code, skipped",
              flush=True)
        return True
    return False


def run_configs(stage_dir: Path, doc: dict, configs: list, budget_s: float, run: Callable, write: Callable) -> None:
    """A stage's configurations in order, within `budget_s` from now: each (with `.name`, `.estimate_s`)
    skipped when an earlier session at this code measured it, owed when less than its estimate is left,
    else `run(config, timeout_s)` appended to doc["results"], written (`write(doc)`) and recorded at once
    (status "ok" or "oom" is a measurement; anything else a failure)."""
    start = time.monotonic()
    for config in configs:
        if skip_if_measured(stage_dir, config.name):
            continue
        left = budget_s - (time.monotonic() - start)
        if left < config.estimate_s:
            why = f"{left:.0f} s of the budget left, needs about {config.estimate_s:.0f} s"
            doc["owed"].append({"name": config.name, "why": why})
            record(stage_dir, config.name, OWED, why)
            continue
        result = run(config, max(left, 10))
        doc["results"].append(result)
        write(doc)
        status = result.get("status")
        record(stage_dir, config.name, MEASURED if status in ("ok", "oom") else FAILED, result.get("error"),
               run_status=status)


# ----------------------------------------------------------------------------------------- the session
def done_items(ledger: Path, key: str | None = None) -> list[str]:
    """The items a ledger lists as measured, if it was made at the current code; else none."""
    if not ledger.is_file():
        return []
    doc = json.loads(ledger.read_text())
    return sorted(doc.get("measured", {})) if doc.get("code_key") == (key or code_key()) else []


def merge(out: Path, previous: Path | None, stage_status: dict[str, str]) -> dict:
    """The session's ledger: earlier measurements at this code, then every stage's items; a stage that
    did not end ok and recorded nothing is owed whole."""
    key = code_key()
    measured: dict[str, dict] = {}
    if previous is not None and previous.is_file():
        doc = json.loads(previous.read_text())
        if doc.get("code_key") == key:
            measured.update(doc.get("measured", {}))
    owed: dict[str, str] = {}
    for stage, status in stage_status.items():
        path = out / "stages" / stage / "measurements.json"
        items = json.loads(path.read_text())["items"] if path.is_file() else {}
        for item, entry in items.items():
            name = f"{stage}/{item}"
            if entry["status"] == MEASURED:
                measured.setdefault(name, entry)
                owed.pop(name, None)
            elif name not in measured:
                owed[name] = f"{entry['status']}: {entry.get('why', '')}".rstrip(": ")
        if status != "ok":
            owed[f"{stage}/*"] = f"stage {status}; items it did not record are owed"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"code_key": key, "commit": commit, "measured": measured, "owed": owed}


def fastest_lines(out: Path) -> list[str]:
    """Per recipe, the fastest measured configuration that fits its cap, as overrides (stage 20)."""
    lines = []
    for path in sorted((out / "stages").glob("*/fastest.json")):
        for recipe, best in json.loads(path.read_text()).items():
            if best is None:
                lines.append(f"  {recipe}: no configuration measured within its cap")
            else:
                lines.append(f"  {recipe}: {' '.join(best['overrides']) or '(the recipe as it is)'}  "
                             f"# {best['step_s']:.3f} s a step, {best['name']} ({best['device']})")
    return lines


def finish(out: Path) -> int:
    """Merge the stages' records into OUT/ledger.json; print what was measured, what is owed, and the
    fastest fitting configurations; check OUT's size."""
    status_file = out / "stage-status.json"
    stage_status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    previous = Path(os.environ.get("GPU_SESSION_LEDGER", DEFAULT_LEDGER))
    ledger = merge(out, previous, stage_status)
    (out / "ledger.json").write_text(json.dumps(ledger, indent=1, default=str))
    print(f"== measured ({len(ledger['measured'])}):")
    for name in sorted(ledger["measured"]):
        print(f"  {name}")
    print(f"== still owed ({len(ledger['owed'])}):")
    for name, why in sorted(ledger["owed"].items()):
        print(f"  {name}: {why}")
    fastest = fastest_lines(out)
    if fastest:
        print("== fastest configuration within each recipe's cap (overrides; change a recipe only on a committed "
              "GPU measurement):")
        print("\n".join(fastest))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["done-file"] and len(argv) == 3:
        Path(argv[2]).write_text(json.dumps(done_items(Path(argv[1]))))
        return 0
    if argv[:1] == ["finish"] and len(argv) == 2:
        return finish(Path(argv[1]))
    if argv[:1] == ["key"]:
        print(code_key())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
