"""The shape the package keeps: no import cycle (imports inside functions count), no module over 450 lines, no class
over 200, and PEFT's tuners named nowhere outside the PEFT wing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "converter"
MODULE_LINES, CLASS_LINES = 450, 200


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package ``name`` imports, at any depth of its code (``from . import x``: ``pkg.x``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = f"{base}.{node.module}" if node.module else base
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found.update(subs or [target])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("converter"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("converter"))
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package's __init__ re-exporting its submodules is no cycle of theirs: a submodule importing a sibling
    # passes through the package only when it names the package itself.
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_no_module_or_class_too_long():
    long_modules, long_classes = [], []
    for name, path in _modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MODULE_LINES:
            long_modules.append(f"{name} ({len(text.splitlines())})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > CLASS_LINES:
                long_classes.append(f"{name}.{node.name} ({node.end_lineno - node.lineno + 1})")
    assert (long_modules, long_classes) == ([], [])


def test_no_tuner_is_named_outside_the_peft_wing():
    """Adding a tuner PEFT can merge needs no change outside converter/peft/: nothing else names one's tensors."""
    names = re.compile(
        r"\b(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|hada_\w+|lokr_\w+|ia3_l|oft_R|vera_\w+)\b"
    )
    found = []
    for name, path in _modules().items():
        if not name.startswith("converter.peft"):
            found += [f"{name}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if names.search(line)]
    assert found == []
