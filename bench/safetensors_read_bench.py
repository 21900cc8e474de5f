"""Peak RSS and time of reading every tensor of a ~1 GB multi-tensor .safetensors file, one at a time.

Readers compared (each in a fresh subprocess, so peak RSS is its own):

  ours       ``explorer.io.formats.safetensors_io.SafetensorsFile.read`` (plain reads into a fresh buffer)
  safe_open  ``safetensors.safe_open(path, "pt").get_tensor`` with one handle open for the whole pass
             (how a lazy loader uses it)

Each reader touches every tensor (a sum) and drops it before the next, as the merge loop does. The
file is written once (float32 tensors of ``--mib`` MiB) and read ``--repeats`` times per reader,
alternating, after one warm-up pass, so both read from the page cache. Usage, from the repo root:

    python bench/safetensors_read_bench.py [--gib 1] [--mib 16] [--repeats 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_file(path: Path, gib: float, mib: int) -> int:
    """Write ``gib`` GiB of float32 tensors of ``mib`` MiB each to ``path``; returns the tensor count."""
    import torch
    from safetensors.torch import save_file

    count = max(1, int(gib * 1024 / mib))
    numel = mib * 1024**2 // 4
    tensors = {f"model.layers.{i}.weight": torch.full((numel,), float(i)) for i in range(count)}
    save_file(tensors, str(path))
    return count


def read_all(reader: str, path: Path) -> dict:
    """Read every tensor of ``path`` with ``reader``, one at a time; seconds and peak RSS (MiB)."""
    import torch  # noqa: F401  (imported before the baseline so its own memory is not counted)

    baseline = _peak_rss_mib()
    start = time.perf_counter()
    total = 0.0
    if reader == "ours":
        from explorer.io.formats.safetensors_io import SafetensorsFile

        f = SafetensorsFile(path)
        for name in f.keys():
            tensor = f.read(name)
            total += float(tensor.sum())
            del tensor
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                total += float(tensor.sum())
                del tensor
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib()
    return {
        "reader": reader,
        "seconds": round(seconds, 3),
        "peak_rss_mib": round(peak),
        "rss_above_import_mib": round(peak - baseline),
        "checksum": total,
    }


def _peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(reader: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", reader, str(path)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--child", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(ROOT))
        print(json.dumps(read_all(args.child[0], Path(args.child[1]))))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "model.safetensors"
        count = write_file(path, args.gib, args.mib)
        print(f"{path.stat().st_size / 1024**3:.2f} GiB, {count} tensors of {args.mib} MiB")
        run("ours", path)  # warm the page cache
        results = [run(reader, path) for _ in range(args.repeats) for reader in ("ours", "safe_open")]
    if len({r["checksum"] for r in results}) != 1:
        raise SystemExit(f"readers disagree: {results}")
    print(f"{'reader':10} {'seconds':>8} {'peak RSS MiB':>13} {'above import':>13}")
    for r in results:
        print(f"{r['reader']:10} {r['seconds']:8.3f} {r['peak_rss_mib']:13d} {r['rss_above_import_mib']:13d}")


if __name__ == "__main__":
    main()
