"""Conversion cost on CPU: wall time and peak memory of `hydracc convert` against model size.

Runs use ``--strategy even`` (no head analysis, which reads every weight into memory) so the
rows measure the load / capture / rewrite / emit path alone. What it shows: planning reads no tensor data, and converting streams tensors, so peak
memory should follow the output shard size (--max-shard-size), not the model size.

Usage: python benchmarks/convert_memory.py [--layers 16] [--hidden 1024] [--workdir DIR]
Builds a random Llama checkpoint (sharded at 100MB), then runs the CLI as subprocesses
and reads each one's peak resident memory (ru_maxrss). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` in a fresh process; return (wall seconds, peak RSS in MiB) for that process."""
    with tempfile.TemporaryFile(mode="w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, rusage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}: {err.read()}")
    return wall, rusage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hydracc-bench-"))
    ck = work / "model"
    hydracc = [sys.executable, "-m", "hydracc"]
    if not ck.exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_checkpoint.py"), str(ck),
                        "--layers", str(args.layers), "--hidden", str(args.hidden), "--heads", "16",
                        "--kv-heads", "4", "--max-shard-size", "100MB"], check=True, stdout=subprocess.DEVNULL)
    size_mb = sum(p.stat().st_size for p in ck.glob("*.safetensors")) / 2**20
    rows = []
    wall, rss = run_measured([*hydracc, "convert", str(ck), "--plan", "--strategy", "even", "-q"])
    rows.append(("`--plan --strategy even` (dry run, no analysis)", wall, rss))
    for shard in ("100MB", "1GB"):
        out = work / f"out-{shard}"
        shutil.rmtree(out, ignore_errors=True)
        wall, rss = run_measured([*hydracc, "convert", str(ck), "-o", str(out), "--strategy", "even", "--max-shard-size", shard, "-q"])
        rows.append((f"convert, --max-shard-size {shard}", wall, rss))
    import torch
    import transformers

    print(f"model: random Llama, {args.layers} layers, hidden {args.hidden}, 16 heads / 4 KV heads, fp32, "
          f"{size_mb:.0f} MiB in 100MB shards")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}\n")
    print("| command | wall (s) | peak RSS (MiB) |\n|---|---|---|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {rss:.0f} |")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
