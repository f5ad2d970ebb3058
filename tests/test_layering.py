"""The import graph of ``src/essa``: no cycles (function-local imports included), and the building blocks
(``ssl``, ``tuners``, ``data``) import nothing from the layers that use them."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
#: The layers above the building blocks (ssl, tuners, data), which these must not import.
UPPER = ("essa.train", "essa.evaluate", "essa.study", "essa.report", "essa.commands", "essa.adaptation",
         "essa.finetuning", "essa.bench")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "essa").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the essa modules it imports anywhere in its body (``from essa.a import b`` counts as
    ``essa.a.b`` when that is a module, else ``essa.a``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target.startswith("essa"):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _parents(module: str) -> set[str]:
    """A package's ``__init__`` may import its own submodules; a module importing its package is not a cycle we
    report here (Python runs the package first)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycles():
    graph = import_graph()
    # edges from a module to its own packages are how Python loads packages, not a dependency of the module
    graph = {m: {t for t in targets if t not in _parents(m)} for m, targets in graph.items()}
    assert cycles(graph) == []


def test_the_graph_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("block", ["essa.ssl", "essa.tuners", "essa.data"])
def test_building_blocks_import_nothing_from_the_layers_above(block):
    graph = import_graph()
    upward = sorted((m, t) for m, targets in graph.items() if m == block or m.startswith(block + ".")
                    for t in targets if any(t == u or t.startswith(u + ".") for u in UPPER))
    assert upward == []


def test_the_command_parser_imports_no_torch():
    """``essa --help``, ``essa data inspect --help`` and ``essa tuners --help`` build the whole parser: it must not
    import torch, timm or peft (seconds on a cold start)."""
    import subprocess
    import sys

    code = ("import sys; from essa.commands import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'timm', 'peft', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_import_essa_is_light_and_its_submodules_load_on_first_use():
    import subprocess
    import sys

    code = ("import sys, essa; light = 'torch' not in sys.modules; "
            "model = essa.backbones.create('vit_tiny_patch16_224', pretrained=False, img_size=16, patch_size=8, "
            "depth=1); print(light, type(model).__name__, callable(essa.tuners.apply), "
            "hasattr(essa, 'nonsense'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "VisionTransformer", "True", "False"]
