"""The release gate: a converted checkpoint against its original, on the same fixed-seed data.

Decisions:
- Three figures, each with a threshold: perplexity increase (relative, on ``--calib`` rows or
  built-in text in the model's own tokens), recall ratio (converted / original accuracy on
  key-value recall probes drawn from the model's id space), and top-1 agreement of the two
  models' next-token predictions on the perplexity rows. The gate passes when all hold.
- A recall ratio means nothing when the original cannot recall: below ``MIN_ORIGINAL_RECALL``
  it is reported and not judged (``"judged": false``), never silently passed off as a pass.
- Pairs are checked before any model is built: the converted checkpoint's
  ``hydra.provenance.inputs`` must equal the original's file hashes.
- Only data and model loading differ from ``hydracc eval``: both models run the same batches in
  the same order, so two runs give the same figures.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hydracc.device import default_device
from hydracc.errors import HydraError
from hydracc.evaluation.probes import ProbeError, TokenSpace, heldout_ids, recall_probe, token_space

if TYPE_CHECKING:  # torch is imported when models run, so that `hydracc --help` stays fast
    import torch

MIN_ORIGINAL_RECALL = 0.2
"""Below this original accuracy the recall probe is reported but not judged."""


class VerifyError(HydraError):
    """The two checkpoints cannot be compared (they do not belong together, or data is missing)."""


@dataclass(frozen=True)
class Thresholds:
    max_ppl_increase: float = 0.10
    """Largest accepted relative perplexity increase (0.10: the converted model may be 10% worse)."""
    min_recall_ratio: float = 0.90
    """Smallest accepted converted / original recall-probe accuracy."""
    min_agreement: float = 0.80
    """Smallest accepted share of positions where both models predict the same next token."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise VerifyError(f"threshold {name} must be a finite number >= 0, got {value!r}")
        if self.min_recall_ratio > 10 or self.min_agreement > 1:
            raise VerifyError("min_agreement is a share (0..1) and min_recall_ratio a ratio (0..10)")


@dataclass(frozen=True)
class VerifySettings:
    samples: int = 16
    seq_len: int = 256
    recall_samples: int = 32
    recall_pairs: tuple[int, ...] = (4, 8)
    batch: int = 8
    seed: int = 1234


@dataclass
class VerifyReport:
    original: str
    converted: str
    data: str
    device: str
    figures: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.checks.values() if c.get("judged", True))

    def to_json(self) -> dict[str, Any]:
        return {"original": self.original, "converted": self.converted, "data": self.data, "device": self.device,
                "passed": self.passed, "figures": self.figures, "checks": self.checks}


def check_pair(original: str | os.PathLike[str], converted: str | os.PathLike[str]) -> tuple[Any, Any]:
    """Open both checkpoints (headers only) and refuse a pair that does not belong together."""
    from hydracc.frontend.checkpoint import open_checkpoint
    from hydracc.runtime.hydra_config import read_hydra_layers

    orig = open_checkpoint(original)
    conv = open_checkpoint(converted)
    orig.close()
    conv.close()
    if "hydra" in orig.config:
        raise VerifyError(f"{orig.root} is itself a converted checkpoint", hint="give the original checkpoint first, the converted one second")
    read_hydra_layers(conv.config, str(conv.root))
    recorded = (conv.config["hydra"].get("provenance") or {}).get("inputs")
    if not isinstance(recorded, dict):
        raise VerifyError(f"{conv.root}: hydra.provenance.inputs is missing, so its original cannot be checked")
    actual = orig.sha256()
    if recorded != actual:
        differ = sorted(k for k in set(recorded) | set(actual) if recorded.get(k) != actual.get(k))
        raise VerifyError(
            f"{conv.root} was not converted from {orig.root}: the recorded input hashes differ for {', '.join(differ[:4])}",
            hint="verify a conversion against the exact checkpoint it was converted from",
        )
    return orig, conv


def _text_rows(ck: Any, space: TokenSpace, calib: str | os.PathLike[str] | None, s: VerifySettings) -> tuple[np.ndarray, str]:
    from hydracc.analysis.calibration import load_calibration

    if calib is not None:
        cal = load_calibration(calib, vocab_size=space.vocab_size, samples=s.samples, seq_len=s.seq_len, checkpoint_root=ck.root)
        return cal.tokens, cal.source
    ids = heldout_ids(space, 64 * s.samples * s.seq_len)
    rows = len(ids) // s.seq_len
    if rows < 1:
        raise VerifyError("the built-in text is too short for --seq-len", hint="use a smaller --seq-len")
    rng = np.random.default_rng(s.seed)
    pick = np.sort(rng.choice(rows, size=min(rows, s.samples), replace=False))
    return ids[: rows * s.seq_len].reshape(rows, s.seq_len)[pick], "built-in: held-out standard-library text"


def _logits(model: torch.nn.Module, x: np.ndarray, device: torch.device) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(x).to(device)).logits.float().cpu()


def verify(
    original: str | os.PathLike[str],
    converted: str | os.PathLike[str],
    *,
    thresholds: Thresholds | None = None,
    calib: str | os.PathLike[str] | None = None,
    settings: VerifySettings | None = None,
    device: str | torch.device | None = None,
    allow_nonfinite: bool = False,
    check_hashes: bool = True,
) -> VerifyReport:
    """Compare ``converted`` with ``original``; ``report.passed`` says whether every judged threshold held.

    The converted weights are first checked against the digests their config records (``check_hashes``),
    so a checkpoint edited after conversion is refused before any model runs."""
    import torch
    import torch.nn.functional as F

    from hydracc.runtime.loader import check_weight_digests, from_pretrained, load

    t = thresholds or Thresholds()
    s = settings or VerifySettings()
    dev = default_device(device)
    orig_ck, conv_ck = check_pair(original, converted)
    if check_hashes:
        check_weight_digests(conv_ck.root, conv_ck.config)
    vocab = int(orig_ck.config.get("vocab_size") or 0)
    limit = orig_ck.config.get("max_position_embeddings") or orig_ck.config.get("n_positions")
    if isinstance(limit, int) and s.seq_len > limit:
        raise VerifyError(f"--seq-len {s.seq_len} is longer than the model's {limit} positions", hint=f"use --seq-len {limit} or less")
    space = token_space(orig_ck.root, vocab)
    rows, source = _text_rows(orig_ck, space, calib, s)
    rng = np.random.default_rng(s.seed)
    probe = "mqar (byte level)" if space.bytes else "key-value recall in the model's ids"
    probes = [(p, *zip(*[recall_probe(space, p, s.seq_len, rng) for _ in range(s.recall_samples)], strict=True))
              for p in s.recall_pairs if 4 * p < s.seq_len]
    models = {
        "original": from_pretrained(orig_ck.root, orig_ck.config, allow_nonfinite=allow_nonfinite,
                                    attn_implementation="sdpa").to(dev).eval(),
        "converted": load(conv_ck.root, device=dev, allow_nonfinite=allow_nonfinite, check_hashes=False),
    }
    report = VerifyReport(str(orig_ck.root), str(conv_ck.root), source, str(dev))
    nll = {name: 0.0 for name in models}
    agree = count = 0
    for i in range(0, len(rows), s.batch):
        x = rows[i : i + s.batch]
        out = {name: _logits(m, x, dev) for name, m in models.items()}
        y = torch.from_numpy(x[:, 1:])
        for name, logits in out.items():
            nll[name] += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        agree += int((out["original"].argmax(-1) == out["converted"].argmax(-1)).sum())
        count += x.size
    tokens = rows.shape[0] * (rows.shape[1] - 1)
    ppl = {name: math.exp(v / tokens) for name, v in nll.items()}
    recall: dict[str, dict[str, float]] = {name: {} for name in models}
    for pairs, xs, ys in probes:
        x, y = np.stack(xs), np.stack(ys)
        for name, m in models.items():
            right = total = 0
            for i in range(0, len(x), s.batch):
                hit = _logits(m, x[i : i + s.batch], dev).argmax(-1) == torch.from_numpy(y[i : i + s.batch])
                mask = torch.from_numpy(y[i : i + s.batch] != -100)
                right += int((hit & mask).sum())
                total += int(mask.sum())
            recall[name][f"pairs={pairs}"] = right / total
    mean_recall = {name: float(np.mean(list(r.values()))) if r else float("nan") for name, r in recall.items()}
    increase = ppl["converted"] / ppl["original"] - 1
    agreement = agree / count
    report.figures = {
        "ppl": {k: round(v, 4) for k, v in ppl.items()}, "ppl_increase": round(increase, 4),
        "recall": {name: {k: round(v, 4) for k, v in r.items()} for name, r in recall.items()},
        "recall_accuracy": {k: round(v, 4) for k, v in mean_recall.items()},
        "agreement": round(agreement, 4), "tokens": tokens, "recall_probe": probe,
    }
    judged = mean_recall["original"] >= MIN_ORIGINAL_RECALL
    ratio = mean_recall["converted"] / mean_recall["original"] if mean_recall["original"] > 0 else float("nan")
    report.checks = {
        "ppl_increase": {"value": round(increase, 4), "threshold": t.max_ppl_increase, "ok": increase <= t.max_ppl_increase},
        "recall_ratio": {"value": round(ratio, 4) if math.isfinite(ratio) else None, "threshold": t.min_recall_ratio,
                         "ok": bool(math.isfinite(ratio) and ratio >= t.min_recall_ratio), "judged": judged,
                         **({} if judged else {"why_not_judged": f"the original's recall accuracy "
                            f"{mean_recall['original']:.3f} is below {MIN_ORIGINAL_RECALL}"})},
        "agreement": {"value": round(agreement, 4), "threshold": t.min_agreement, "ok": agreement >= t.min_agreement},
    }
    return report


def card_path(converted: str | os.PathLike[str]) -> Path:
    """The converted folder's model card, checked before any work: it must be hydracc's."""
    root = Path(converted)
    card = (root.parent if root.is_file() else root) / "README.md"
    text = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else ""
    if "\n- \"hydracc\"\n" not in text:
        raise VerifyError(f"{card} is not a model card hydracc wrote", hint="--update-card updates the card of a converted "
                          "folder; convert again to get one, or drop --update-card")
    from hydracc.emit.model_card import with_verification

    try:
        with_verification(text, {})  # its markers are checked now, before the models run
    except ValueError as exc:
        raise VerifyError(f"{card}: {exc}", hint="restore or remove the verification section's marker lines, then rerun "
                          "--update-card") from None
    return card


def update_card(converted: str | os.PathLike[str], report: VerifyReport) -> Path:
    """Write ``report``'s figures into the converted folder's card (replacing an earlier verification
    section); the file is replaced atomically and keeps its mode."""
    from hydracc.emit.model_card import with_verification

    card = card_path(converted)
    text = with_verification(card.read_text(encoding="utf-8"), report.to_json())
    tmp = card.with_name(f".{card.name}.hydracc-tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, card.stat().st_mode & 0o777)
        os.replace(tmp, card)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise VerifyError(f"cannot update {card}: {exc}") from exc
    return card


def default_thresholds() -> dict[str, float]:
    return asdict(Thresholds())


__all__ = ["MIN_ORIGINAL_RECALL", "ProbeError", "Thresholds", "VerifyError", "VerifyReport", "VerifySettings", "card_path",
           "check_pair", "default_thresholds", "update_card", "verify"]

