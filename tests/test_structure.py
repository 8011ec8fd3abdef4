"""The layering, read from the source (docs/architecture.md): what may import what, no import cycles, and
project imports inside functions only where they keep a heavy optional dependency off a path that does not
need it. Every ``import`` statement counts, at module level or inside a function, and so does every
``require("module")`` (edge_emollama/lazy.py)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"edge_emollama": ROOT / "edge_emollama", "edge_emollama.export": ROOT / "export",
            "edge_emollama.runtime": ROOT / "runtime"}
TORCH = {"torch", "transformers", "tensorrt"}               # never on the runtime's path
HEAVY = TORCH | {"onnx", "gguf", "sentencepiece", "safetensors", "pyaudio", "faster_whisper"}
TOOLS_AND_EXPORT = ("edge_emollama.export", "edge_emollama.reference", "edge_emollama.tools")


def _modules() -> dict:
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "edge_emollama" and parts and parts[0] in ("export", "runtime"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


class _Imports(ast.NodeVisitor):
    """(target, inside a function) for every import of one module; targets are project modules or the
    top-level names of outside packages."""

    def __init__(self, name: str, path: Path):
        self.name, self.package = name, name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.found, self._depth = [], 0

    def _function(self, node):
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, target: str):
        self.found.append((target, self._depth > 0))

    def _project(self, dotted: str, names=()):
        for name in names:
            if f"{dotted}.{name}" in MODULES:
                self._add(f"{dotted}.{name}")
        if dotted in MODULES:
            self._add(dotted)

    def visit_Import(self, node):
        for alias in node.names:
            if alias.name.startswith("edge_emollama"):
                self._project(alias.name)
            else:
                self._add(alias.name.split(".")[0])

    def visit_ImportFrom(self, node):
        if node.level == 0:
            if node.module.startswith("edge_emollama"):
                self._project(node.module, [a.name for a in node.names])
            elif node.module != "__future__":
                self._add(node.module.split(".")[0])
            return
        base = self.package.split(".")
        base = base[:len(base) - (node.level - 1)]
        dotted = ".".join(base + ([node.module] if node.module else []))
        self._project(dotted, [a.name for a in node.names])

    def visit_Call(self, node):
        if isinstance(node.func, ast.Name) and node.func.id == "require" and node.args \
                and isinstance(node.args[0], ast.Constant):
            self._add(str(node.args[0].value).split(".")[0])
        self.generic_visit(node)


def _imports() -> dict:
    graph = {}
    for name, path in MODULES.items():
        visitor = _Imports(name, path)
        visitor.visit(ast.parse(path.read_text(), str(path)))
        graph[name] = visitor.found
    return graph


GRAPH = _imports()


def _closure(start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += [t for t, _ in GRAPH.get(module, ()) if t in MODULES]
    return seen


def _external(modules: set) -> set:
    return {t for m in modules for t, _ in GRAPH[m] if t not in MODULES}


def _in(module: str, packages) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_graph_is_read():
    assert len(MODULES) > 40 and "edge_emollama.runtime.pipeline" in MODULES
    assert ("edge_emollama.runtime.stages", False) in GRAPH["edge_emollama.runtime.pipeline"]
    assert "torch" in _external({"edge_emollama.reference.model"})


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in(m, ["edge_emollama.runtime"])))
def test_the_runtime_imports_no_exporter_reference_tools_or_torch(module):
    reached = _closure(module)
    assert not [m for m in reached if _in(m, TOOLS_AND_EXPORT)], f"{module} reaches {sorted(reached)}"
    assert not _external(reached) & TORCH


def test_the_reference_does_not_import_the_runtime():
    for module in (m for m in MODULES if _in(m, ["edge_emollama.reference"])):
        assert not [m for m in _closure(module) if _in(m, ["edge_emollama.runtime"])], module


def test_clients_and_contracts_stay_light():
    """What an integrator imports (the client, the wire protocol, the manifest) needs neither the runtime's
    stages nor torch."""
    for module in ("edge_emollama.client", "edge_emollama.protocol", "edge_emollama.manifest"):
        reached = _closure(module)
        assert not [m for m in reached if _in(m, ("edge_emollama.runtime",) + TOOLS_AND_EXPORT)], module
        assert not _external(reached) & HEAVY


def test_no_import_cycles():
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def connect(v):   # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in {t for t, _ in GRAPH[v] if t in MODULES}:
            if w not in index:
                connect(w)
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
                cycles.append(sorted(component))

    for module in MODULES:
        if module not in index:
            connect(module)
    assert cycles == []


def _heavy(module: str) -> bool:
    """A project module that needs an optional heavy library: the exporter, the reference, the tools, or one
    that imports such a library at module level (itself or through its module-level imports)."""
    if _in(module, TOOLS_AND_EXPORT):
        return True
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        eager = [target for target, inside in GRAPH[m] if not inside]
        if set(eager) & HEAVY:
            return True
        todo += [target for target in eager if target in MODULES]
    return False


def test_project_imports_inside_functions_only_keep_heavy_libraries_lazy():
    lazy = sorted(f"{m} -> {t}" for m, found in GRAPH.items() for t, inside in found
                  if inside and t in MODULES and not _heavy(t))
    assert lazy == []
