"""Print, for each class of tests/tiny_models_sweep.py, what the mixcache backend does with it
(the rows of README's models table): the chains it plans and its stage count, or the
reasons it falls back; then the rows of the classes not swept, with the reason.

    OMP_NUM_THREADS=1 PYTHONPATH=. python tools/sweep_models.py [ClassName ...]

Each class runs ``sweep_one`` of tests/passes/test_model_sweep.py (the test's own check), so
a row says "equals eager" only when both calls' outputs matched the eager model within 1e-5.
An exception is printed as a row too (and would fail the test).
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.passes.test_model_sweep import sweep_one  # noqa: E402
from tests.tiny_models_sweep import DEFAULT, EXACT_TESTED, NOT_SWEPT, SPECS  # noqa: E402


def _reasons(warns: list[str]) -> str:
    reasons = {w.split("not caching this graph: ")[-1].split("; compiling")[0] for w in warns if "not caching" in w}
    return "; ".join(sorted(reasons))


def describe(name: str) -> str:
    try:
        session, warns, errors = sweep_one(name)
    except Exception as err:  # noqa: BLE001 - reported as a row, the test fails on it
        traceback.print_exc()
        return f"| `{name}` | - | - | EXCEPTION {type(err).__name__}: {str(err).splitlines()[0][:160]} |"
    equal = "equals eager" if max(errors) <= 1e-5 else f"DIFFERS from eager (max error {max(errors):.1e})"
    runner = session._runner
    if runner is None:
        return f"| `{name}` | - | - | falls back ({equal}): {_reasons(warns)} |"
    info, plan = runner.model_info, runner.plan
    single = all((g, g + 1) in info.reusable_ranges for g in range(info.num_blocks))
    stages = 2 + len(plan.glue) + sum(len(chain) for chain in plan.chains)
    chains = ", ".join(f"`{c}` ({len(chain)})" for c, chain in zip(plan.chain_names, plan.chains))
    others = [w for w in warns if "not caching" not in w]
    if others:
        print(f"{name}: other mixcache warnings: {sorted(set(others))}", file=sys.stderr)
    extra = f"; other graphs fell back: {_reasons(warns)}" if _reasons(warns) else ""
    unknown = session.stats()["flops_unknown"]
    if unknown:
        extra += f"; FLOPs not countable ({sorted(set(unknown.values()))[0][:120]})"
    return f"| `{name}` | {chains} | {'yes' if single else 'no'} | plans {stages} stages, {equal}{extra} |"


def main() -> None:
    names = sys.argv[1:] or sorted(SPECS)
    for name in names:
        torch._dynamo.reset()
        start = time.perf_counter()
        row = describe(name)
        tag = "" if name in DEFAULT else " (slow)"
        print(f"{row} {time.perf_counter() - start:.0f} s{tag}", flush=True)
    if not sys.argv[1:]:
        for name in sorted(EXACT_TESTED):
            print(f"| `{name}` | see tests/passes/test_models_exact.py | | planned (eager and inductor, batch 1 and 2) |")
        for name, reason in sorted(NOT_SWEPT.items()):
            print(f"| `{name}` | - | - | not swept: {reason} |")


if __name__ == "__main__":
    main()
