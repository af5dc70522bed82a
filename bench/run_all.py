"""Run every benchmark and write their tables to one markdown file.

    python -m bench.run_all            # the full suite, about 10 minutes on 2 cores
    python -m bench.run_all --quick    # smaller counts and shorter windows, about 3 minutes

Order: memory (RSS only, so it does not mind neighbours) runs beside upstream economy's
first part (calls per task) and then wire bytes; economy's second part (throughput of many
tasks), fan-out and latency on one hot task, then fan-out over many tasks (1,000 tasks x
10 subscribers; quick: 100 x 10), all CPU time and delay, which do mind, run alone afterwards.
Each benchmark is its own process with a time limit; each starts and stops its own
servers and load clients on 127.0.0.1. A full run writes its tables into bench/README.md;
a quick run writes to a temporary file unless `--out` is given.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import PYTHON, ROOT, machine_line

LIMIT_SECONDS = 420


def start(module: str, quick: bool, *extra: str) -> tuple[str, subprocess.Popen[bytes]]:
    argv = [PYTHON, "-m", f"bench.{module}", *(["--quick"] if quick else []), *extra]
    print(f"$ {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    return module, subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE)


def finish(job: tuple[str, subprocess.Popen[bytes]], deadline: float) -> str:
    module, popen = job
    try:
        out, _ = popen.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        popen.kill()
        out, _ = popen.communicate()
        return f"### {module}\n\nstopped after its time limit\n"
    if popen.returncode != 0:
        return f"### {module}\n\nfailed (exit {popen.returncode}); see the log above\n"
    return out.decode()


README = ROOT / "bench" / "README.md"
BEGIN = "<!-- results: written by `python -m bench.run_all`; edit above or below -->"
END = "<!-- end of results -->"


def into_readme(readme: str, results: str) -> str:
    """The README with its results section replaced (added at the end if it has none)."""
    section = (
        f"{BEGIN}\n\n{results.replace('# comfy-relay benchmark results', '## Results')}\n{END}"
    )
    if BEGIN in readme and END in readme:
        head, rest = readme.split(BEGIN, 1)
        return head + section + rest.split(END, 1)[1]
    return readme.rstrip() + "\n\n" + section + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run, about 2 minutes")
    parser.add_argument("--out", type=Path, default=None, help="where to write the tables")
    args = parser.parse_args()
    out = args.out
    if out is None:
        out = Path(tempfile.gettempdir()) / "comfy-relay-bench-quick.md" if args.quick else README
    started = time.monotonic()
    sections: list[str] = []

    # Memory beside calls per subscriber count, then wire bytes: they measure no CPU time.
    memory = start("memory", args.quick)
    economy = start(
        "economy", args.quick, "--part", "one", *([] if args.quick else ["--window", "15"])
    )
    sections.append(finish(economy, time.monotonic() + LIMIT_SECONDS))
    wire = start("wire_bytes", args.quick)
    sections.append(finish(wire, time.monotonic() + LIMIT_SECONDS))
    sections.append(finish(memory, time.monotonic() + LIMIT_SECONDS))

    # Many tasks (throughput), then fan-out and latency: alone.
    economy = start("economy", args.quick, "--part", "many")
    sections.append(finish(economy, time.monotonic() + LIMIT_SECONDS))
    fanout = start(
        "fanout",
        args.quick,
        "--gc",
        "--servers",
        "relay,minimal,raw",
        "--reps",
        "2",
        "--window",
        "3",
    )
    sections.append(finish(fanout, time.monotonic() + LIMIT_SECONDS))
    # 10,000 subscribers over 1,000 tasks polled every 5 s: one window of one interval per
    # run keeps the four runs (connecting 10,000 sockets each) under two minutes.
    many = ["--tasks", "100"]
    if not args.quick:
        many = ["--sizes", "10000", "--tasks", "1000", "--reps", "1", "--window", "5"]
    fanout = start("fanout", args.quick, "--gc", "--servers", "relay,minimal", *many)
    sections.append(finish(fanout, time.monotonic() + LIMIT_SECONDS))

    took = time.monotonic() - started
    command = "python -m bench.run_all" + (" --quick" if args.quick else "")
    header = (
        f"# comfy-relay benchmark results\n\n`{command}` took {took / 60:.1f} min.\n\n"
        f"Machine: {machine_line()}\n\n"
    )
    results = header + "\n".join(s.strip() + "\n" for s in sections)
    if out == README:
        results = into_readme(README.read_text(), results)
    out.write_text(results)
    print(f"\nwrote {out} ({took / 60:.1f} min)", file=sys.stderr)


if __name__ == "__main__":
    main()
