"""`selfexplore status RUN_DIR`: where a run stands, from its files alone.

Reads `state.json` and `config.json` (nothing is imported from the training stack, and nothing
is written), so it works while the pipeline runs in another process, after it finished, and
after it crashed: a unit recorded as running whose process is gone was interrupted (killed),
one recorded as failed shows its error.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from selfexplore.io import read_json
from selfexplore.pipeline.plan import duration, key_figure, label, plan_of


def process_alive(pid: int, host: str) -> bool | None:
    """Whether `pid` on `host` still runs (None: another host, which this machine cannot see)."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _running_line(info: dict[str, Any], now: float) -> tuple[str, str]:
    alive = process_alive(int(info["pid"]), str(info["host"]))
    elapsed = duration(now - float(info["since"]))
    if alive is False:
        return "INTERRUPTED", f"after {elapsed}: process {info['pid']} is gone (killed?)"
    where = f"pid {info['pid']}" + ("" if alive else f" on {info['host']}")
    return "running", f"for {elapsed} ({where})"


def render_status(run_dir: str | os.PathLike) -> str:
    """A table of the run's planned units (done / running / failed / to do) and what comes next."""
    root = Path(run_dir)
    if not (root / "state.json").is_file():
        raise FileNotFoundError(f"{root}: no state.json, so no pipeline has started there")
    state = read_json(root / "state.json")
    plan = plan_of(read_json(root / "config.json"))
    units, running, failed = state.get("units", {}), state.get("running", {}), state.get("failed")
    now = time.time()
    width = max(len(label(u)) for u in plan)
    lines, counts, upcoming = [], {"done": 0, "running": 0, "failed": 0, "to do": 0}, []
    for i, unit in enumerate(plan, 1):
        if unit in units:
            word, detail = ("done",
                            f"{duration(float(units[unit].get('seconds', 0.0))):>12}  {key_figure(unit, units[unit])}")
            counts["done"] += 1
        elif unit in running:
            word, detail = _running_line(running[unit], now)
            counts["running" if word == "running" else "failed"] += 1
            inner = [u for u in running if u not in plan]  # inside it: an evaluation's sample file
            detail += f"; now {inner[-1]}" if inner else ""
        elif failed and failed.get("unit") == unit:
            since = failed.get("since")
            word = "FAILED"
            detail = (f"after {duration(float(failed['at']) - float(since))}: " if since else "") + failed["error"]
            counts["failed"] += 1
        else:
            word, detail = "to do", ""
            counts["to do"] += 1
            upcoming.append(unit)
        lines.append(f"  {word:<11} [{i:>{len(str(len(plan)))}}/{len(plan)}] {label(unit):<{width}}  {detail}".rstrip())
    summary = ", ".join(f"{n} {word}" for word, n in counts.items() if n)
    total = sum(float(units[u].get("seconds", 0.0)) for u in plan if u in units)
    out = [f"{root}: {len(plan)} units: {summary} ({duration(total)} of completed work)", *lines]
    if not upcoming and not running and not (failed and failed.get("unit") in plan):
        out.append(f"complete: {root / 'report.md'}")
    else:
        # the first unit not done that no live process is running: what comes next, or what a rerun redoes
        alive = {u for u in running if process_alive(int(running[u]["pid"]), str(running[u]["host"])) is not False}
        pending = [u for u in plan if u not in units and u not in alive]
        if pending:
            out.append(f"next: {label(pending[0])}" + ("" if alive else " (rerun the pipeline command to resume)"))
    return "\n".join(out)
