"""A converted model decodes with its hybrid cache on the transformers installed (CI runs this file on
the newest version the package allows too): ``generate`` and a forward with ``use_cache=True`` get a
``HybridCache``, and a decode step's attention works on the one new token whatever the context
(falling back to a ``DynamicCache`` recomputes the linear heads over the whole context each step)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers import plan_with_kinds

import hydracc
from hydracc.convert import convert
from hydracc.runtime.cache import HybridCache
from hydracc.runtime.loader import ATTN_IMPLEMENTATION, cache_argument

KINDS = [["full", "gdn", "elu", "hedgehog"], ["gdn", "elu", "full", "gdn"]]
CONTEXTS = [6, 30]


@pytest.fixture(scope="module")
def model(tiny_checkpoint, tmp_path_factory):
    src = tiny_checkpoint("llama-gqa")
    tmp = tmp_path_factory.mktemp("selection")
    plan = plan_with_kinds(src, tmp, KINDS, fusion=True)
    convert(src, tmp / "out", plan_file=plan, seq_len=16, calib_samples=2)
    return hydracc.load(tmp / "out")


@contextmanager
def keys_worked_on() -> Iterator[list[tuple[int, int, str]]]:
    """Per call of the hybrid attention function: (queries, keys it computes over, what held them).

    With a hybrid cache the keys are the step's new ones (the rest is in the cache's state); with
    a ``DynamicCache`` they are the whole context, which the linear heads recompute."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION]
    seen: list[tuple[int, int, str]] = []

    def spy(module, query, key, value, *args, **kwargs):
        fresh = key.new_keys if hasattr(key, "attend") else key
        seen.append((query.shape[2], fresh.shape[2], type(key).__name__))
        return original(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(ATTN_IMPLEMENTATION, spy)
    try:
        yield seen
    finally:
        AttentionInterface.register(ATTN_IMPLEMENTATION, original)


def returned_cache(out):
    """The cache a model output or generate's output holds (``cache`` from transformers 5.25 on)."""
    names = [name for name in ("cache", "past_key_values") if name in out.keys()]
    assert names, f"no cache in the output (fields {list(out.keys())})"
    return out[names[0]]


def _ids(n: int) -> torch.Tensor:
    return torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("context", CONTEXTS)
def test_generate_decodes_with_the_hybrid_cache(model, context) -> None:
    new = 4
    with torch.no_grad(), keys_worked_on() as seen:
        out = model.generate(_ids(context), max_new_tokens=new, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    assert isinstance(returned_cache(out), HybridCache)
    steps = [s for s in seen if s[0] == 1]
    assert len(steps) == (new - 1) * model.config.num_hidden_layers
    assert {(keys, held) for _, keys, held in steps} == {(1, "HybridStep")}, "a decode step recomputed the context"


@pytest.mark.parametrize("context", CONTEXTS)
def test_a_forward_with_use_cache_makes_the_hybrid_cache(model, context) -> None:
    ids = _ids(context + 3)
    with torch.no_grad(), keys_worked_on() as seen:
        out = model(ids[:, :context], use_cache=True)
        cache = returned_cache(out)
        assert isinstance(cache, HybridCache)
        pieces = [out.logits]
        for t in range(context, context + 3):
            out = model(ids[:, t : t + 1], use_cache=True, **{cache_argument(model): cache})
            assert returned_cache(out) is cache
            pieces.append(out.logits)
        again = model(ids).logits  # (no cache asked for)
    steps = [s for s in seen if s[0] == 1]
    assert {(keys, held) for _, keys, held in steps} == {(1, "HybridStep")}, "a decode step recomputed the context"
    torch.testing.assert_close(torch.cat(pieces, 1), again, rtol=1e-4, atol=1e-5)


def test_the_base_model_makes_the_hybrid_cache_too(model) -> None:
    with torch.no_grad():
        out = model.base_model(input_ids=_ids(5), use_cache=True)
    assert isinstance(returned_cache(out), HybridCache)


def test_a_forward_that_asks_for_no_cache_runs_the_op(model) -> None:
    """Only ``use_cache=True`` from the caller makes a hybrid cache: evaluation's plain forward keeps the op."""
    with torch.no_grad(), keys_worked_on() as seen:
        model(_ids(7))
        model(_ids(7), use_cache=False)
    assert {held for *_, held in seen} == {"Tensor"}


def test_a_cache_the_caller_passes_is_kept(model) -> None:
    from transformers.cache_utils import DynamicCache

    dense = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model.generate(_ids(6), max_new_tokens=2, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                             **{cache_argument(model): dense})
        step = model(_ids(6), use_cache=True, **{cache_argument(model): DynamicCache(config=model.config)})
    assert returned_cache(out) is dense
    assert type(returned_cache(step)) is DynamicCache


def test_the_cache_argument_is_the_one_transformers_takes(model) -> None:
    """No deprecation warning for the cache's name from hydracc's calls (transformers 5.25 renamed it)."""
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = HybridCache(model.config)
        model(_ids(5), use_cache=True, **{cache_argument(model): cache})
        model.generate(_ids(5), max_new_tokens=2, do_sample=False, pad_token_id=0)
        model(_ids(5), use_cache=True)
    named = [str(w.message) for w in caught if "past_key_values" in str(w.message) or "`cache`" in str(w.message)]
    assert not named, named


def test_decoding_through_another_cache_warns_once(model, monkeypatch) -> None:
    """A plain forward's DynamicCache, fed back, recomputes the linear heads: that is said, once, not silent."""
    from hydracc.runtime import loader

    monkeypatch.setattr(loader, "_warned_recompute", False)
    with torch.no_grad():
        out = model(_ids(6), use_cache=False)  # no cache: nothing to warn about
        first = model(_ids(6))  # use_cache left to the config: transformers' DynamicCache
        cache = returned_cache(first)
        assert not isinstance(cache, HybridCache)
        with pytest.warns(UserWarning, match="not a HybridCache"):
            model(_ids(1), **{cache_argument(model): cache})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(_ids(1), **{cache_argument(model): cache})  # once per process
    assert out.logits.shape[1] == 6
