"""Print, for each class of tests/tiny_models_sweep.py, what the mixcache backend does with it
(the rows of README's models table): the chains it plans, or the reasons it falls back.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/sweep_models.py [ClassName ...]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.passes.test_model_sweep import sweep_one  # noqa: E402
from tests.tiny_models_sweep import SPECS  # noqa: E402


def describe(name: str) -> str:
    session, warns, errors = sweep_one(name)
    runner = session._runner
    if runner is None:
        reasons = sorted({w.split("not caching this graph: ")[-1].split("; compiling")[0] for w in warns})
        return f"| `{name}` | - | - | falls back: {'; '.join(reasons)} | max error {max(errors):.1e}"
    info = runner.model_info
    single = all((g, g + 1) in info.reusable_ranges for g in range(info.num_blocks))
    chains = ", ".join(f"`{c}`" for c in runner.plan.chain_names)
    return f"| `{name}` | {chains} | {'yes' if single else 'no'} | planned | max error {max(errors):.1e}"


def main() -> None:
    for name in sys.argv[1:] or sorted(SPECS):
        torch._dynamo.reset()
        start = time.perf_counter()
        print(f"{describe(name)} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
