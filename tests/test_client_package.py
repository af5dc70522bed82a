"""static/relay-client.js as the npm package comfy-relay-client, checked as a user gets it.

`npm pack` packs static/ (its package.json says what goes in); the tarball is installed into
an empty project with TypeScript and @types/react from the npm registry (the versions
tests/node pins); tsc type-checks a consumer (tests/js/package/consumer.ts) and the React
example (examples/react/) under --strict, with Node's and a bundler's module resolution;
Node imports the installed package. Needs node and npm: fails without them, never skips.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay import __version__

from .node_tools import ROOT, executable, node_tools, pinned, run

STATIC = ROOT / "static"
CONSUMER = ROOT / "tests" / "js" / "package" / "consumer.ts"
EXAMPLE = ROOT / "examples" / "react" / "useTaskProgress.ts"
PACKAGE = "comfy-relay-client"
EXPECT_ERROR = "// @ts-expect-error"
PACKED_READ = ("relay-client.js", "package.json")
TSC_ERROR = re.compile(r"^src/consumer\.ts\((\d+),\d+\): error (TS\d+)", re.M)

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Packed:
    tarball: Path
    files: frozenset[str]


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Packed:
    """`npm pack` of static/."""
    out = tmp_path_factory.mktemp("pack")
    done = run([executable("npm"), "pack", "--json", "--pack-destination", str(out)], STATIC)
    [report] = json.loads(done.stdout)
    return Packed(out / report["filename"], frozenset(f["path"] for f in report["files"]))


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, packed: Packed) -> Iterator[Path]:
    """An empty TypeScript project with the tarball installed, as a user would."""
    node_tools()  # pinned versions, and npm's cache warmed with them
    project = tmp_path_factory.mktemp("app")
    (project / "package.json").write_text(
        json.dumps({"name": "app", "private": True, "type": "module"})
    )
    run(
        [
            executable("npm"),
            "install",
            "--no-audit",
            "--no-fund",
            "--prefer-offline",
            str(packed.tarball),
            f"typescript@{pinned('typescript')}",
            f"@types/react@{pinned('@types/react')}",
        ],
        project,
        timeout=300,
    )
    src = project / "src"
    src.mkdir()
    (src / "consumer.ts").write_text(CONSUMER.read_text())
    (src / "useTaskProgress.ts").write_text(EXAMPLE.read_text())
    names = runtime_exports(project)
    (src / "runtime-exports.ts").write_text(
        f"export type RuntimeExports = {' | '.join(json.dumps(n) for n in names)};\n"
    )
    for resolution, module in (("nodenext", "nodenext"), ("bundler", "esnext")):
        config = {
            "compilerOptions": {
                "strict": True,
                "noEmit": True,
                "target": "es2022",
                "lib": ["es2022", "dom"],
                "module": module,
                "moduleResolution": resolution,
                "types": [],
                "skipLibCheck": False,
                "exactOptionalPropertyTypes": True,
                "noUncheckedIndexedAccess": True,
                "verbatimModuleSyntax": True,
            },
            "files": ["src/consumer.ts", "src/useTaskProgress.ts"],
        }
        (project / f"tsconfig.{resolution}.json").write_text(json.dumps(config, indent=2))
    yield project


def runtime_exports(project: Path) -> list[str]:
    script = f'const m = await import("{PACKAGE}"); console.log(JSON.stringify(Object.keys(m)));'
    done = run([executable("node"), "--input-type=module", "-e", script], project)
    names = json.loads(done.stdout)
    assert isinstance(names, list) and names, done.stdout
    return sorted(names)


def tsc(project: Path, config: str) -> tuple[int, str]:
    done = subprocess.run(
        [executable("node"), "node_modules/typescript/bin/tsc", "-p", config, "--pretty", "false"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=240,
    )
    return done.returncode, done.stdout + done.stderr


def test_the_package_is_the_served_module_and_its_declarations(packed: Packed) -> None:
    assert packed.files == {"package.json", "relay-client.js", "relay-client.d.ts"}
    with tarfile.open(packed.tarball) as tar:
        module, package_json = (tar.extractfile(f"package/{n}") for n in PACKED_READ)
        assert module is not None and package_json is not None
        assert module.read() == (STATIC / "relay-client.js").read_bytes()
        manifest = json.load(package_json)
    assert manifest["name"] == PACKAGE
    assert manifest["version"] == __version__, "the client's version is the relay's"
    assert manifest["type"] == "module"
    entry = manifest["exports"]["."]
    assert next(iter(entry)) == "types", "TypeScript reads the first matching condition"
    assert entry == {"types": "./relay-client.d.ts", "default": "./relay-client.js"}
    assert not manifest.get("dependencies"), "the client has no dependencies"
    assert "private" not in manifest


def test_node_imports_the_installed_package(app: Path) -> None:
    script = """
        import { ProgressSmoother, RelayClient, isValidTaskId, subscribe }
            from "comfy-relay-client";
        const smoother = new ProgressSmoother();
        smoother.update({ status: "running", progress: 0.5, etaRelative: 10 }, 0);
        const client = new RelayClient("http://relay.test/base");
        console.log(JSON.stringify({
            moved: smoother.valueAt(1000),
            done: smoother.update({ status: "succeeded" }, 2000),
            base: client.baseUrl,
            state: client.connectionState(),
            valid: isValidTaskId("01j5t2qx82323pswaqykz9eq4"),
            subscribe: typeof subscribe,
        }));
        client.close();
    """
    done = run([executable("node"), "--input-type=module", "-e", script], app)
    result = json.loads(done.stdout)
    assert 0.5 < result["moved"] < 0.6
    assert result["done"] == 1
    assert result["base"] == "http://relay.test/base/"
    assert result["state"] == {"state": "idle", "sse": "idle", "ws": "idle"}
    assert result["valid"] is True
    assert result["subscribe"] == "function"


@pytest.mark.parametrize("resolution", ["nodenext", "bundler"])
def test_a_consumer_type_checks_under_strict(app: Path, resolution: str) -> None:
    """Every declared type as documented, the exports exactly the module's, no `any`."""
    code, output = tsc(app, f"tsconfig.{resolution}.json")
    assert code == 0, output


def test_the_lines_that_must_be_errors_are_errors(app: Path) -> None:
    """Without their `@ts-expect-error`, tsc reports an error at each of those lines, and only."""
    lines = (app / "src" / "consumer.ts").read_text().splitlines()
    expected = {number + 1 for number, line in enumerate(lines, 1) if line.startswith(EXPECT_ERROR)}
    assert len(expected) >= 15
    unchecked = [line.replace(EXPECT_ERROR, "// expected error") for line in lines]
    (app / "src" / "consumer.ts").write_text("\n".join(unchecked) + "\n")
    try:
        code, output = tsc(app, "tsconfig.nodenext.json")
    finally:
        (app / "src" / "consumer.ts").write_text(CONSUMER.read_text())
    assert code != 0
    reported = {int(line) for line, _ in TSC_ERROR.findall(output)}
    assert reported == expected, output


def test_no_any_in_the_declarations() -> None:
    source = (STATIC / "relay-client.d.ts").read_text()
    code = re.sub(r"/\*.*?\*/|//[^\n]*", "", source, flags=re.S)
    assert not re.search(r"\bany\b", code)
    assert "export declare class RelayClient" in code
