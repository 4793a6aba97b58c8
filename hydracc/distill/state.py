"""Distill stage, resumable state: one file beside the output, replaced atomically.

Design decisions:
- The parameters, Adam moments and the position (stage, layer, step, losses) live in one
  safetensors file (position and fingerprint in its metadata), written to a temporary name and
  renamed, so the position always matches the tensors. Under torch.distributed only rank 0
  writes; every rank reads it on ``--resume``.
- ``--resume`` refuses a state whose fingerprint (inputs, plan, calibration tokens, training
  settings but the save interval and device) differs from the run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from hydracc import distributed
from hydracc.analysis.calibration import Calibration
from hydracc.errors import HydraError, OutputError
from hydracc.planning.plan import Plan


class DistillError(HydraError):
    """Distillation cannot start or resume."""


class TrainingState:
    """The resumable training state in one file: tensors, with position and fingerprint as metadata."""

    FILE = "state.safetensors"

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.dir = directory
        self.fingerprint = fingerprint

    def save(self, values: dict[str, Tensor], optimizer: torch.optim.Adam | None, names: list[str], position: dict[str, Any],
             extra: dict[str, Tensor] | None = None) -> None:
        """``extra``: more tensors to keep, under their own (prefixed) names."""
        if not distributed.is_main():
            return
        tensors = {f"param/{k}": v.detach().cpu().contiguous() for k, v in values.items()}
        tensors.update({k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()})
        if optimizer is not None:
            for name, p in zip(names, optimizer.param_groups[0]["params"]):
                st = optimizer.state.get(p)
                if st:
                    tensors[f"adam/{name}/exp_avg"] = st["exp_avg"].cpu().contiguous()
                    tensors[f"adam/{name}/exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
                    tensors[f"adam/{name}/step"] = torch.as_tensor(float(st["step"]), dtype=torch.float64).reshape(1)
        made = not self.dir.exists()
        tmp = self.dir / (self.FILE + ".tmp")
        meta = {"hydracc_distill": json.dumps({"fingerprint": self.fingerprint, **position})}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, self.dir / self.FILE)  # one rename: the position always matches the tensors
        except (OSError, SafetensorError) as exc:  # a full disk: the last good state (if any) stays
            tmp.unlink(missing_ok=True)
            if made:
                shutil.rmtree(self.dir, ignore_errors=True)
            raise OutputError(f"cannot save the distillation state in {self.dir}: {getattr(exc, 'strerror', None) or exc}",
                              hint="check the free space and permissions beside the output folder") from exc

    def load(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        path = self.dir / self.FILE
        if not path.is_file():
            raise DistillError(
                f"--resume: no distillation state in {self.dir}",
                hint="run without --resume to start over (a state is first saved after --save-every steps)",
            )
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("hydracc_distill")
        meta = json.loads(raw) if raw else {}
        if meta.get("fingerprint") != self.fingerprint:
            raise DistillError(
                f"--resume: the state in {self.dir} was written for other inputs or settings",
                hint="rerun with the same checkpoint, plan, calibration and distill options, or without --resume to start over",
            )
        return meta, load_file(str(path))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def restore_adam(optimizer: torch.optim.Adam, names: list[str], tensors: dict[str, Tensor]) -> None:
    for name, p in zip(names, optimizer.param_groups[0]["params"]):
        if f"adam/{name}/exp_avg" in tensors:
            optimizer.state[p] = {
                "step": torch.tensor(float(tensors[f"adam/{name}/step"][0])),
                "exp_avg": tensors[f"adam/{name}/exp_avg"].to(p.device).clone(),
                "exp_avg_sq": tensors[f"adam/{name}/exp_avg_sq"].to(p.device).clone(),
            }


def state_dir_for(out: str | os.PathLike[str]) -> Path:
    """Where the resumable distillation state of a conversion to ``out`` lives."""
    p = Path(out)
    return p.parent / f"{p.name}.hydracc-distill"


def fingerprint(extra: str, settings: Any, plan: Plan, calibration: Calibration) -> str:
    """What a saved state must match to be resumed: inputs, plan, calibration tokens, settings."""
    trained = {k: v for k, v in asdict(settings).items() if k not in ("save_every", "device")}
    doc = {"inputs": extra, "settings": trained, "plan": plan.to_json(),
           "calibration": hashlib.sha256(calibration.tokens.astype("int64").tobytes()).hexdigest(),
           "shape": list(calibration.tokens.shape)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
