"""The hybrid cache: decoding with it equals recomputing, all-full equals the original, and it is small."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from helpers import ROOT, load_original, plan_with_kinds

import hydracc
from hydracc.cli import main
from hydracc.convert import convert
from hydracc.kernels.kinds.elu import causal_linear_attention, causal_linear_attention_step
from hydracc.runtime.cache import HybridCache


@pytest.mark.parametrize("chunks", [[7], [3, 1, 1, 2], [1] * 7], ids=["one", "ragged", "tokenwise"])
def test_linear_attention_step_continues_the_state(chunks) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    expected = causal_linear_attention(q, k, v)
    outs, state, norm, at = [], None, None, 0
    for n in chunks:
        out, state, norm = causal_linear_attention_step(q[:, :, at : at + n], k[:, :, at : at + n], v[:, :, at : at + n], state, norm)
        outs.append(out)
        at += n
    torch.testing.assert_close(torch.cat(outs, 2), expected, rtol=1e-5, atol=1e-6)


def _ids(n: int = 12, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (batch, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-mqa", "gpt2-mha"])
def test_all_full_greedy_generation_equals_the_original(tiny_checkpoint, tmp_path, name) -> None:
    src = tiny_checkpoint(name)
    convert(src, tmp_path / "out", full_ratio=1.0, strategy="even")
    ids = _ids()
    with torch.no_grad():
        ours = hydracc.load(tmp_path / "out").generate(ids, max_new_tokens=10, do_sample=False, return_dict_in_generate=True)
        theirs = load_original(src).generate(ids, max_new_tokens=10, do_sample=False)
    assert isinstance(ours.past_key_values, HybridCache)  # generate picked the hybrid cache by itself
    assert torch.equal(ours.sequences, theirs)


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-mqa", "gpt2-mha", "qwen2-mha"])
@pytest.mark.parametrize("ratio", [0.5, 0.0], ids=["mixed", "all-linear"])
def test_decoding_with_the_cache_equals_recomputing(tiny_checkpoint, tmp_path, name, ratio) -> None:
    convert(tiny_checkpoint(name), tmp_path / "out", full_ratio=ratio, strategy="even")
    model = hydracc.load(tmp_path / "out")
    ids = _ids(14, batch=2)
    cache = HybridCache(model.config)
    with torch.no_grad():
        pieces = [model(ids[:, :5], past_key_values=cache, use_cache=True).logits]
        pieces.append(model(ids[:, 5:9], past_key_values=cache, use_cache=True).logits)  # a second prefill chunk
        for t in range(9, 14):
            pieces.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        full = model(ids).logits
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == 14


@pytest.mark.parametrize("max_cache_len", [14, 6], ids=["exact", "too-small"])
def test_a_preallocated_cache_equals_the_growing_one(tiny_checkpoint, tmp_path, max_cache_len) -> None:
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "out", full_ratio=0.5, strategy="even")
    model = hydracc.load(tmp_path / "out")
    ids = _ids(14, batch=2)
    chunks = [(0, 5), (5, 9)] + [(t, t + 1) for t in range(9, 14)]
    logits, held = {}, {}
    for size in (None, max_cache_len):
        cache = HybridCache(model.config, max_cache_len=size)
        pointers = set()
        with torch.no_grad():
            pieces = []
            for a, b in chunks:
                pieces.append(model(ids[:, a:b], past_key_values=cache, use_cache=True).logits)
                pointers.add(cache.layers[0].keys.data_ptr())
        assert cache.layers[0].cached_kv  # (one KV group of each layer is full)
        logits[size], held[size] = torch.cat(pieces, 1), (cache.kv_nbytes(), cache.nbytes(), len(pointers))
    torch.testing.assert_close(logits[max_cache_len], logits[None], rtol=1e-5, atol=1e-6)
    total = held[None][1]
    if max_cache_len == 14:
        assert held[14][2] == 1  # written in place: one storage for the whole sequence
        assert held[14][:2] == held[None][:2]  # the buffer is exactly the rows used
    else:
        assert 1 < held[6][2] < len(chunks)  # outgrown: the buffer doubled, not one copy per step
        assert held[6][1] > total and held[6][0] > held[None][0]  # the whole buffer held counts


@pytest.mark.parametrize("threads", [1, 64], ids=["query-rows-per-kv-head", "heads-in-parallel"])
def test_both_decode_sdpa_layouts_equal_recomputing(tiny_checkpoint, tmp_path, threads) -> None:
    """On the CPU a one-token step folds each cached KV head's query heads into query rows when
    batch x KV heads keep every thread busy (always on one thread), else runs them as heads."""
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "out", full_ratio=0.5, strategy="even")
    model = hydracc.load(tmp_path / "out")
    ids = _ids(10)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cache = HybridCache(model.config, max_cache_len=10)
        with torch.no_grad():
            pieces = [model(ids[:, :6], past_key_values=cache, use_cache=True).logits]
            for t in range(6, 10):
                pieces.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
            full = model(ids).logits
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)


def test_generate_preallocates_the_cache_for_its_length(tiny_checkpoint, tmp_path) -> None:
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "out", full_ratio=0.5, strategy="even")
    model = hydracc.load(tmp_path / "out")
    with torch.no_grad():
        out = model.generate(_ids(8), max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    layers = [layer for layer in out.past_key_values.layers if layer.cached_kv]
    assert layers and all(layer._buffers[0].shape[2] == 8 + 6 - 1 for layer in layers)
    assert all(layer.keys.data_ptr() == layer._buffers[0].data_ptr() for layer in layers)


def test_beam_search_and_batches_match_no_cache(tiny_checkpoint, tmp_path) -> None:
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "out", full_ratio=0.5, strategy="even")
    model = hydracc.load(tmp_path / "out")
    ids = _ids(8, batch=2)
    with torch.no_grad():
        for kw in ({"do_sample": False}, {"num_beams": 3, "do_sample": False}):
            cached = model.generate(ids, max_new_tokens=6, **kw)
            plain = model.generate(ids, max_new_tokens=6, use_cache=False, **kw)
            assert torch.equal(cached, plain), kw


def test_sampling_with_several_sequences_per_prompt(tiny_checkpoint, tmp_path) -> None:
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "out", full_ratio=0.5, strategy="even")
    model = hydracc.load(tmp_path / "out")
    torch.manual_seed(0)
    out = model.generate(_ids(8), max_new_tokens=5, do_sample=True, top_k=5, num_return_sequences=3, return_dict_in_generate=True)
    assert out.sequences.shape == (3, 13) and isinstance(out.past_key_values, HybridCache)
    assert out.past_key_values.get_seq_length() == 12


def test_cache_keeps_only_full_kv_groups(tiny_checkpoint, tmp_path) -> None:
    from transformers import DynamicCache

    src = tiny_checkpoint("llama-gqa")  # 2 layers x 2 KV groups
    convert(src, tmp_path / "out", full_ratio=0.25, strategy="even", linear_kind="elu")  # 1 of 4 groups full
    model = hydracc.load(tmp_path / "out")
    ids = _ids(200)
    hybrid, dense = HybridCache(model.config), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=hybrid, use_cache=True)
        load_original(src)(ids, past_key_values=dense, use_cache=True)
    dense_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dense.layers)
    assert hybrid.kv_nbytes() * 4 == dense_bytes
    assert hybrid.nbytes() - hybrid.kv_nbytes() < 0.2 * dense_bytes  # the linear state is fixed-size
    with pytest.raises(hydracc.errors.HydraError, match="cropped"):
        hybrid.crop(-1)


def test_auto_loading_after_import_hydracc(tiny_checkpoint, tmp_path) -> None:
    convert(tiny_checkpoint("llama-gqa"), tmp_path / "out", full_ratio=0.5, strategy="even")
    code = (
        "import sys, torch\n"
        "import hydracc\n"
        "assert 'transformers' not in sys.modules  # import hydracc stays light\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})\n"
        "ids = torch.randint(0, 64, (1, 9))\n"
        f"assert torch.equal(m(ids).logits, hydracc.load({str(tmp_path / 'out')!r})(ids).logits)\n"
        "print(m.config._attn_implementation)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("hydracc")
    without = subprocess.run(
        [sys.executable, "-c", f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r})"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert without.returncode != 0 and "hydracc" in without.stderr  # never silently the wrong model


def test_generate_command(tmp_path) -> None:
    out = tmp_path / "conv"
    convert(ROOT / "examples" / "tiny-llama", out, kv_budget=0.5, strategy="even")
    res = CliRunner().invoke(main, ["generate", str(out), "--prompt", "import os\nimport ", "--max-new-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["new_tokens"] == 6 and report["cache"]["tokens"] == 17 + 6 - 1  # the last token is never fed back
    assert report["cache"]["kv_bytes"] * 2 == report["cache"]["full_attention_kv_bytes"]
    model = hydracc.load(out)
    ids = torch.tensor([list(b"import os\nimport ")])
    expected = bytes(model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()).decode("utf-8", "replace")
    assert report["continuation"] == expected
    res = CliRunner().invoke(main, ["generate", str(tmp_path / "missing"), "--prompt", "x"])
    assert res.exit_code == 2


@pytest.mark.parametrize(
    "first",
    [
        "import hydracc; hydracc.HybridCache",
        "import hydracc.runtime.cache",
        "import hydracc.runtime.loader",
        "import transformers, hydracc",
        "import hydracc, importlib.util; assert importlib.util.find_spec('transformers')",  # a check is not an import
    ],
)
def test_registration_in_any_import_order(first: str) -> None:
    code = f"{first}\nfrom transformers import AttentionInterface\nassert 'hydracc' in AttentionInterface._global_mapping\n"
    proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr


def test_groups_with_full_and_linear_heads_mixed(tiny_checkpoint, tmp_path) -> None:
    from hydracc.planning.plan import load_plan

    src = tiny_checkpoint("llama-gqa")  # 4 query heads, 2 KV heads
    convert(src, tmp_path / "even", full_ratio=0.5, strategy="even")
    plan_json = json.loads((tmp_path / "even" / "config.json").read_text())["hydra"]["plan"]
    plan_json["layers"][0]["heads"] = [{"kind": k} for k in ("full", "elu", "full", "full")]  # uneven across groups
    plan_json["layers"][1]["heads"] = [{"kind": k} for k in ("elu", "full", "elu", "elu")]
    (tmp_path / "plan.json").write_text(json.dumps(plan_json))
    assert load_plan(tmp_path / "plan.json").layer(0).full_heads() == [0, 2, 3]
    convert(src, tmp_path / "out", plan_file=tmp_path / "plan.json")
    model = hydracc.load(tmp_path / "out")
    ids = _ids(10, batch=2)
    cache = HybridCache(model.config)
    with torch.no_grad():
        pieces = [model(ids[:, :6], past_key_values=cache, use_cache=True).logits]
        for t in range(6, 10):
            pieces.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        full = model(ids).logits
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)




MIXED = [["full", "hedgehog", "gdn", "streaming"], ["streaming", "elu", "gdn", "hedgehog"]]


@pytest.mark.parametrize(
    "kinds",
    [MIXED, [["gdn"] * 4, ["gdn"] * 4], [["streaming"] * 4, ["hedgehog"] * 4], [["full", "full", "streaming", "streaming"]] * 2],
    ids=["all-kinds", "all-gdn", "streaming+hedgehog", "full+streaming"],
)
@pytest.mark.parametrize("fusion", [True, False], ids=["fusion", "plain"])
def test_every_kind_decodes_like_recomputing(tiny_checkpoint, tmp_path, kinds, fusion) -> None:
    if not fusion and any(k in ("hedgehog", "gdn") for layer in kinds for k in layer):
        fusion = True  # learned kinds always come with their parameters (and so with fusion)
    src = tiny_checkpoint("llama-gqa")
    convert(src, tmp_path / "out", plan_file=plan_with_kinds(src, tmp_path, kinds, fusion), seq_len=16, calib_samples=2)
    model = hydracc.load(tmp_path / "out")
    ids = _ids(14, batch=2)
    cache = HybridCache(model.config)
    with torch.no_grad():
        pieces = [model(ids[:, :5], past_key_values=cache, use_cache=True).logits]
        pieces.append(model(ids[:, 5:9], past_key_values=cache, use_cache=True).logits)
        for t in range(9, 14):
            pieces.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        full = model(ids).logits
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)
    for layer in cache.layers:  # streaming heads keep sink + window - 1 rows between steps, whatever the length
        if layer.stream_heads:
            assert layer.window_keys.shape[2] == 1 + 3 - 1


@pytest.mark.parametrize(("sink", "window", "chunks"), [(2, 4, [1, 1, 3, 1, 6, 1, 1]), (0, 1, [2, 1, 1]), (3, 2, [5, 1, 1, 1])])
def test_streaming_ring_keeps_the_rows_a_query_sees(tiny_checkpoint, tmp_path, sink, window, chunks) -> None:
    """The ring has sink + window - 1 rows from the first step (a first chunk shorter than the sink
    included); each holds the position its slot rule says, or EMPTY_POSITION; decoding equals recomputing."""
    from hydracc.runtime.cache import EMPTY_POSITION

    src = tiny_checkpoint("llama-gqa")
    kinds = [["streaming", "full", "streaming", "elu"], ["streaming"] * 4]
    convert(src, tmp_path / "out", plan_file=plan_with_kinds(src, tmp_path, kinds, False, window=window, sink=sink))
    model = hydracc.load(tmp_path / "out")
    ids = _ids(sum(chunks))
    cache = HybridCache(model.config)
    pieces, seen = [], 0
    with torch.no_grad():
        for n in chunks:
            pieces.append(model(ids[:, seen : seen + n], past_key_values=cache, use_cache=True).logits)
            seen += n
            for layer in cache.layers:
                ring = window - 1
                want: list[int | None] = [None] * (sink + ring)
                for p in range(seen):
                    if p < sink:
                        want[p] = p
                    elif ring:
                        want[sink + (p - sink) % ring] = p
                got = layer.window_pos.tolist()
                assert got == [EMPTY_POSITION if w is None else w for w in want], (seen, got)
                assert layer.window_keys.shape[2] == sink + ring
        full = model(ids).logits
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)


def test_streaming_with_a_window_covering_the_sequence_equals_full(tiny_checkpoint, tmp_path) -> None:
    src = tiny_checkpoint("llama-gqa")
    convert(src, tmp_path / "full", full_ratio=1.0, strategy="even")
    convert(src, tmp_path / "stream", plan_file=plan_with_kinds(src, tmp_path, [["streaming"] * 4] * 2, False, window=64, sink=0))
    ids = _ids(20)
    with torch.no_grad():
        full = hydracc.load(tmp_path / "full")(ids).logits
        stream = hydracc.load(tmp_path / "stream")(ids).logits
    torch.testing.assert_close(stream, full, rtol=1e-5, atol=1e-5)
    convert(src, tmp_path / "short", plan_file=plan_with_kinds(src, tmp_path, [["streaming"] * 4] * 2, False, window=4, sink=1))
    with torch.no_grad():
        short = hydracc.load(tmp_path / "short")(ids).logits
    assert (short - full).abs().max() > 1e-3  # a short window does change the result


@pytest.mark.parametrize("kinds", [MIXED, [["full", "elu", "full", "elu"], ["gdn", "gdn", "streaming", "hedgehog"]]],
                         ids=["all-kinds", "mixed"])
def test_one_token_steps_through_the_decode_op_equal_the_torch_path(tiny_checkpoint, tmp_path, monkeypatch, kinds) -> None:
    """The wiring CUDA uses (hydracc::hybrid_decode over the cache's tensors), run here by the op's CPU implementation."""
    import hydracc.runtime.cache as cache_module

    src = tiny_checkpoint("llama-gqa")
    convert(src, tmp_path / "out", plan_file=plan_with_kinds(src, tmp_path, kinds, True), seq_len=16, calib_samples=2)
    model = hydracc.load(tmp_path / "out")
    ids = _ids(12, batch=2)

    def decode(first_chunk: int, size: int | None = None) -> torch.Tensor:
        cache = HybridCache(model.config, max_cache_len=size)
        with torch.no_grad():
            pieces = [model(ids[:, :first_chunk], past_key_values=cache, use_cache=True).logits]
            for t in range(first_chunk, 12):
                pieces.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        return torch.cat(pieces, 1)

    torch_path = decode(5)
    monkeypatch.setattr(cache_module, "DECODE_OP_DEVICES", {"cpu"})
    torch.testing.assert_close(decode(5), torch_path, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decode(1), torch_path, rtol=1e-4, atol=1e-5)  # from the very first token
    torch.testing.assert_close(decode(5, size=16), torch_path, rtol=1e-4, atol=1e-5)  # the op reads buffer views


@pytest.mark.parametrize("kinds", [MIXED, [["full", "elu", "full", "elu"], ["gdn", "gdn", "streaming", "hedgehog"]]],
                         ids=["all-kinds", "mixed"])
def test_first_chunk_through_the_fused_prefill_equals_the_torch_path(tiny_checkpoint, tmp_path, monkeypatch, kinds) -> None:
    """The wiring CUDA uses for generate's prompt (the fused Triton prefill writing the starting
    states), run here under the Triton interpreter; then token steps through the decode op."""
    import hydracc.runtime.cache as cache_module
    from hydracc.kernels import triton_prefill

    src = tiny_checkpoint("llama-gqa")
    convert(src, tmp_path / "out", plan_file=plan_with_kinds(src, tmp_path, kinds, True), seq_len=16, calib_samples=2)
    model = hydracc.load(tmp_path / "out")
    ids = _ids(12, batch=2)

    def decode(first_chunk: int) -> torch.Tensor:
        cache = HybridCache(model.config)
        with torch.no_grad():
            pieces = [model(ids[:, :first_chunk], past_key_values=cache, use_cache=True).logits]
            pieces.append(model(ids[:, first_chunk : first_chunk + 2], past_key_values=cache, use_cache=True).logits)
            for t in range(first_chunk + 2, 12):
                pieces.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
        return torch.cat(pieces, 1)

    torch_path = decode(5)
    calls = []
    real = triton_prefill.hybrid_prefill

    def spy(*args, **kwargs):
        calls.append(kwargs.get("states") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_prefill, "hybrid_prefill", spy)
    monkeypatch.setattr(cache_module, "FUSED_PREFILL_DEVICES", {"cpu"})
    monkeypatch.setattr(cache_module, "FUSED_PREFILL_DTYPES", {torch.float32})
    torch.testing.assert_close(decode(5), torch_path, rtol=1e-4, atol=1e-5)  # later chunk and steps: torch path
    assert calls == [True, True], "both layers' first chunks ran the fused prefill, writing states"
    monkeypatch.setattr(cache_module, "DECODE_OP_DEVICES", {"cpu"})
    torch.testing.assert_close(decode(5), torch_path, rtol=1e-4, atol=1e-5)  # token steps: the decode op
