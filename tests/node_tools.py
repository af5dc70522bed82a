"""Node, npm and the npm tools of tests/node/ (TypeScript, preact, @types/react) for the tests.

Like Chromium, Node and npm are test dependencies (`.ci/run` installs them, and runs
`npm ci --prefix tests/node`). A test that needs them fails without them, never skips, so
that the suite cannot pass untested. When tests/node/node_modules is missing or does not
match the lockfile, `node_tools()` runs `npm ci` itself.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE_TOOLS = ROOT / "tests" / "node"


def executable(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"this test needs {name}: apt-get install -y nodejs npm (see .ci/run)")
    return found


def run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command; fail the test with its output when it fails."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited with {done.returncode} in {cwd}:\n"
            f"{done.stdout[-6000:]}\n{done.stderr[-4000:]}"
        )
    return done


def _installed_matches_lock() -> bool:
    lock = NODE_TOOLS / "package-lock.json"
    installed = NODE_TOOLS / "node_modules" / ".package-lock.json"
    if not installed.exists():
        return False
    wanted = json.loads(lock.read_text())["packages"]
    have = json.loads(installed.read_text())["packages"]
    return all(
        have.get(path, {}).get("version") == entry.get("version")
        for path, entry in wanted.items()
        if path
    )


def node_tools() -> Path:
    """tests/node/node_modules, installed from the lockfile if it is not already."""
    if not _installed_matches_lock():
        run([executable("npm"), "ci", "--no-audit", "--no-fund"], NODE_TOOLS, timeout=300)
    return NODE_TOOLS / "node_modules"


def pinned(package: str) -> str:
    """The version of an npm tool that tests/node/package.json pins."""
    manifest = json.loads((NODE_TOOLS / "package.json").read_text())
    version = manifest["devDependencies"][package]
    assert isinstance(version, str)
    return version
