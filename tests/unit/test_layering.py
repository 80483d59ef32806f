"""Layering rules (DESIGN.md): the agent imports only the stdlib, policy does no I/O, clients reach the
daemon only through its API. .importlinter holds the package-level contracts; these tests add what
import-linter cannot say (stdlib-only, no I/O calls) and run lint-imports itself."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "corral"


def _imports(tree: ast.AST, skip_type_checking: bool = False) -> list[tuple[int, str, int]]:
    """(line, module, level) of every import, including those inside functions."""
    out: list[tuple[int, str, int]] = []

    def visit(node: ast.AST) -> None:
        if skip_type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, 0) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, node.module or "", node.level))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _files(package: str) -> list[Path]:
    files = sorted((SRC / package).glob("*.py"))
    assert files, f"no modules in {package}"
    return files


# ---- the agent: stdlib only ----------------------------------------------------------------------
def _not_stdlib(source: str) -> list[str]:
    bad = []
    for line, mod, level in _imports(ast.parse(source)):
        top = mod.split(".")[0]
        if level or top == "protocol":
            continue  # the sibling: `import protocol` (it ships as loose files) or a relative import
        if top == "__future__" or top in sys.stdlib_module_names:
            continue
        bad.append(f"{line}: {mod}")
    return bad


@pytest.mark.parametrize("path", _files("agent"), ids=lambda p: p.name)
def test_agent_imports_only_the_stdlib(path: Path) -> None:
    """The agent ships as loose files into images that have no corral (and maybe no Python)."""
    bad = _not_stdlib(path.read_text())
    assert not bad, f"{path.name} must import only the stdlib and its sibling protocol: {bad}"


def test_the_stdlib_check_catches_non_stdlib_imports() -> None:
    src = ("import os\nimport protocol\nfrom . import protocol\nimport corral.errors\n"
           "def f():\n    import pydantic\n    from corral import errors\n")
    assert _not_stdlib(src) == ["4: corral.errors", "6: pydantic", "7: corral"]


def test_agent_relative_imports_stay_in_the_agent() -> None:
    for path in _files("agent"):
        for line, _mod, level in _imports(ast.parse(path.read_text())):
            assert level <= 1, f"{path.name}:{line} reaches outside corral.agent"


def test_agent_imports_protocol_as_a_loose_file() -> None:
    mods = {mod for _, mod, _ in _imports(ast.parse((SRC / "agent" / "agent.py").read_text()))}
    assert "protocol" in mods and not any(m.startswith("corral") for m in mods)


# ---- policy: pure --------------------------------------------------------------------------------
IO_MODULES = {
    "os", "subprocess", "socket", "pathlib", "shutil", "io", "tempfile", "glob", "fileinput", "ctypes", "mmap",
    "fcntl", "select", "selectors", "asyncio", "threading", "multiprocessing", "concurrent", "signal", "resource",
    "sqlite3", "dbm", "shelve", "pickle", "urllib", "http", "ssl", "ftplib", "smtplib", "logging", "sys",
    "sqlalchemy", "httpx", "fastapi", "starlette", "uvicorn", "websockets", "requests",
}
IO_BUILTINS = {"open", "print", "input", "exec", "eval", "compile", "__import__", "breakpoint"}


@pytest.mark.parametrize("path", _files("policy"), ids=lambda p: p.name)
def test_policy_imports_no_io_modules(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    bad = [f"{path.name}:{line}: {mod}" for line, mod, level in _imports(tree, skip_type_checking=True)
           if not level and mod.split(".")[0] in IO_MODULES]
    assert not bad, f"corral.policy is pure (no I/O); move this to a runtime: {bad}"
    for line, mod, level in _imports(tree, skip_type_checking=True):
        top = mod.split(".")[0]
        assert level or top in sys.stdlib_module_names or top in {"__future__", "pydantic", "corral"}, \
            f"{path.name}:{line}: {mod}"
        if top == "corral":
            # corral.errors is pure too: policy raises PolicyRejectedError from it.
            assert mod.startswith("corral.policy") or mod == "corral.errors", f"{path.name}:{line}: policy imports {mod}"


@pytest.mark.parametrize("path", _files("policy"), ids=lambda p: p.name)
def test_policy_calls_no_io_builtins(path: Path) -> None:
    calls = [f"{path.name}:{n.lineno}: {n.func.id}()" for n in ast.walk(ast.parse(path.read_text()))
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in IO_BUILTINS]
    assert not calls


def test_type_checking_imports_are_allowed_in_policy() -> None:
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pathlib import Path\n"
                     "else:\n    import os\n")
    assert [m for _, m, _ in _imports(tree, skip_type_checking=True)] == ["typing", "os"]


# ---- import-linter -------------------------------------------------------------------------------
def _lint_imports() -> str:
    exe = Path(sys.executable).parent / "lint-imports"
    found = str(exe) if exe.exists() else shutil.which("lint-imports")
    if not found:
        pytest.fail("lint-imports is not installed (pip install import-linter)")
    return found


def test_import_linter_contracts_are_kept() -> None:
    r = subprocess.run([_lint_imports(), "--no-cache", "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_import_linter_config_has_the_layering_contracts() -> None:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / ".importlinter")
    assert cfg["importlinter"]["root_package"] == "corral"
    contracts = {s.split(":", 2)[2]: cfg[s] for s in cfg.sections() if s.startswith("importlinter:contract:")}
    assert {"agent-stdlib-only", "policy-pure", "sdk-through-api", "cli-through-api", "runtimes-below-daemon",
            "execguard-below-daemon", "network-below-daemon"} <= set(contracts)
    assert all(c["type"] == "forbidden" for c in contracts.values())
    cli_forbidden = contracts["cli-through-api"]["forbidden_modules"].split()
    assert {"corral.daemon", "corral.runtimes"} <= set(cli_forbidden)
    assert set(contracts["cli-through-api"]["ignore_imports"].split("\n")) - {""} == {
        "corral.cli.** -> corral.daemon.main", "corral.cli.** -> corral.daemon.settings",
        "corral.cli.** -> corral.runtimes.probe"}
