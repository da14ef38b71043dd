"""``mixcache export MODEL_OR_PIPE --format onnx --out DIR``: argument parsing for the command.

MODEL_OR_PIPE is ``zoo`` (the shipped tiny text-to-video pipeline) or ``module:function``, a
function returning ``(model_or_pipeline, example_call_kwargs)``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..cli_helpers import ModelSpecError, load_model_spec, parse_key_values
from ..policies import DEFAULT_POLICY
from ..progress import add_quiet_flag, is_quiet, set_quiet
from .exporter import VARIANTS, export
from .manifest import FORMATS
from .onnx_export import ExportError


def load_spec(spec: str, steps: int) -> tuple[Any, dict[str, Any]]:
    """``(model_or_pipeline, example_call_kwargs)`` of MODEL_OR_PIPE (``cli_helpers.load_model_spec``)."""
    try:
        return load_model_spec(spec, steps, disable_progress_bar=True if is_quiet() else None)
    except ModelSpecError as err:
        raise ExportError(str(err)) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixcache export", description="Export every stage and variant plus a manifest.")
    p.add_argument("model", metavar="MODEL_OR_PIPE", help="'zoo' or module:function returning (model_or_pipe, call_kwargs)")
    p.add_argument("--format", default="onnx", help=f"{' | '.join(FORMATS)} | tensorrt (ONNX, then TensorRT engines)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"default policy recorded in the manifest (default {DEFAULT_POLICY}, as enable(pipe); none: compile only)")
    p.add_argument("--option", "-o", action="append", default=[], help="policy option KEY=VALUE (JSON value)")
    p.add_argument("--cfg", default="auto", help="auto | separate | batched | none")
    p.add_argument("--steps", type=int, default=2, help="denoising steps of the example call (zoo)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="variant kinds to export (comma separated, may be empty)")
    p.add_argument("--dynamic", action="store_true", help="dynamic shapes (refused: exports are static)")
    p.add_argument("--no-verify", action="store_true", help="skip checking every file against the eager stage")
    add_quiet_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    set_quiet(args.quiet)
    try:
        fmt = "onnx" if args.format == "tensorrt" else args.format
        obj, call_kwargs = load_spec(args.model, args.steps)
        variants = tuple(v for v in args.variants.split(",") if v)
        report = export(obj, call_kwargs, args.out, format=fmt, policy=args.policy, cfg=args.cfg, variants=variants,
                        dynamic_shapes=True if args.dynamic else None, verify=not args.no_verify, **parse_key_values(args.option))
        if args.format == "tensorrt":
            from .tensorrt import build_engines

            engines = build_engines(args.out)
            print(f"TensorRT: {engines.built} engine(s) built, {engines.reused} reused")
    except (ExportError, ValueError, TypeError, RuntimeError) as err:
        print(f"mixcache export: {err}", file=sys.stderr)
        return 2
    m = report.manifest
    print(f"exported {len(m.stages)} stages x {len(m.signatures)} signature(s) to {report.directory} "
          f"({report.graphs_exported} graphs, {report.files} files, {report.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
