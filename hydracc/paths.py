"""Paths the user names, refused before any work when the filesystem cannot hold their names; and whether the
process a hydracc folder's owner marker names still runs (temporary output folders, distillation states).

Runtime-safe (no torch, no compiler modules): ``open_checkpoint`` uses it when loading a converted checkpoint.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from hydracc.errors import HydraError, OutputError

__all__ = ["SIDE_NAME_EXTRA", "TEMP_NAME_EXTRA", "check_name_length", "process_running"]

TEMP_NAME_EXTRA = len(".") + len(".hydracc-tmp-") + 8
"""Characters hydracc adds to an output folder's name for the folders it writes beside it: the temporary
``.OUT.hydracc-tmp-1a2b3c4d`` (``make_temp_folder``) and the set-aside ``.OUT.hydracc-old-1a2b3c4d`` (as long);
``OUT.hydracc-distill`` (the distillation state) is shorter."""
SIDE_NAME_EXTRA = len(".") + len(".tmp.png")
"""Characters added to a side file's name (``--plan-out``, ``--plan-png``) for its temporary ``.NAME.tmp[.png]``."""
_NAME_MAX, _PATH_MAX = 255, 4096
"""Linux's limits, for when the filesystem cannot be asked."""


def _fs_limits(path: Path) -> tuple[int, int]:
    """Longest file name and path (bytes) on the filesystem of ``path``'s nearest existing folder."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:  # isdir says False to a too-long name
        folder = os.path.dirname(folder)
    limits = []
    for key, default in (("PC_NAME_MAX", _NAME_MAX), ("PC_PATH_MAX", _PATH_MAX)):
        try:
            value = os.pathconf(folder, key)
        except (OSError, ValueError, AttributeError):
            value = -1
        limits.append(value if value and value > 0 else default)
    return limits[0], limits[1]


def check_name_length(path: str | os.PathLike[str], what: str, *, extra: int = 0, hint: str | None = None,
                      error: type[HydraError] = OutputError) -> None:
    """Refuse ``path`` before any work when a part of it is longer than its filesystem allows, counting the ``extra``
    characters hydracc adds to the last part (``TEMP_NAME_EXTRA`` for an output folder); ``what`` names it (``output``,
    ``--plan-out``). Raises ``error`` (exit 2) instead of an ``OSError: File name too long`` later."""
    p = Path(os.fspath(path)).expanduser()
    name_max, path_max = _fs_limits(p)
    parts = p.parts
    for i, part in enumerate(parts):
        added = extra if i == len(parts) - 1 else 0
        size = len(os.fsencode(part))
        if size + added > name_max:
            shown = part if len(part) <= 48 else f"{part[:20]}...{part[-20:]}"
            why = (f"{size} bytes, plus the {added} hydracc adds for the temporary copy it writes beside it"
                   if added else f"{size} bytes")
            raise error(
                f"{what}: the name {shown!r} is too long ({why}); this filesystem allows names of at most "
                f"{name_max} bytes",
                hint=hint or (f"choose a name of at most {max(1, name_max - added)} bytes" if added else
                              "check the path: no file on this filesystem can have that name"),
            )
    total = len(os.fsencode(os.path.abspath(p))) + extra
    if total > path_max:
        raise error(f"{what} {p} is too long: {total} bytes as an absolute path (with what hydracc adds), the "
                    f"limit is {path_max}", hint=hint or "choose a shorter path")


def process_running(pid: object, host: object) -> bool:
    """Whether process ``pid`` runs on ``host``, as an owner marker records them. A process on another host counts
    as running (it cannot be told from here); a pid that cannot be one (not an int in 1..2**31-1) as not running."""
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
        return False
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
