"""Distill stage, resumable state: one file beside the output, replaced atomically.

Design decisions:
- The parameters, Adam moments and the position (stage, layer, step, losses) live in one
  safetensors file (position and fingerprint in its metadata), written to a temporary name and
  renamed, so the position always matches the tensors. Under torch.distributed only rank 0
  writes; every rank reads it on ``--resume``.
- ``--resume`` refuses a state whose fingerprint (inputs, plan, calibration tokens, training
  settings but the save interval and device) differs from the run's.
- The folder is claimed before any work (``claim``): created with an owner marker
  (``.hydracc-distill.json``: format, pid, host), or taken over from a finished or killed hydracc
  run. A folder without the marker is the user's and is refused; one whose marker names a live
  process is another run's and is refused. Clean-up (``release``) removes only the files hydracc
  writes there, and the folder only once it is empty.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
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
from hydracc.paths import process_running
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
        tmp = self.dir / (self.FILE + ".tmp")
        meta = {"hydracc_distill": json.dumps({"fingerprint": self.fingerprint, **position})}
        if not (self.dir / MARKER).is_file():  # not claimed by run_conversion (a direct API call): claim it now
            self.claim()
        try:
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, self.dir / self.FILE)  # one rename: the position always matches the tensors
        except (OSError, SafetensorError) as exc:  # a full disk: the last good state (if any) stays
            tmp.unlink(missing_ok=True)
            if not (self.dir / self.FILE).is_file():
                self.release()
            raise OutputError(f"cannot save the distillation state in {self.dir}: {getattr(exc, 'strerror', None) or exc}",
                              hint="check the free space and permissions beside the output folder") from exc

    def load(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        path = self.dir / self.FILE
        if not path.is_file():
            raise DistillError(
                f"--resume: no distillation state in {self.dir}",
                hint="run without --resume to start over (a state is first saved after --save-every steps)",
            )
        meta = self.read_position()
        if meta.get("fingerprint") != self.fingerprint:
            raise DistillError(
                f"--resume: the state in {self.dir} was written for other inputs or settings",
                hint="rerun with the same checkpoint, plan, calibration and distill options, or without --resume to start over",
            )
        try:
            return meta, load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise self._unreadable(exc) from exc

    def read_position(self) -> dict[str, Any]:
        """The saved state's metadata (position and fingerprint); a damaged file is a ``DistillError``."""
        path = self.dir / self.FILE
        try:
            with safe_open(str(path), "pt") as f:
                raw = (f.metadata() or {}).get("hydracc_distill")
            meta = json.loads(raw) if raw else {}
        except (OSError, SafetensorError, ValueError) as exc:
            raise self._unreadable(exc) from exc
        if not isinstance(meta, dict):
            raise self._unreadable(ValueError("its metadata is not a JSON object"))
        return meta

    def _unreadable(self, exc: BaseException) -> DistillError:
        return DistillError(
            f"--resume: the distillation state {self.dir / self.FILE} is damaged or truncated ({exc})",
            hint="run without --resume to start over (the damaged state is replaced at the first save)",
        )

    # -- ownership ---------------------------------------------------------------------
    def claim(self, *, resume: bool = False) -> None:
        """Make ``self.dir`` this run's before any work; see the module docstring. Rank 0 only."""
        if not distributed.is_main():
            return
        where = self.dir
        if where.is_symlink() or (where.exists() and not where.is_dir()):
            raise OutputError(f"{where} exists and is not a distillation state folder hydracc made",
                              hint="move it away, or choose another output path")
        try:
            where.mkdir()
        except FileExistsError:
            owner = read_owner(where)
            if owner is None and not self._unmarked_state():
                raise OutputError(
                    f"refusing to use {where} for the distillation state: the folder is not hydracc's (no {MARKER} in it)",
                    hint="move your files out of it, or choose another output path",
                ) from None
            here = owner is None or owner.get("host") == socket.gethostname()
            if owner is not None and owner_is_alive(owner) and (here or not resume):
                where_run = f"pid {owner.get('pid')}" + ("" if here else f" on {str(owner.get('host'))[:64]}")
                raise OutputError(
                    f"another hydracc run ({where_run}) is distilling into {where}",
                    hint="wait for it to finish, or write this conversion to another output path" + (
                        "" if here else "; if that run is gone (a job moved to another machine), rerun with --resume "
                        "to take its state over"),
                ) from None
        except OSError as exc:
            raise OutputError(f"cannot create the distillation state folder {where}: {exc.strerror or exc}",
                              hint="check the permissions of the output's parent folder") from exc
        owner_doc = {"format": MARKER_FORMAT, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        tmp = where / (MARKER + ".tmp")
        try:
            tmp.write_text(json.dumps(owner_doc) + "\n", encoding="utf-8")
            os.replace(tmp, where / MARKER)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            try:
                where.rmdir()  # only if empty: one this call just made
            except OSError:
                pass
            raise OutputError(f"cannot write {where / MARKER}: {exc.strerror or exc}",
                              hint="check the free space and permissions beside the output folder") from exc
        if resume:
            try:
                if not self.has_state():
                    raise DistillError(
                        f"--resume: no distillation state in {where}",
                        hint="run without --resume to start over (a state is first saved after --save-every steps)",
                    )
                self.read_position()  # a damaged file fails now, before any work
            except DistillError:
                self.release(keep_state=True)
                raise

    def release(self, *, keep_state: bool = False) -> None:
        """Remove what hydracc wrote in ``self.dir`` (the state unless ``keep_state``; the marker once no state is
        left), then the folder if nothing else is in it. A folder this process does not own is left alone."""
        if not distributed.is_main():
            return
        owner = read_owner(self.dir)
        if owner is None or owner.get("pid") != os.getpid() or owner.get("host") != socket.gethostname():
            return
        names = [self.FILE + ".tmp", MARKER + ".tmp"] + ([] if keep_state else [self.FILE])
        for name in names:
            (self.dir / name).unlink(missing_ok=True)
        if (self.dir / self.FILE).is_file():
            return
        (self.dir / MARKER).unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:  # the user's files are in it: they stay, and so does the folder
            pass

    def has_state(self) -> bool:
        return (self.dir / self.FILE).is_file()

    def _unmarked_state(self) -> bool:
        """A folder an earlier hydracc wrote before the marker existed: nothing but its state file (and temporary),
        the state carrying hydracc's metadata."""
        try:
            names = {p.name for p in self.dir.iterdir()}
        except OSError:
            return False
        if not names or not names <= {self.FILE, self.FILE + ".tmp"} or self.FILE not in names:
            return False
        try:
            with safe_open(str(self.dir / self.FILE), "pt") as f:
                return "hydracc_distill" in (f.metadata() or {})
        except (OSError, SafetensorError):
            return False


MARKER = ".hydracc-distill.json"
"""In every distillation state folder hydracc made: who owns it (``format``, ``pid``, ``host``)."""
MARKER_FORMAT = "hydracc-distill-state"


def read_owner(folder: Path) -> dict[str, Any] | None:
    """The owner marker of a state folder, or ``None`` when the folder is not hydracc's."""
    try:
        doc = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != MARKER_FORMAT:
        return None
    return doc


def owner_is_alive(owner: dict[str, Any]) -> bool:
    """Whether the marker names another process that runs on this machine (a run on another host counts as alive)."""
    return owner.get("pid") != os.getpid() and process_running(owner.get("pid"), owner.get("host"))


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
