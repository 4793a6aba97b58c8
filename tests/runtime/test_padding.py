"""Padded batches: every row of a padded batch computes what its prompt alone computes."""

from __future__ import annotations

import pytest
import torch
from helpers import plan_with_kinds

import hydracc
from hydracc.convert import convert
from hydracc.runtime.loader import PaddingNotSupportedError

LEARNED = [["full", "hedgehog", "gdn", "elu"], ["gdn", "elu", "hedgehog", "full"]]
ELU = [["full", "elu", "elu", "elu"], ["elu", "elu", "full", "elu"]]
WITH_STREAMING = [["full", "hedgehog", "gdn", "streaming"], ["streaming", "elu", "gdn", "hedgehog"]]
LENGTHS = [9, 4, 12]


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    made = {}

    def get(name: str, kinds: list[list[str]]):
        if name not in made:
            src = tiny_checkpoint("llama-gqa")
            tmp = tmp_path_factory.mktemp(name)
            plan = plan_with_kinds(src, tmp, kinds, fusion=True, window=4, sink=1)
            convert(src, tmp / "out", plan_file=plan, seq_len=16, calib_samples=2)
            made[name] = hydracc.load(tmp / "out")
        return made[name]

    return get


def _prompts(seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 64, (n,), generator=g) for n in LENGTHS]


def _padded(prompts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        at = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[row, at], mask[row, at] = p, 1
    return ids, mask


@pytest.mark.parametrize("kinds", ["elu", "learned", "with-streaming"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_forward_of_a_padded_batch_equals_each_row_alone(converted, kinds, side) -> None:
    model = converted(kinds, {"elu": ELU, "learned": LEARNED, "with-streaming": WITH_STREAMING}[kinds])
    prompts = _prompts()
    ids, mask = _padded(prompts, side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate makes them: each row's tokens from 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions).logits
        for row, p in enumerate(prompts):
            alone = model(p[None]).logits[0]
            got = batch[row, -len(p):] if side == "left" else batch[row, : len(p)]
            torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kinds", ["elu", "learned"])
@pytest.mark.parametrize("decode_op", [False, True], ids=["torch-steps", "decode-op-device"])
def test_generate_with_left_padding_equals_each_prompt_alone(converted, monkeypatch, kinds, decode_op) -> None:
    import hydracc.runtime.cache as cache_module

    model = converted(kinds, {"elu": ELU, "learned": LEARNED}[kinds])
    if decode_op:  # where unpadded steps would take the fused decode op, padded ones still come out right
        monkeypatch.setattr(cache_module, "DECODE_OP_DEVICES", {"cpu"})
    prompts = _prompts()
    ids, mask = _padded(prompts, "left")
    new = 6
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                               output_scores=True, return_dict_in_generate=True)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=new, do_sample=False, pad_token_id=0,
                                   output_scores=True, return_dict_in_generate=True)
            assert torch.equal(batch.sequences[row, -new:], alone.sequences[0, -new:]), f"row {row}"
            for step in range(new):
                torch.testing.assert_close(batch.scores[step][row], alone.scores[step][0], rtol=1e-4, atol=1e-5)


def test_padded_generation_with_streaming_heads_is_refused(converted) -> None:
    model = converted("with-streaming", WITH_STREAMING)
    ids, mask = _padded(_prompts(), "left")
    with torch.no_grad(), pytest.raises(PaddingNotSupportedError, match="streaming"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    model.generate(ids[1:2, -4:], max_new_tokens=2, do_sample=False, pad_token_id=0)  # unpadded: fine


def test_masks_the_runtime_cannot_honour_are_refused(converted) -> None:
    model = converted("elu", ELU)
    ids, mask = _padded(_prompts(), "right")
    with torch.no_grad():
        with pytest.raises(PaddingNotSupportedError, match="right padding"):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        holes = torch.ones_like(mask)
        holes[0, 5] = 0  # a hole inside a row
        with pytest.raises(PaddingNotSupportedError, match="not causal"):
            model(ids, attention_mask=holes)


def test_reordered_rows_keep_their_padding(converted) -> None:
    """Reordering a padded batch's cache across prompts moves each row's padding with it."""
    from hydracc.runtime.cache import HybridCache

    model = converted("learned", LEARNED)
    prompts = _prompts()
    ids, mask = _padded(prompts, "left")
    order = torch.tensor([2, 0, 1])
    nxt = torch.randint(1, 64, (3, 1), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = HybridCache(model.config)
        model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), past_key_values=cache,
              use_cache=True)
        cache.reorder_cache(order)
        mask = torch.cat([mask[order], torch.ones(3, 1, dtype=torch.long)], 1)
        step = model(nxt, attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1, past_key_values=cache,
                     use_cache=True).logits[:, -1]
        for row, src in enumerate(order.tolist()):
            alone = model(torch.cat([prompts[src], nxt[row]])[None]).logits[0, -1]
            torch.testing.assert_close(step[row], alone, rtol=1e-4, atol=1e-5)


def test_beam_search_over_a_left_padded_batch_equals_each_prompt_alone(converted) -> None:
    """Beams repeat the rows before the prompt runs and reorder them within a prompt's beams."""
    model = converted("learned", LEARNED)
    prompts = _prompts()
    ids, mask = _padded(prompts, "left")
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
            assert torch.equal(batch[row, -5:], alone[0, -5:]), f"row {row}"
