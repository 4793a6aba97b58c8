"""The kind table: every head kind lives in one module of ``hydracc.kernels.kinds`` and provides
every hook its category needs. A new kind (one module, one row in ``HEAD_KINDS``) is checked here."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

import hydracc.kernels.kinds as kinds_pkg
from hydracc.kernels import HEAD_KINDS, PARAM_NAMES, HeadKind, kind_by_code, param_shapes, state_shapes
from hydracc.kernels.kinds import FUSION_PARAM, STATE_PART_COUNT, STATE_PARTS
from kernel_ops.kernel_cases import make_params, param_dict, qkv

KIND_IDS = [kind.name for kind in HEAD_KINDS]
COMMON = {"base"}  # modules of shared pieces, not kinds


def kind_modules() -> dict[str, object]:
    names = [m.name for m in pkgutil.iter_modules(kinds_pkg.__path__) if m.name not in COMMON]
    return {name: importlib.import_module(f"{kinds_pkg.__name__}.{name}") for name in names}


def test_the_kind_modules_cover_the_table() -> None:
    """One module per kind, named after it, defining exactly its row; codes 0.. without gaps."""
    rows = {}
    for name, module in kind_modules().items():
        defined = [v for v in vars(module).values() if isinstance(v, HeadKind)]
        assert len(defined) == 1, f"kinds/{name}.py must define exactly one HeadKind, found {len(defined)}"
        rows[name] = defined[0]
    assert sorted(rows) == sorted(KIND_IDS)
    for name, row in rows.items():
        assert row.name == name and kind_by_code(row.code) is row
    assert sorted(kind.code for kind in HEAD_KINDS) == list(range(len(HEAD_KINDS)))


@pytest.mark.parametrize("kind", HEAD_KINDS, ids=KIND_IDS)
def test_each_kind_provides_every_hook(kind: HeadKind) -> None:
    module = f"{kinds_pkg.__name__}.{kind.name}"
    assert callable(kind.forward) and kind.forward.__module__ == module, "forward must live in the kind's module"
    if kind.linear:
        for hook in (kind.step, kind.state_shapes):
            assert callable(hook) and hook.__module__ == module
        assert kind.state_parts and STATE_PART_COUNT[kind.code] == len(kind.state_parts)
        assert len(kind.state_shapes(2, 3, 8, 4)) == len(kind.state_parts)
        assert not kind.keeps_kv
    else:
        assert kind.step is None and kind.state_shapes is None and not kind.state_parts
        assert kind.code not in STATE_PARTS
    if kind.learned:
        for hook in (kind.param_shapes, kind.init_params):
            assert callable(hook) and hook.__module__ == module
        assert kind.params and set(kind.param_shapes(3, 8)) == set(kind.params)
    else:
        assert not kind.params and kind.param_shapes is None and kind.init_params is None
    assert set(kind.params) <= set(PARAM_NAMES)
    # plan settings: every one has a default and an integer range (they travel in head_windows)
    assert set(kind.plan_defaults) == set(kind.plan_ranges) == set(kind.plan_params)
    for name, (low, high) in kind.plan_ranges.items():
        assert low <= kind.plan_defaults[name] <= high
    assert len(kind.plan_params) in (0, 2), "head_windows holds two settings per head"
    assert len(kind.symbol) == 1 and kind.symbol != "?"


def test_kind_symbols_are_distinct() -> None:
    assert len({kind.symbol for kind in HEAD_KINDS}) == len(HEAD_KINDS)


def test_param_names_are_the_kinds_params_in_code_order() -> None:
    """The checkpoint layout: fusion first, then each learned kind's names by code (new kinds append)."""
    assert PARAM_NAMES == ("fusion_scale", "hedgehog_weight", "hedgehog_bias", "gdn_gate_weight", "gdn_gate_bias")
    assert PARAM_NAMES[0] == FUSION_PARAM
    owned = [name for kind in sorted(HEAD_KINDS, key=lambda k: k.code) for name in kind.params]
    assert list(PARAM_NAMES[1:]) == owned and len(set(owned)) == len(owned)
    assert list(param_shapes(4, 8)) == list(PARAM_NAMES)


@pytest.mark.parametrize("kind", [k for k in HEAD_KINDS if k.linear], ids=[k.name for k in HEAD_KINDS if k.linear])
def test_step_states_have_the_declared_shapes_and_continue_the_forward(kind: HeadKind) -> None:
    b, h, t, d, dv = 2, 3, 10, 16, 8
    q, k, v = qkv(b, h, h, t, t, d, dv, seed=4)
    rows = param_dict(make_params(h, d), slice(None))
    whole = kind.forward(q, k, v, d**-0.5, rows)
    first, state = kind.step(q[:, :, :6], k[:, :, :6], v[:, :, :6], None, rows)
    assert [tuple(s.shape) for s in state] == list(state_shapes(kind.code, b, h, d, dv))
    assert all(s.dtype == torch.float32 for s in state)
    second, state = kind.step(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], state, rows)
    torch.testing.assert_close(torch.cat([first, second], dim=2), whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", [k for k in HEAD_KINDS if k.learned], ids=[k.name for k in HEAD_KINDS if k.learned])
def test_init_params_writes_only_its_head_and_its_own_tensors(kind: HeadKind) -> None:
    hq, d = 4, 8
    rows = {name: torch.zeros(shape) for name, shape in param_shapes(hq, d).items()}
    kind.init_params(rows, 2, d, scale=d**-0.5, distance=5.0, generator=torch.Generator().manual_seed(0))
    for name, t in rows.items():
        others = torch.cat([t[:2], t[3:]])
        assert not others.any(), f"{kind.name} wrote rows of other heads in {name}"
        if name not in kind.params:
            assert not t.any(), f"{kind.name} wrote {name}, which is not its own"
    assert any(rows[name][2].any() for name in kind.params)


def test_init_params_hooks_give_the_distillation_starting_values() -> None:
    """The kinds' ``init_params`` hooks reproduce ``distill.train.layer_initial_params`` head by head."""
    from types import SimpleNamespace

    from hydracc.distill import train

    hq, hkv, d, t = 4, 2, 8, 12
    names = ["hedgehog", "gdn", "elu", "full"]
    site = SimpleNamespace(num_heads=hq, num_kv_heads=hkv, head_dim=d, scale=d**-0.5, module="m")
    lp = SimpleNamespace(layer=3, heads=[SimpleNamespace(kind=n) for n in names])
    q, k, v = qkv(2, hq, hkv, t, t, d, seed=7)
    rec = SimpleNamespace(q=q, k=k, out=torch.randn(2, hq, t, d, generator=torch.Generator().manual_seed(3)))
    want = train.layer_initial_params(lp, site, rec, seed=5)
    rows = {name: torch.zeros(shape) for name, shape in param_shapes(hq, d).items()}
    _, distance_sum, count = train._head_sums(rec, hq // hkv, site.scale)
    distance = distance_sum / count
    for h, name in enumerate(names):
        kind = kind_by_code([k.code for k in HEAD_KINDS if k.name == name][0])
        if kind.init_params is not None:
            generator = torch.Generator().manual_seed(train._seed(5, lp.layer, h))
            kind.init_params(rows, h, d, scale=site.scale, distance=float(distance[h]), generator=generator)
    for name in PARAM_NAMES[1:]:
        torch.testing.assert_close(rows[name], want[f"m.hydra.{name}"], rtol=0, atol=0)


def test_the_triton_paths_account_for_every_kind() -> None:
    """Each kernel runs a kind in a branch (or, in prefill, a linear kind through its torch hooks);
    a kind it has no branch for must fall back to the reference, never be left unwritten."""
    prefill = pytest.importorskip("hydracc.kernels.triton_prefill")
    decode = pytest.importorskip("hydracc.kernels.triton_decode")
    codes = {kind.code for kind in HEAD_KINDS}
    assert set(prefill.PREFILL_KINDS) == codes, "add the kind's prefill branch (or list it in TORCH_KINDS)"
    assert set(decode.DECODE_KINDS) == codes, "add the kind's decode branch"
    assert all(kind_by_code(c).linear for c in prefill.TORCH_KINDS)
