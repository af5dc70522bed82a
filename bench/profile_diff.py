"""Where the relay spends more than the minimal server: two py-spy profiles, per message.

    python -m bench.profile_diff DIR/fanout-relay-sse-1000 DIR/fanout-minimal-sse-1000

Each argument names the files `bench.fanout --profile DIR` wrote (`.txt`: collapsed
stacks; `.top.txt`: its first line holds the CPU µs per message measured without py-spy).
Prints per function the self time in µs per delivered message in each profile and the
difference, largest first, and the relay's own modules (relay/*) with inclusive times.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .common import collapsed_samples


def load(stem: str) -> tuple[dict[str, float], dict[str, float], float]:
    """Self and inclusive µs per message by function, and the measured µs per message."""
    header = Path(stem + ".top.txt").read_text().splitlines()[0]
    match = re.search(r"; ([\d.]+) µs", header)
    us_per_msg = float(match.group(1)) if match else 0.0
    own, inclusive, total = collapsed_samples(Path(stem + ".txt").read_text(), full_path=True)
    scale = us_per_msg / max(total, 1)
    return (
        {k: v * scale for k, v in own.items()},
        {k: v * scale for k, v in inclusive.items()},
        us_per_msg,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("relay", help="profile stem, e.g. /tmp/prof/fanout-relay-sse-1000")
    parser.add_argument("minimal", help="profile stem, e.g. /tmp/prof/fanout-minimal-sse-1000")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    r_own, r_inc, r_us = load(args.relay)
    m_own, _, m_us = load(args.minimal)
    print(f"relay {r_us:.1f} µs/msg, minimal {m_us:.1f} µs/msg, difference {r_us - m_us:.1f}\n")
    print("self µs/msg:   relay  minimal   diff  function")
    names = set(r_own) | set(m_own)
    diffs = sorted(names, key=lambda k: -(r_own.get(k, 0) - m_own.get(k, 0)))
    for name in diffs[: args.top]:
        a, b = r_own.get(name, 0.0), m_own.get(name, 0.0)
        print(f"{'':13}{a:7.2f}  {b:7.2f}  {a - b:+6.2f}  {name}")
    print("\nthe relay's own code, inclusive µs/msg:")
    for name, value in sorted(r_inc.items(), key=lambda kv: -kv[1]):
        if "relay/" in name and value >= 0.1:
            print(f"{value:7.2f}  {name}")


if __name__ == "__main__":
    main()
