"""Terse device builds: the firmware is compiled without what only the host needs.

Three things are left out of the device's build, each a str object or code object that would sit
in its heap for good (blocks of 32 B on the 64-bit unix port):
- the texts that explain exceptions. The device reports what it rejected by error code (health
  counters, nacks, its log ring); the sentences that explain a code ("CRC-32 mismatch", "expected
  uint <= 15") are read in host logs, and the host runs the same shared protocol code with every
  text in it. ~70 B per text, ~150 of them: the way MicroPython's own small ports build with
  MICROPY_ERROR_REPORTING_TERSE;
- host-only code: a block under `if sys.implementation.name != "micropython":` (and the `else:`
  of `== "micropython"`) is dead on the device, but mpy-cross cannot know: its functions and
  names would load all the same. The test is replaced by its value on the device, a module-level
  name bound to it (`_HOST = sys.implementation.name != "micropython"`) likewise, and `if` blocks
  and `a if t else b` on a constant keep only the branch taken;
- `__slots__` declarations: a CPython memory hint that MicroPython ignores, and a tuple of str
  objects on the device.

Rules kept here:
- only exception texts go: the detail of `ProtocolError(code, detail)` and the message of
  `ValueError(message)`; a text is a string literal, an f-string or a `"..." % args` format;
- the exception, its class and its code stay, and so does every other expression and string (log
  lines the device keeps and sends, close reasons, tables);
- only the literal implementation test is evaluated; nothing else is constant-folded;
- the result is what mpy-cross compiles; the source files are never changed.
"""

from __future__ import annotations

import ast
from collections import Counter

# class name -> index of the argument that is the explaining text
TEXT_ARG = {"ProtocolError": 1, "ValueError": 0}


def _is_text(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    return (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod)
            and isinstance(node.left, ast.Constant) and isinstance(node.left.value, str))


class _Strip(ast.NodeTransformer):
    def __init__(self) -> None:
        self.stripped = 0

    def visit_Call(self, node: ast.Call) -> ast.Call:
        self.generic_visit(node)
        i = TEXT_ARG.get(node.func.id) if isinstance(node.func, ast.Name) else None
        if i is None or i >= len(node.args) or not _is_text(node.args[i]):
            return node
        if not (isinstance(node.args[i], ast.Constant) and node.args[i].value == ""):
            node.args[i] = ast.copy_location(ast.Constant(""), node.args[i])
            self.stripped += 1
        return node


def _device_value(node: ast.expr) -> bool | None:
    # True/False for `sys.implementation.name ==/!= "micropython"` on the device, else None
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1
            and isinstance(node.ops[0], (ast.Eq, ast.NotEq))):
        return None
    left, right = node.left, node.comparators[0]
    if (ast.unparse(left) != "sys.implementation.name"
            or not isinstance(right, ast.Constant) or right.value != "micropython"):
        return None
    return isinstance(node.ops[0], ast.Eq)


class _DeviceOnly(ast.NodeTransformer):
    """Host-only branches out, __slots__ out (see the module's header)."""

    def __init__(self, names: dict[str, bool]) -> None:
        self.names = names

    def visit_Compare(self, node: ast.Compare) -> ast.expr:
        value = _device_value(node)
        return node if value is None else ast.copy_location(ast.Constant(value), node)

    def visit_Name(self, node: ast.Name) -> ast.expr:
        if isinstance(node.ctx, ast.Load) and node.id in self.names:
            return ast.copy_location(ast.Constant(self.names[node.id]), node)
        return node

    def visit_If(self, node: ast.If) -> ast.AST | list[ast.stmt]:
        self.generic_visit(node)
        if isinstance(node.test, ast.Constant) and isinstance(node.test.value, bool):
            return (node.body if node.test.value else node.orelse) or [ast.Pass()]
        return node

    def visit_IfExp(self, node: ast.IfExp) -> ast.expr:
        self.generic_visit(node)
        if isinstance(node.test, ast.Constant) and isinstance(node.test.value, bool):
            return node.body if node.test.value else node.orelse
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        self.generic_visit(node)
        node.body = [s for s in node.body if not _is_slots(s)] or [ast.Pass()]
        return node


def _is_slots(stmt: ast.stmt) -> bool:
    return (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name) and stmt.targets[0].id == "__slots__")


def _flag_names(tree: ast.Module) -> dict[str, bool]:
    # module-level names bound once, to the implementation test: their value on the device
    bound = Counter(node.id for node in ast.walk(tree) if isinstance(node, ast.Name)
                    and isinstance(node.ctx, ast.Store))
    out = {}
    for stmt in tree.body:
        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)):
            value = _device_value(stmt.value)
            if value is not None and bound[stmt.targets[0].id] == 1:
                out[stmt.targets[0].id] = value
    return out


def terse(source: str, filename: str = "<device>") -> tuple[str, int]:
    """The device build of a module's source, and how many exception texts it left out."""
    tree = ast.parse(source, filename)
    strip = _Strip()
    tree = strip.visit(tree)
    tree = _DeviceOnly(_flag_names(tree)).visit(tree)
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n", strip.stripped
