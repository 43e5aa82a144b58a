"""Terse device builds: the firmware is compiled without the texts that explain its exceptions.

The device reports what it rejected by error code (health counters, nacks, its log ring); the
sentences that explain a code ("CRC-32 mismatch", "expected uint <= 15") are read in host logs,
and the host runs the same shared protocol code with every text in it. On the device each such
text is a str object in the heap for good: ~70 B for a 28-character one on the 64-bit unix port,
~150 of them in the device's modules. So device builds leave them out, the way MicroPython's own
small ports build with MICROPY_ERROR_REPORTING_TERSE.

Rules kept here:
- only exception texts go: the detail of `ProtocolError(code, detail)` and the message of
  `ValueError(message)`; a text is a string literal, an f-string or a `"..." % args` format;
- the exception, its class and its code stay, and so does every other expression and string (log
  lines the device keeps and sends, close reasons, tables);
- the result is what mpy-cross compiles; the source files are never changed.
"""

from __future__ import annotations

import ast

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


def terse(source: str, filename: str = "<device>") -> tuple[str, int]:
    """The device build of a module's source, and how many texts it left out."""
    tree = ast.parse(source, filename)
    strip = _Strip()
    tree = ast.fix_missing_locations(strip.visit(tree))
    return ast.unparse(tree) + "\n", strip.stripped
