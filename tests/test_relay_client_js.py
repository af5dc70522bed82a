"""The JavaScript unit tests of static/relay-client.js (tests/js/), run by Node's own runner.

Node is a test dependency like Chromium: Debian's `nodejs`, no npm package. A machine
without it fails here rather than skipping, so that the suite never passes untested.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JS_TESTS = sorted((ROOT / "tests" / "js").glob("*.test.mjs"))


@pytest.mark.timeout(120)
def test_relay_client_js_unit_tests() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("these tests need Node.js: apt-get install -y nodejs (Debian's, no npm needed)")
    assert JS_TESTS, "no tests/js/*.test.mjs"
    done = subprocess.run(
        [node, "--test", *map(str, JS_TESTS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    report = done.stdout[-6000:] + done.stderr[-3000:]
    assert done.returncode == 0, f"node --test failed:\n{report}"
    assert "# fail 0" in done.stdout, report
