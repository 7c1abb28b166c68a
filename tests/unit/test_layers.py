"""The package forms layers: each subpackage imports only from layers below it, at module top.

tools -> ops, config -> distributed, datasets -> models -> components, checkpoint -> trainer -> train.py, launch.py
(docs/architecture.md). A cycle between packages, or a project import hidden inside a function to
break one, fails here.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = os.path.join(ROOT, "torchtitan")
LAYERS = {"tools": 0, "ops": 1, "config": 1, "distributed": 2, "datasets": 2, "models": 3,
          "components": 4, "checkpoint": 4, "trainer": 5, "train": 6, "launch": 6}


def _modules():
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "torchtitan" and len(parts) > 1 else None


def _imports(path: str):
    """(imported torchtitan module, inside a function?) for every import statement of a file."""
    tree = ast.parse(open(path).read())
    nested = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("torchtitan"):
                yield name, id(node) in nested


def test_every_package_has_a_layer():
    tops = {_top(m) for m, _ in _modules()} - {None}
    assert tops <= set(LAYERS), f"packages without a layer: {tops - set(LAYERS)}"


def test_packages_import_only_from_lower_layers():
    wrong = []
    for module, path in _modules():
        src = _top(module)
        for name, _ in _imports(path):
            dst = _top(name)
            if src is not None and dst is not None and dst != src and LAYERS[dst] >= LAYERS[src]:
                wrong.append(f"{module} imports {name} ({src} layer {LAYERS[src]} -> {dst} layer {LAYERS[dst]})")
    assert not wrong, "\n".join(wrong)


def test_project_imports_are_at_module_top():
    inside = [f"{module}: {name}" for module, path in _modules() for name, nested in _imports(path) if nested]
    assert len(inside) <= 5, "project imports inside functions:\n" + "\n".join(inside)


def test_no_file_over_500_lines():
    long = [f"{m}: {n}" for m, p in _modules() if (n := sum(1 for _ in open(p))) > 500]
    assert not long, long


_IMPORT_EACH = """
import importlib, os, sys, traceback
import importlib.util
# Third-party imports paid once; every module is then imported by a forked child that has no torchtitan module yet.
import torch, torch._dynamo, torch.distributed.tensor, torch.distributed.checkpoint, torch.distributed.fsdp  # noqa
import torch.distributed.pipelining, numpy  # noqa
for extra in ("torchdata.stateful_dataloader", "tokenizers", "safetensors.torch", "tiktoken", "datasets"):
    if importlib.util.find_spec(extra.split(".")[0]) is not None:
        importlib.import_module(extra)
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED:", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def test_each_module_imports_alone():
    """Each module imported first, with no other project module loaded: what an import cycle breaks."""
    modules = sorted(m for m, _ in _modules())
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stdout[-500:] + proc.stderr[-3000:]
