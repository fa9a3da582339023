"""Guards the source layout: the namespace mapping and the component boundaries."""

from __future__ import annotations

import ast
import importlib
import operator
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("acceptor", "sidecar", "operator")


def test_operator_folder_is_not_a_top_level_package() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    # The standard library's operator module must still be the one Python finds,
    # also when the repository root is the working directory.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import operator; print(operator.__file__); print(operator.add(2, 3))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "site-packages" not in out[0] and str(ROOT / "operator") not in out[0]
    assert out[1] == "5"
    assert operator.itemgetter(1)([0, 7]) == 7


def test_package_dir_mapping_is_explicit() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg["package-dir"]
    assert mapping["backdial"] == "src/backdial"
    for comp in COMPONENTS:
        assert mapping[f"backdial.{comp}"] == f"{comp}/backdial/{comp}"
        assert (ROOT / mapping[f"backdial.{comp}"] / "__init__.py").is_file()
        assert f"backdial.{comp}" in cfg["packages"]
    # backdial is a namespace split over source roots: no __init__ in any portion.
    assert not (ROOT / "src/backdial/__init__.py").exists()
    for comp in COMPONENTS:
        assert not (ROOT / comp / "backdial" / "__init__.py").exists()
    # Every package directory on disk is listed, so nothing is silently left out of a wheel.
    listed = set(cfg["packages"])
    for init in ROOT.glob("src/backdial/**/__init__.py"):
        rel = init.parent.relative_to(ROOT / "src").as_posix().replace("/", ".")
        assert rel in listed, f"{rel} missing from [tool.setuptools] packages"


def test_components_import_from_the_mapped_folders() -> None:
    for comp in COMPONENTS:
        mod = importlib.import_module(f"backdial.{comp}")
        assert Path(mod.__file__ or "").resolve().parent == ROOT / comp / "backdial" / comp


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_components_never_import_each_other() -> None:
    for comp in COMPONENTS:
        for path in (ROOT / comp).rglob("*.py"):
            for name in _imports(path):
                for other in COMPONENTS:
                    if other != comp:
                        assert not name.startswith(f"backdial.{other}"), f"{path} imports {name}"


def test_shared_code_does_not_import_components() -> None:
    # Only the console-script dispatcher may name components (it imports them lazily).
    for path in (ROOT / "src" / "backdial").rglob("*.py"):
        if path.name == "cli.py" and path.parent.name == "backdial":
            continue
        for name in _imports(path):
            for comp in COMPONENTS:
                assert not name.startswith(f"backdial.{comp}"), f"{path} imports {name}"


def test_bad_flags_exit_1_with_one_line() -> None:
    for args in (
        ["acceptor", "--bogus"],
        ["sidecar", "--workers", "0"],
        ["sidecar", "--max-request-body", "1x"],
        ["sidecar", "--proxy-protocol"],  # whose PROXY headers to believe?
        ["sidecar", "--trusted-proxies", "10.0.0.0/33"],
        ["up", "--sessions", "0"],
        ["route", "frobnicate"],
        ["crd", "--bogus"],
        ["serve", "backdial.demo:app"],  # neither --register nor --listen
    ):
        out = subprocess.run(
            [sys.executable, "-m", "backdial.cli", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1, (args, out.stderr)
        assert len(lines) == 1 and "error" in lines[0], (args, out.stderr)


# Role names that mean the same thing in every component (its entry point, its
# admin endpoint, its settings); any other module name exists once.
_SAME_ROLE = {"__init__", "main", "admin", "config"}


def _modules() -> list[Path]:
    roots = [ROOT / "src" / "backdial", *(ROOT / comp / "backdial" for comp in COMPONENTS)]
    return sorted(p for root in roots for p in root.rglob("*.py"))


def test_module_names_are_unique_across_components() -> None:
    seen: dict[str, Path] = {}
    for path in _modules():
        if path.stem in _SAME_ROLE:
            continue
        assert path.stem not in seen, f"{path} and {seen[path.stem]} share a name"
        seen[path.stem] = path


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[1:]  # drop the source root (src, acceptor, sidecar, operator)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycles_between_modules() -> None:
    """Also imports under TYPE_CHECKING: a cycle there is a design cycle all the same."""
    graph: dict[str, set[str]] = {}
    for path in _modules():
        name = _module_name(path)
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                deps.add(base)
                deps.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = deps
    edges = {name: {d for d in deps if d in graph and d != name} for name, deps in graph.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_bad_env_values_exit_1_with_one_line() -> None:
    # Environment values are parsed like flags: a bad one is one line, never a traceback.
    for name, value, command in (
        ("BACKDIAL_WORKERS", "x", "sidecar"),
        ("BACKDIAL_DRAIN_TIMEOUT", "soon", "sidecar"),
        ("BACKDIAL_RELOAD_INTERVAL", "fast", "acceptor"),
        ("BACKDIAL_CONTROL_UIDS", "nosuchuser", "acceptor"),
        ("BACKDIAL_PORT", "x", "up"),
        ("BACKDIAL_SESSIONS", "many", "up"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "backdial.cli", command],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, name: value},
        )
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1, (name, out.stderr)
        assert len(lines) == 1 and "error" in lines[0], (name, out.stderr)


# Folders of tests of the whole system or of a shipped artifact rather than a source root.
_SYSTEM_TESTS = {"stack", "k8s", "image", "chart", "bench"}


def test_test_folders_mirror_the_source_roots() -> None:
    roots = {"shared": ROOT / "src" / "backdial"} | {
        comp: ROOT / comp / "backdial" / comp for comp in COMPONENTS
    }
    for folder in sorted(p for p in (ROOT / "tests").iterdir() if p.is_dir()):
        if folder.name in _SYSTEM_TESTS or folder.name.startswith((".", "__")):
            continue
        assert folder.name in roots, f"tests/{folder.name} mirrors no source root"
        for sub in (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("__")):
            assert (roots[folder.name] / sub.name).is_dir(), f"{sub} mirrors no package"


def test_the_test_command_checks_lint_format_and_types_first() -> None:
    script = (ROOT / "scripts" / "test").read_text()
    checks = ["ruff check .", "ruff format --check .", "mypy"]
    positions = [script.find(f"python3 -m {check}") for check in checks]
    assert all(p >= 0 for p in positions), positions
    assert max(positions) < script.find('pytest "$@"'), "checks must run before pytest"
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert mypy["strict"] is True


def test_the_request_path_in_the_docs_names_real_code() -> None:
    """docs/architecture.md walks a request through Class.method names: they must exist."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    section = doc.partition("## The path of one request")[2].partition("\n## ")[0]
    named = set(re.findall(r"\b([A-Z][A-Za-z]+)\.([a-z_][a-z_]*)\b", section))
    assert len(named) > 20, named
    sources = {p: p.read_text() for p in _modules()}
    for cls, attr in sorted(named):
        homes = [text for text in sources.values() if re.search(rf"^class {cls}\b", text, re.M)]
        assert homes, f"docs name {cls}.{attr}: no class {cls}"
        assert any(
            re.search(rf"^\s+(async )?def {attr}\b|^\s+{attr}[:=]", text, re.M) for text in homes
        ), f"docs name {cls}.{attr}: {cls} has no {attr}"
