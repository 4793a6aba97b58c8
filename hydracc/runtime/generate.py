"""Continue a prompt with a converted checkpoint and its hybrid cache (``hydracc generate``'s work).

The cache is preallocated for the prompt plus the new tokens, as ``generate`` would size it. The
report compares the cache's bytes with the keys and values full attention would keep.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any

from hydracc.errors import HydraError


def check_generate_inputs(prompt: Any, *, max_new_tokens: Any, temperature: Any, top_k: Any) -> None:
    """Refuse what ``generate_text`` cannot use, before anything is loaded (``HydraError``, exit 2)."""
    if not isinstance(prompt, str):
        raise HydraError(f"--prompt must be text, got {type(prompt).__name__}")
    bad = next((i for i, ch in enumerate(prompt) if 0xD800 <= ord(ch) <= 0xDFFF), None)
    if bad is not None:  # bytes that are not UTF-8 arrive from the command line as lone surrogates
        raw = prompt[bad].encode("utf-8", "surrogateescape")
        raise HydraError(f"--prompt is not UTF-8 text: byte {raw[0]:#04x} at character {bad}",
                         hint="pass the prompt as UTF-8 (check the terminal's or the script's encoding)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise HydraError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise HydraError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise HydraError(f"--top-k must be an integer >= 0, got {top_k!r}")


def generate_text(path: str | os.PathLike[str], prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int = 0, seed: int = 0, device: Any = None, allow_nonfinite: bool = False,
                  check_hashes: bool = True) -> dict[str, Any]:
    """Greedy (``temperature`` 0) or sampled continuation of ``prompt``; returns the report
    (continuation, tokens/s, cache bytes). Bad input raises :class:`HydraError` before loading."""
    import torch
    from transformers import AutoTokenizer

    from hydracc.device import default_device
    from hydracc.runtime.cache import HybridCache
    from hydracc.runtime.loader import cache_argument, check_converted, load

    check_generate_inputs(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k)
    root, _, config = check_converted(path)  # the path and files first: a clear error, not transformers'
    if not (root / "tokenizer.json").is_file() and not (root / "tokenizer_config.json").is_file():
        raise HydraError(f"{root} has no tokenizer files", hint="copy the original model's tokenizer.json next to the converted weights")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices are not the user's business
        tokenizer = AutoTokenizer.from_pretrained(root, local_files_only=True, trust_remote_code=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    if ids.shape[1] == 0:
        raise HydraError("--prompt is empty after tokenization")
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(limit, int) and ids.shape[1] + max_new_tokens > limit:
        raise HydraError(f"--prompt is {ids.shape[1]} tokens; with --max-new-tokens {max_new_tokens} that is more than "
                         f"the model's {limit} positions", hint="shorten the prompt or ask for fewer new tokens")
    dev = default_device(device)
    model = load(root, device=dev, allow_nonfinite=allow_nonfinite, check_hashes=check_hashes)
    ids = ids.to(dev)
    cache = HybridCache(model.config, max_cache_len=ids.shape[1] + max_new_tokens - 1)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": top_k or None} if temperature > 0 else {"do_sample": False}
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=None, **{cache_argument(model): cache},
                             **sampling)
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    element = next(p.element_size() for p in model.parameters())
    tokens = cache.get_seq_length()
    sites = config["hydra"]["layers"]  # validated by load(); per layer KV heads and head dim
    full_kv = sum(2 * e["num_kv_heads"] * e["head_dim"] for e in sites) * element * tokens
    return {
        "status": "ok", "model": str(root), "prompt": prompt, "continuation": tokenizer.decode(new, skip_special_tokens=True),
        "new_tokens": int(new.numel()), "seconds": round(seconds, 4),
        "tokens_per_second": round(new.numel() / seconds, 2) if seconds > 0 else None,
        "cache": {"tokens": tokens, "bytes": cache.nbytes(), "kv_bytes": cache.kv_nbytes(), "full_attention_kv_bytes": full_kv},
    }
