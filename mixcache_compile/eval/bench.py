"""``mixcache bench``: this project's policies against uncached baselines and peer caching methods.

Two workloads, one process:

* fidelity: the shipped tiny text-to-video model (``mixcache_compile.zoo``), a few prompts x
  seeds; each method's output is compared (PSNR / SSIM, ``eval/metrics.py``) with the uncached
  eager output of the same prompt and seed;
* speed: a larger random-weight ``WanTransformer3DModel`` (same class; speed does not depend
  on trained weights) driven by a stock ``WanPipeline`` (``vae=None``, prompt embeddings given,
  ``output_type="latent"``); every method's generation time is the median of repetitions
  interleaved round-robin with both uncached baselines (``eval/timing.py``), and its speedup is
  measured against the uncached baseline of its own mode: eager methods against the eager
  pipeline, compiled methods against plain ``torch.compile`` (inductor).

Methods: uncached eager and inductor; ``mixcache_compile.enable(pipe, policy=..., engine=...)``
for every policy of ``POLICIES`` that imports (engine ``eager`` in eager mode, ``inductor`` in
compiled mode); the peers of ``eval/peers.py`` (diffusers cache hooks, cache-dit DBCache), also
under ``torch.compile``. All methods use the same scheduler, step count, prompts and seeds.

Writes ``DIR/bench.json``, ``DIR/bench.md`` and ``DIR/pareto.png``. ``python -m
mixcache_compile.eval.bench --help`` lists the options; ``docs/bench.md`` explains the columns.

The parts: ``bench_config.py`` (options), ``bench_workloads.py``, ``bench_methods.py``,
``bench_run.py`` (fidelity and speed runs), ``bench_report.py`` (JSON, markdown); this module
is the command.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .bench_config import PROMPTS, BenchConfig, parse_args
from .bench_methods import Handle, Method, build_methods, compiled_rows_for, main_knob
from .bench_report import markdown_table, plot_title, write_json, write_markdown
from .bench_run import run
from .bench_workloads import ShippedWorkload, SpeedWorkload, Workload

__all__ = [
    "PROMPTS", "BenchConfig", "Handle", "Method", "ShippedWorkload", "SpeedWorkload", "Workload", "build_methods",
    "compiled_rows_for", "main", "main_knob", "markdown_table", "parse_args", "run", "write_json", "write_markdown",
]


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    from ..progress import set_quiet
    from .pareto import plot_pareto

    set_quiet(cfg.quiet)
    results = run(cfg)
    out = Path(cfg.out)
    write_json(results, out / "bench.json")
    write_markdown(results, out / "bench.md")
    plot_pareto(results["rows"], out / "pareto.png", title=plot_title(results))
    print(markdown_table(results["rows"]))
    failed = [r for r in results["rows"] if r["status"] != "ok"]
    print(f"\n{len(results['rows'])} rows ({len(failed)} failed), wall {results['meta']['wall_s']:.0f} s; "
          f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'pareto.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
