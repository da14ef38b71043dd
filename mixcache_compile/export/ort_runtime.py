"""onnxruntime for exported stages: a ``Loader`` of ONNX stage files.

``runtime.make_loader`` builds it for the onnxruntime engine; ``ort_transformer.OrtTransformer``
is ``ExportedTransformer`` on it. This module imports nothing of the runtime, so the runtime
can import it without an import circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


class OrtLoader:
    """One ``InferenceSession`` per stage file. CPU tensors go in and come out without a copy
    (``numpy()`` / ``from_numpy`` share memory). ``threads``: intra-op threads of each session
    (default: torch's thread count, so the two runtimes compare like for like)."""

    name = "onnxruntime"
    formats = ("onnx",)
    takes_params = False
    device = "cpu"

    def __init__(self, providers: Sequence[str] | None = None, threads: int | None = None,
                 graph_optimization: str = "all") -> None:
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.threads = threads
        self.graph_optimization = graph_optimization

    def load(self, path: Path):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[self.graph_optimization]
        session = ort.InferenceSession(str(path), opts, providers=self.providers)
        wanted = [i.name for i in session.get_inputs()]  # the exporter drops inputs a stage never reads
        outputs = [o.name for o in session.get_outputs()]

        def run(data: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            feeds = {n: _as_numpy(data[n]) for n in wanted}
            return [torch.from_numpy(x) for x in session.run(outputs, feeds)]

        run.session = session  # type: ignore[attr-defined]
        return run


def _as_numpy(t: torch.Tensor):
    if t.device.type != "cpu":
        t = t.cpu()
    if t.requires_grad:
        t = t.detach()
    return t.contiguous().numpy()
