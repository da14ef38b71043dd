"""The ``mixcache`` command: ``demo``, ``bench``, ``calibrate`` and ``export``.

Every command that runs for more than a few seconds shows progress bars on an interactive
terminal and takes ``--quiet`` (Note [quiet progress] in ``progress.py``); ``demo`` prints the
cached session's ``summary()``. ``bench``, ``calibrate`` and ``export`` parse their own
arguments (``mixcache bench --help``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="mixcache-compile: cached diffusion-transformer inference as a torch.compile backend.",
                  no_args_is_help=True, add_completion=False)


def _parse_options(pairs: list[str]) -> dict:
    from .cli_helpers import parse_key_values

    try:
        return parse_key_values(pairs)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


@app.command()
def demo(
    prompt: Annotated[str, typer.Option(help="what to draw: '<colour> <shape> moving <direction>'")] = "red circle moving left",
    policy: Annotated[Optional[str], typer.Option(help="caching policy (default: mixcache)")] = None,
    engine: Annotated[str, typer.Option(help="eager (starts at once) or inductor (~1 min compile)")] = "eager",
    steps: int = 30,
    guidance: float = 5.0,
    seed: int = 0,
    repeats: Annotated[int, typer.Option(help="timed repetitions (median)")] = 3,
    out: Path = Path("out/demo"),
    option: Annotated[Optional[list[str]], typer.Option("--option", "-o", help="policy option KEY=VALUE (JSON value)")] = None,
    model: Annotated[str, typer.Option(help="shipped model: tiny (4 blocks, 64 tokens) or deep (8 blocks, 128 tokens)")] = "tiny",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Generate one video with a shipped model, uncached and cached; write GIFs, a timeline and
    print the comparison and the cached session's summary."""
    from .eval.demo import run_demo, summary
    from .progress import set_quiet
    from .zoo import weights_dir_for

    set_quiet(quiet)

    try:
        weights_dir_for(model)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--model") from None
    result = run_demo(prompt, policy, engine, steps, guidance, seed, repeats, out, _parse_options(option or []), model)
    typer.echo(summary(result))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Side-by-side benchmark of this project's policies and the peers (see docs/bench.md)."""
    from .eval.bench import main

    raise typer.Exit(main(list(ctx.args)))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def frontier(ctx: typer.Context) -> None:
    """Every method of ours and the peers' swept over its main knob: PSNR / SSIM vs computed fraction (docs/bench.md)."""
    from .eval.frontier import main

    raise typer.Exit(main(list(ctx.args)))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def calibrate(ctx: typer.Context) -> None:
    """Measure MixCache's sensitivities I(g) for a model and store them as JSON (see docs/policies.md)."""
    from .eval.calibrate import main

    raise typer.Exit(main(list(ctx.args)))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def export(ctx: typer.Context) -> None:
    """Write every stage as ONNX (or TensorRT plans / inductor artifacts) plus a manifest (see docs/export.md)."""
    from .export.cli import main

    raise typer.Exit(main(list(ctx.args)))


if __name__ == "__main__":
    app()
