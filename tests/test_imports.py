"""Every module imports on its own, the package has no import cycle, and the version has one home."""

from __future__ import annotations

import ast
import configparser
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Set

import holysheep_lb
from holysheep_lb import _version

PACKAGE_DIR = Path(holysheep_lb.__file__).resolve().parent
ROOT = PACKAGE_DIR.parent
# Optional extras: a module that needs one may refuse to import without it, with an ImportError saying so.
OPTIONAL = {"holysheep_lb.contrib.prometheus": "prometheus_client", "holysheep_lb.contrib.redis": "redis"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_at_load(name: str, path: Path) -> Set[str]:
    """The package modules ``name`` imports while it loads (not in functions, not for type checking)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: Set[str] = set()

    def visit(body: List[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                submodules = {f"{target}.{a.name}" for a in node.names} & set(MODULES)
                found.update(submodules)
                if target in MODULES and len(submodules) < len(node.names):  # a name defined in target itself
                    found.add(target)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in MODULES)
            elif isinstance(node, ast.If) and not _is_type_checking(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    found.discard(name)
    return found


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Each cycle in ``graph``, found by depth-first search, as the path that closes it."""
    cycles: List[List[str]] = []
    done: Set[str] = set()

    def walk(node: str, path: List[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                walk(nxt, path + [nxt])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            walk(start, [start])
    return cycles


def test_no_module_imports_a_module_that_imports_it_back():
    graph = {name: _imported_at_load(name, path) for name, path in MODULES.items()}
    assert graph["holysheep_lb"] >= {"holysheep_lb.client", "holysheep_lb._version"}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_the_version_lives_in_its_own_module_and_the_package_re_exports_it():
    assert holysheep_lb.__version__ == _version.__version__
    assert _imported_at_load("holysheep_lb._version", MODULES["holysheep_lb._version"]) == set()
    for name, path in MODULES.items():
        if name != "holysheep_lb":
            assert "import __version__" not in path.read_text(encoding="utf-8").replace(
                "from ._version import __version__", "").replace("from .._version import __version__", ""), name


def test_setup_cfg_reads_the_version_without_importing_the_package():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg", encoding="utf-8")
    assert parser["metadata"]["version"] == "attr: holysheep_lb._version.__version__"


def test_init_needs_no_import_order_exemption():
    assert "noqa" not in (PACKAGE_DIR / "__init__.py").read_text(encoding="utf-8")


# One child interpreter imports each module with a fresh copy of the package (every
# holysheep_lb module dropped from sys.modules first), so a cycle that only bites when a
# given module is imported first shows; third-party imports stay cached, which keeps it fast.
_IMPORT_EACH = textwrap.dedent("""
    import importlib, json, sys, traceback
    names, optional = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    failed = {}
    for name in names:
        for loaded in [m for m in sys.modules if m == "holysheep_lb" or m.startswith("holysheep_lb.")]:
            del sys.modules[loaded]
        try:
            importlib.import_module(name)
        except ImportError as exc:
            if not (name in optional and optional[name] in str(exc)):
                failed[name] = traceback.format_exc()
        except Exception:
            failed[name] = traceback.format_exc()
    print(json.dumps(failed))
""")


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=str(ROOT), capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_every_module_imports_first_in_a_fresh_package():
    names = sorted(set(MODULES) - {"holysheep_lb.__main__"})  # importing it runs the command line
    proc = _run(_IMPORT_EACH, json.dumps(names), json.dumps(OPTIONAL))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {}


def test_the_modules_that_read_the_version_import_alone_in_a_fresh_interpreter():
    code = ("import holysheep_lb.transport, holysheep_lb.cli, sys; "
            "assert holysheep_lb.transport.USER_AGENT == 'holysheep-lb/' + holysheep_lb.__version__")
    for first in ("holysheep_lb.transport", "holysheep_lb.client"):
        proc = _run(f"import {first}; {code}")
        assert proc.returncode == 0, proc.stderr
