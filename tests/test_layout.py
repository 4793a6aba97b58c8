"""The package layout: stage folders, old module paths forwarding with a warning, no import cycles,
and a runtime that loads a converted checkpoint without importing the compiler."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import ROOT

PACKAGE = ROOT / "hydracc"

MOVED = {
    "hydracc.checkpoint": ("hydracc.frontend.checkpoint", "open_checkpoint"),
    "hydracc.model": ("hydracc.frontend.model", "build_model"),
    "hydracc.capture": ("hydracc.frontend.capture", "capture"),
    "hydracc.calibration": ("hydracc.analysis.calibration", "load_calibration"),
    "hydracc.analyze": ("hydracc.analysis.scores", "analyze"),
    "hydracc.plan": ("hydracc.planning.plan", "load_plan"),
    "hydracc.planner": ("hydracc.planning.budget", "Budget"),
    "hydracc.plan_plot": ("hydracc.planning.plot", "draw_plan"),
    "hydracc.weight_edits": ("hydracc.passes.weight_edits", "WeightEdits"),
    "hydracc.cache": ("hydracc.runtime.cache", "HybridCache"),
    "hydracc.evaluate": ("hydracc.evaluation.evaluate", "evaluate"),
    "hydracc.tasks": ("hydracc.evaluation.tasks", "mqar_example"),
    "hydracc.byte_tokenizer": ("hydracc.evaluation.byte_tokenizer", "build_byte_tokenizer"),
    "hydracc.onnx_export": ("hydracc.export.onnx", "export_onnx"),
    "hydracc.converted": ("hydracc.runtime.hydra_config", "read_hydra_layers"),
    "hydracc.kernels.head_kinds": ("hydracc.kernels.kinds", "kind_by_name"),
    "hydracc.kernels.reference": ("hydracc.kernels.naive", "run_kind"),
    # modules that became packages keep their old names
    "hydracc.runtime": ("hydracc.runtime.loader", "HybridHeads"),
    "hydracc.distill": ("hydracc.distill.records", "SiteRecord"),
    "hydracc.emit": ("hydracc.emit.writer", "SINGLE_NAME"),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_forward_with_a_warning(old: str) -> None:
    new, name = MOVED[old]
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"{old} moved: import {name} from {new}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_a_forwarding_module_does_not_pose_as_a_package() -> None:
    import hydracc.kernels.head_kinds as old

    assert not hasattr(old, "__path__")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        from hydracc.kernels.head_kinds import kind_by_name  # noqa: F401
    assert [str(w.message) for w in seen] == ["hydracc.kernels.head_kinds moved: import kind_by_name from hydracc.kernels.kinds"]


def test_converted_forwards_the_writer_too() -> None:
    import hydracc.converted as old
    from hydracc.emit.hydra_section import hydra_section

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert old.hydra_section is hydra_section


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """hydracc modules that ``path`` imports anywhere (module level or inside functions; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hydracc"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("hydracc"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_no_import_cycles() -> None:
    """Between modules, counting imports inside functions too (a lazy import is still a dependency); the
    deprecated forwarding modules and the package root's lazy hooks are left out."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = {m: p for m, p in modules.items() if m not in MOVED and m not in ("hydracc", "hydracc._moved")}
    # a module's own packages are already importing when it runs: those edges are not cycles
    graph = {m: {d for d in _imports(p) if d in modules and d != m and not m.startswith(d + ".")} for m, p in modules.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


COMPILER = ("hydracc.frontend.capture", "hydracc.analysis", "hydracc.planning", "hydracc.passes", "hydracc.distill",
            "hydracc.emit", "hydracc.pipeline", "hydracc.convert", "hydracc.cli")


@pytest.mark.slow
def test_loading_a_converted_checkpoint_imports_no_compiler_code(tiny_checkpoint, tmp_path) -> None:
    from hydracc.convert import convert

    out = tmp_path / "conv"
    convert(tiny_checkpoint("llama-gqa"), out, full_ratio=0.5, strategy="even", linear_kind="hedgehog", seq_len=16, calib_samples=2)
    script = (
        "import sys, json, torch, hydracc\n"
        f"m = hydracc.load({str(out)!r})\n"
        "m.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=3, do_sample=False)\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        "print(json.dumps(sorted(n for n in sys.modules if n.startswith('hydracc'))))\n"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    loaded = json.loads(res.stdout.strip().splitlines()[-1])
    assert "hydracc.runtime.loader" in loaded
    compiler = [n for n in loaded if n.startswith(COMPILER)]
    assert not compiler, f"loading imported compiler modules: {compiler}"


def test_test_folders_shadow_no_installed_package() -> None:
    """pytest puts ``tests/`` on ``sys.path`` (``pythonpath``): a test package there named like an
    installed one (``tests/kernels``: transformers 5.25 imports the ``kernels`` package) hides it."""
    import importlib.metadata

    tests = ROOT / "tests"
    ours = {p.parent.name for p in tests.glob("*/__init__.py")} | {p.stem for p in tests.glob("*.py")}
    taken = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names) | {"kernels"}
    assert not ours & taken, f"tests/ shadows installed packages: {sorted(ours & taken)}"
