"""The layering rule: ``kernels`` <- ``trainer`` <- ``orchestration`` and ``dataloaders`` <- ``orchestration``.
The lower packages (and the config system) run where Ray and MLflow are not installed (plain ``torchrun``, a
GPU machine with neither), and no module of the project takes part in an import cycle."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("kernels", "trainer", "dataloaders", "infra", "orchestration")

# Runs in a fresh interpreter in which importing ray or mlflow (or any of their submodules) fails.
WITHOUT_RAY_OR_MLFLOW = textwrap.dedent("""
    import importlib, importlib.abc, pkgutil, sys, tempfile

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("ray", "mlflow"):
                raise ImportError(f"{name} is not installed here")

    sys.meta_path.insert(0, Blocked())
    for pkg in ("kernels", "trainer", "dataloaders"):
        for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
            importlib.import_module(info.name)

    import torch
    from dataloaders import build_loader, open_dataset
    from dataloaders.prepare import write_digits
    from infra.config import load_config
    from trainer.loop import Trainer
    from trainer.recipes import build_recipe

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        url = write_digits(tmp)
        for preset, extra in (("demo", []), ("distill-demo", ["distill.mode=sct"])):
            cfg = load_config(preset, ["model.depth=2", "model.head_dim=16", "train.steps=2", "train.log_every=1",
                                       "train.eval_every=0", "train.global_batch_size=8", f"data.url={url}", *extra])
            loader = build_loader(cfg.data, rank=0, world_size=1, global_batch_size=8, seed=0)
            recipe = build_recipe(cfg.recipe, cfg, open_dataset(url).empty_condition())
            metrics = Trainer(cfg, recipe).fit(loader)
            assert torch.isfinite(torch.tensor(metrics["loss"])), (preset, metrics)
            loader.close()
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "mlflow"))
    assert not leaked, leaked
    print("ok")
""")


def test_lower_layers_import_and_train_without_ray_or_mlflow():
    done = subprocess.run([sys.executable, "-c", WITHOUT_RAY_OR_MLFLOW], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in its body, functions included: a deferred import
    still ties the two modules together. ``from package import name`` counts as the submodule when
    ``name`` is one, else as the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def project_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    modules = set(files)
    return {name: imports(path, modules) - {name} for name, path in files.items()}


def test_no_module_of_the_project_is_part_of_an_import_cycle():
    cycle = find_cycle(project_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lower_layers_never_import_orchestration():
    graph = project_graph()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() if not m.startswith("orchestration")
                    for d in deps if d.startswith("orchestration"))
    assert not upward, upward


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
