"""Run a module with its garbage collections counted: `python -m bench.gcwrap OUT [opts] MODULE ...`

py-spy charges a collection to whatever line allocated the object that set it off, so a
long full collection shows up as one fat, odd stack. This wrapper counts collections and
their duration per generation with `gc.callbacks`, and writes the totals as JSON to OUT
from the callback itself (at most every 0.2 s; collections are frequent under load, and
an idle process has nothing new to tell). No thread is added to the measured process.

Option, an experiment on the relay without changing it: `--freeze-after S` calls
`gc.freeze()` S seconds after start (after imports and startup). (Thresholds are not an
option here: `relay serve` sets its own, see relay/cli.py.)
"""

from __future__ import annotations

import gc
import json
import runpy
import sys
import threading
import time
from pathlib import Path
from typing import Any

totals = {str(g): {"collections": 0, "seconds": 0.0, "max_ms": 0.0} for g in range(3)}
state = {"started": 0.0, "written": 0.0}
out_path = Path("/dev/null")


def on_gc(phase: str, info: dict[str, Any]) -> None:
    now = time.perf_counter()
    if phase == "start":
        state["started"] = now
        return
    took = now - state["started"]
    entry = totals[str(info["generation"])]
    entry["collections"] += 1
    entry["seconds"] += took
    entry["max_ms"] = max(entry["max_ms"], took * 1000)
    if now - state["written"] >= 0.2:
        state["written"] = now
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(totals))
        tmp.replace(out_path)


def main() -> None:
    global out_path
    args = sys.argv[1:]
    out_path = Path(args.pop(0))
    while args and args[0].startswith("--"):
        option = args.pop(0)
        if option == "--freeze-after":
            timer = threading.Timer(float(args.pop(0)), gc.freeze)
            timer.daemon = True
            timer.start()
        else:
            raise SystemExit(f"gcwrap: unknown option {option}")
    module, *rest = args
    gc.callbacks.append(on_gc)
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
