"""The house's layering, read from the installed package's import graph (docs/architecture.md).

- protocol imports nothing else of hexiao (it is shared verbatim by host and device);
- firmware imports only firmware and protocol;
- the services (hostd, and any part beside it) never import tools;
- tools is the outermost layer: the CLI, demo, benches and installers.

Every `import`/`from ... import` is read with ast, at any depth (inside functions too: a lazy
import is still an import), so the test names the offending module, line and target.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# who may import whom; a part not listed here is a service (like hostd): it may import the
# protocol and other services, never tools
RULES: dict[str, set[str]] = {
    "protocol": {"protocol"},
    "firmware": {"firmware", "protocol"},
    "udev": set(),
}
OUTERMOST = "tools"


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _parts() -> list[str]:
    # the parts the package installs (hexiao is a namespace: its folders are mapped, not found)
    return sorted(pkg.split(".")[1] for pkg in _setuptools()["package-dir"])


def _modules(part: str) -> list[tuple[str, Path, bool]]:
    pkg = importlib.import_module(f"hexiao.{part}")
    out = [(pkg.__name__, Path(pkg.__file__), True)]
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin is not None, info.name
        out.append((info.name, Path(spec.origin), info.ispkg))
    return out


def imports_of(name: str, path: Path, is_pkg: bool) -> list[tuple[int, str]]:
    """(line, absolute module) for every hexiao import in one module's source."""
    found = []
    package = name if is_pkg else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return [(line, t) for line, t in found if t == "hexiao" or t.startswith("hexiao.")]


def violations(graph: dict[str, list[tuple[str, Path, bool]]]) -> list[str]:
    bad = []
    for part, modules in graph.items():
        allowed = RULES.get(part)
        for name, path, is_pkg in modules:
            for line, target in imports_of(name, path, is_pkg):
                to = target.split(".")[1] if target.count(".") else ""
                if part == OUTERMOST or to == part:
                    continue
                if (allowed is not None and to not in allowed) or to == OUTERMOST or to == "":
                    bad.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
                               f":{line}: {name} imports {target} ({part} may not import {to})")
    return bad


def test_every_part_keeps_its_layer() -> None:
    graph = {part: _modules(part) for part in _parts()}
    assert {"protocol", "firmware", "hostd", "tools"} <= set(graph)
    assert violations(graph) == []


@pytest.mark.parametrize(("part", "target"), [
    ("hostd", "hexiao.tools.sim.relay"),
    ("protocol", "hexiao.hostd.journal"),
    ("firmware", "hexiao.hostd.redeem"),
])
def test_a_planted_wrong_way_import_is_named(tmp_path: Path, part: str, target: str) -> None:
    planted = tmp_path / part / "planted.py"
    planted.parent.mkdir()
    planted.write_text(f'"""planted"""\n\nimport os\n\n\ndef f():\n    import {target}\n')
    graph = {part: [(f"hexiao.{part}.planted", planted, False)]}
    (msg,) = violations(graph)
    assert f"hexiao.{part}.planted imports {target}" in msg and ":7:" in msg


def test_relative_imports_resolve_before_the_check(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("from ...tools import cli\nfrom . import journal\n")
    assert [t for _, t in imports_of("hexiao.hostd.tap.planted", planted, False)] == [
        "hexiao.tools", "hexiao.hostd.tap"]
    (msg,) = violations({"hostd": [("hexiao.hostd.tap.planted", planted, False)]})
    assert "imports hexiao.tools" in msg


def test_every_package_folder_is_installed() -> None:
    listed = set(_setuptools()["packages"])
    dirs = _setuptools()["package-dir"]
    on_disk = set()
    for pkg, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join((pkg, *rel)))
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - on_disk == set()
