"""What verifying an export costs at load: hashing every file (the first load in a process)
vs the per-process memo (later loads), and ``ExportedTransformer`` construction with and without
``verify``, A/B interleaved, medians of 7.

    mixcache export tests.export.common:wan_spec --out /tmp/wan-onnx --policy static -o every=2
    python tools/bench_export_verify.py /tmp/wan-onnx
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from mixcache_compile.export import ExportedTransformer, Manifest
from mixcache_compile.export.integrity import forget_verified, verify_files



def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def med(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def main(directory: Path, repeats: int = 7) -> None:
    m = Manifest.load(directory)
    total = sum(r["bytes"] for r in m.files.values())
    rows: dict[str, list[float]] = {"first": [], "again": [], "verify": [], "no verify": []}
    hashed = {}
    for _ in range(repeats):
        forget_verified()
        t, hashed["first"] = timed(lambda: verify_files(directory, m.files))
        rows["first"].append(t)
        t, hashed["again"] = timed(lambda: verify_files(directory, m.files))
        rows["again"].append(t)
        rows["verify"].append(timed(lambda: ExportedTransformer(directory, policy="none"))[0])
        rows["no verify"].append(timed(lambda: ExportedTransformer(directory, policy="none", verify=False))[0])
    print(f"{len(m.files)} files, {total / 1e6:.1f} MB; hash all (first load in a process): {med(rows['first']):.1f} ms "
          f"({hashed['first']} hashed); again (memo): {med(rows['again']):.2f} ms ({hashed['again']} hashed); "
          f"ExportedTransformer verify=True (memo warm): {med(rows['verify']):.1f} ms, verify=False: {med(rows['no verify']):.1f} ms")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
