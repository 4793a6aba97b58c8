"""How the kernels package is laid out: validation in a leaf module, each op's plain reference
beside its Triton kernel, kind codes read from the kind table, grouped kernel arguments."""

from __future__ import annotations

import ast
import re

from helpers import ROOT

KERNELS = ROOT / "hydracc" / "kernels"
TRITON_FILES = ("triton_prefill.py", "triton_decode.py")


def _hydracc_imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hydracc"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("hydracc"))
    return found


def test_layout_is_a_leaf_over_the_kind_table() -> None:
    assert _hydracc_imports(KERNELS / "layout.py") <= {"hydracc.kernels.kinds"}
    for path in (KERNELS / "kinds").glob("*.py"):
        assert all(m.startswith("hydracc.kernels.kinds") for m in _hydracc_imports(path)), path.name


def test_the_triton_files_do_not_import_the_ops() -> None:
    """The ops import their kernels lazily; a kernel module never imports an op module back."""
    for name in TRITON_FILES:
        imports = _hydracc_imports(KERNELS / name)
        assert not imports & {"hydracc.kernels.decode_op", "hydracc.kernels.hybrid_op", "hydracc.kernels.reference"}, name


def _jit_functions(path) -> list[ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    return [
        node for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list)
    ]


def test_kernels_read_kind_codes_from_the_kind_table() -> None:
    """No ``kind == 4`` in device code: codes come in as ``tl.constexpr`` values built from ``HEAD_KINDS``."""
    literal = re.compile(r"\bkind\s*==\s*\d", re.IGNORECASE)
    for name in TRITON_FILES:
        for fn in _jit_functions(KERNELS / name):
            src = ast.unparse(fn)
            assert not literal.search(src), f"{name}:{fn.name} compares a kind with a literal code"


def test_kernel_arguments_are_grouped() -> None:
    """Pointers and strides travel as tuples; no kernel or device function takes 40 parameters."""
    for name in TRITON_FILES:
        for fn in _jit_functions(KERNELS / name):
            assert len(fn.args.args) < 40, f"{name}:{fn.name} takes {len(fn.args.args)} parameters"


def test_take_heads_slices_consecutive_heads_and_indexes_the_rest() -> None:
    import torch

    from hydracc.kernels.layout import take_heads

    t = torch.randn(2, 8, 3, 4)
    calls: list[int] = []

    def index_of(heads: tuple[int, ...]):
        def index() -> torch.Tensor:
            calls.append(1)
            return torch.tensor(heads)
        return index

    for heads in [(0, 1, 2, 3, 4, 5, 6, 7), (2, 3, 4), (5,), (0, 2, 3), (3, 1)]:
        got = take_heads(t, heads, index_of(heads))
        assert torch.equal(got, t[:, list(heads)])
        consecutive = list(heads) == list(range(heads[0], heads[0] + len(heads)))
        assert (got.data_ptr() - t.data_ptr() == heads[0] * t.stride(1) * t.element_size()) == consecutive
    assert len(calls) == 2  # only the two non-consecutive selections built an index
