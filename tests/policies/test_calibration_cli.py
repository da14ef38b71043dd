"""``mixcache calibrate`` defaults to the perturbation the shipped sensitivities were made with."""

from __future__ import annotations

from pathlib import Path

from mixcache_compile.eval import calibrate as calibration


def test_cli_defaults_to_reuse_mode_like_the_shipped_sensitivities():
    args = calibration.parser().parse_args([])
    assert args.mode == "reuse"
    assert calibration.parser().parse_args(["--mode", "gaussian"]).mode == "gaussian"
