"""The package structure, computed from the source (imports read with `ast`, lazy imports
included): no import cycle between modules, no private name imported from another module,
dependencies pointing one way between packages (serve -> engine -> cluster -> worker ->
attention / kv / model -> ops), no function over 80 lines in the policy layer, a docstring
atop every module, and every "Must not import" a docstring declares holds."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "loong")

# Package -> rank: a module may import modules of its own package or of lower ranks only.
RANK = {"errors": 0, "version": 0, "ops": 0, "sched": 0, "v1": 0, "control": 0,
        "sampling_params": 1, "config": 1, "comm": 1, "weight_sync": 1,
        "model": 2, "kv": 3, "attention": 4, "worker": 5, "sim": 5,
        "cluster": 6, "engine": 7, "serve": 8, "client": 8, "tools": 9,
        "": 10, "cli": 11}
POLICY_LAYER = ("loong.sched",)
MAX_POLICY_FUNCTION_LINES = 80


def _modules() -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py") and "_pb2" not in f:
                path = os.path.join(d, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


MODULES = _modules()
TREES = {m: ast.parse(open(p, encoding="utf-8").read()) for m, p in MODULES.items()}


def _imports(mod: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) of every loong import in mod."""
    is_pkg = MODULES[mod].endswith("__init__.py")
    out = []
    for node in ast.walk(TREES[mod]):
        if isinstance(node, ast.Import):
            out += [(a.name, None) for a in node.names if a.name.startswith("loong")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = mod.split(".")[: None if is_pkg else -1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            if base.startswith("loong"):
                for a in node.names:
                    full = f"{base}.{a.name}"
                    out.append((full, None) if full in MODULES else (base, a.name))
    return out


def _target(name: str) -> str | None:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def _graph() -> dict[str, set[str]]:
    g = {m: set() for m in MODULES}
    for m in MODULES:
        for name, _ in _imports(m):
            t = _target(name)
            if t is not None and t != m:
                g[m].add(t)
    return g


def test_every_package_has_a_rank():
    assert {_package(m) for m in MODULES} <= set(RANK), set(_package(m) for m in MODULES) - set(RANK)


def test_no_import_cycles():
    g = _graph()
    # A package's __init__ importing its own submodules (re-exports) is not a cycle.
    g = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in g.items()}
    index, low, stack, on, cycles = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            strong(v)
    assert cycles == []


def test_no_private_names_across_modules():
    bad = [f"{m} imports {n} from {base}" for m in MODULES for base, n in _imports(m)
           if n and n.startswith("_") and not n.startswith("__") and _target(base) != m]
    assert bad == []


def test_dependencies_point_down():
    bad = []
    for m, targets in _graph().items():
        for t in targets:
            a, b = _package(m), _package(t)
            if a != b and RANK[b] >= RANK[a]:
                bad.append(f"{m} ({a}, rank {RANK[a]}) imports {t} ({b}, rank {RANK[b]})")
    assert bad == []


def test_policy_layer_functions_are_short():
    long = []
    for m, tree in TREES.items():
        if m.startswith(POLICY_LAYER):
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_POLICY_FUNCTION_LINES:
                        long.append(f"{m}.{node.name}: {n} lines")
    assert long == []


def test_every_module_has_a_docstring():
    missing = [m for m, tree in TREES.items() if not ast.get_docstring(tree)]
    assert missing == []


def _forbidden(doc: str) -> tuple[bool, list[str]]:
    """From a docstring's "Must not import" sentence: (torch named?, loong modules named)."""
    m = re.search(r"Must not import[^:]*:(.*?)(?:\.\s|\.$|\n\s*\n|$)", doc, re.S)
    if not m:
        return False, []
    text = m.group(1)
    # torch is banned when it is an item of the list ("torch, numpy, or ..."), not when the
    # clause only mentions it ("their torch fallbacks", "(only torch)").
    no_torch = re.search(r"(?:^|[,;]|\bor)\s*torch\s*(?:[,;]|\bor\b|$)", text.strip())
    return bool(no_torch), re.findall(r"`(loong(?:\.\w+)+)`", text)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_must_not_import_lines_hold(mod):
    doc = ast.get_docstring(TREES[mod]) or ""
    no_torch, banned = _forbidden(doc)
    imported = [name for name, _ in _imports(mod)]
    if no_torch:
        for node in ast.walk(TREES[mod]):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "torch" or n.startswith("torch.") for n in names), \
                f"{mod} says it must not import torch"
    for b in banned:
        assert not any(n == b or n.startswith(b + ".") for n in imported), \
            f"{mod} says it must not import {b}"
