"""The export manifest: a versioned JSON file naming every stage file and how to drive it.

One directory holds one export: ``manifest.json``, the stage files it names, and the weights.
The manifest carries everything the runtime state machine needs that the torch backend reads
from the FX graph: the stage order and slot wiring of the plan (prologue, glue, blocks,
epilogue), each block's variants (stream map for block-range reuse, attention outputs and the
attention-reused variant, probe variants), the FLOPs of every stage at every exported input
signature, which call inputs are user tensors / the timestep / batch inputs, how the
transformer's keyword arguments map to graph inputs, and the policy and session configuration.

``plan_from_manifest`` rebuilds a ``StagePlan`` whose ``StageGraph``s have no GraphModule
(``gm=None``): the runtime only needs names, slots and keys; engines resolve files by stage
name and input signature.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..passes.plan import BlockStage, StagePlan
from ..passes.stage_graph import StageGraph
from ..policies import PolicyConfig, make_config
from ..policies.config import decode_json
from ..runtime.inputs import InputInfo
from .integrity import ALGORITHM, IntegrityError, check_relative, manifest_digest

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "mixcache-export"
# Version 2: the manifest records the SHA-256 and size of every file it names and its own digest.
VERSION = 2
FORMATS = ("onnx", "inductor")


class ManifestError(ValueError):
    """The manifest is missing, of another version, or inconsistent; the message says which."""


def policy_to_json(config: PolicyConfig) -> dict:
    """The manifest's ``policy`` entry: the config by name and fields (``PolicyConfig.to_json``)."""
    try:
        return config.to_json()
    except TypeError as err:
        raise ManifestError(f"cannot record the policy in the manifest: {err}") from None


def policy_from_json(entry: Mapping[str, Any]) -> PolicyConfig:
    """The config a manifest's ``policy`` entry records. Entries written before configs
    existed (``{"name", "options"}``) are read through the keyword form; their options are in
    the JSON form of ``policies/config.py`` (one codec for policy values; these old entries
    also wrap string-keyed mappings as ``{"__dict__": {...}}``, which it reads)."""
    try:
        if "fields" not in entry and "options" in entry:
            return make_config(entry["name"], **decode_json(entry["options"]))
        return PolicyConfig.from_json(entry)
    except (TypeError, ValueError) as err:
        raise ManifestError(f"the manifest's policy {dict(entry)!r} cannot be rebuilt: {err}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ManifestError(f"unknown dtype {name!r} in manifest")
    return value


def tensor_meta(t: torch.Tensor) -> list:
    return [list(t.shape), dtype_name(t.dtype)]


# ---- the manifest ---------------------------------------------------------------------------
@dataclass
class StageFile:
    """One exported file: a stage (or variant) at one input signature."""

    file: str
    kinds: list[str]  # per stage input: "data" | "param" | "const"
    consts: dict[int, Any]
    data_meta: list[list]  # [shape, dtype] of each "data" input, in order
    out_tensor: list[bool]
    out_consts: dict[int, Any]
    out_meta: list[list]
    flops: int
    graph: str = ""  # files with equal ``graph`` are one exported graph with different weights

    def to_json(self) -> dict:
        return {
            "file": self.file, "graph": self.graph, "kinds": self.kinds, "consts": {str(k): v for k, v in self.consts.items()},
            "data_meta": self.data_meta, "out_tensor": self.out_tensor,
            "out_consts": {str(k): v for k, v in self.out_consts.items()}, "out_meta": self.out_meta, "flops": self.flops,
        }

    @staticmethod
    def from_json(d: dict) -> StageFile:
        return StageFile(d["file"], list(d["kinds"]), {int(k): v for k, v in d["consts"].items()}, d["data_meta"],
                         list(d["out_tensor"]), {int(k): v for k, v in d["out_consts"].items()}, d["out_meta"], int(d["flops"]),
                         d.get("graph", ""))


@dataclass
class StageEntry:
    """A stage or variant of the plan: its slot wiring and its files, one per signature id."""

    name: str
    role: str  # prologue | glue | block | attn_reused | epilogue | probe
    key: str
    inputs: list[int]
    outputs: list[int]
    extra_inputs: list[str] = field(default_factory=list)  # after the slot inputs (cached attention, probe values)
    extra_outputs: list[str] = field(default_factory=list)
    probe: dict | None = None  # {"kind": "blocks"|"prologue", "blocks": n}
    files: dict[str, StageFile] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"name": self.name, "role": self.role, "key": self.key, "inputs": self.inputs, "outputs": self.outputs,
             "extra_inputs": self.extra_inputs, "extra_outputs": self.extra_outputs,
             "files": {k: f.to_json() for k, f in self.files.items()}}
        if self.probe is not None:
            d["probe"] = self.probe
        return d

    @staticmethod
    def from_json(d: dict) -> StageEntry:
        return StageEntry(d["name"], d["role"], d["key"], list(d["inputs"]), list(d["outputs"]), list(d["extra_inputs"]),
                          list(d["extra_outputs"]), d.get("probe"), {k: StageFile.from_json(f) for k, f in d["files"].items()})

    def graph(self) -> StageGraph:
        return StageGraph(self.name, None, list(self.inputs), list(self.outputs), key=self.key)  # type: ignore[arg-type]


@dataclass
class Manifest:
    format: str  # "onnx" | "inductor"
    model: dict  # {"class", "config", "dtype", "forward_params", "weights_fingerprint" (absent before 12-01)}
    call: dict  # {"placeholders": [...], "fixed": {...}, "num_outputs": n}
    inputs: dict  # InputInfo fields
    plan: dict  # StagePlan wiring (stage names instead of graphs)
    stages: dict[str, StageEntry]
    signatures: dict[str, dict]  # id -> {"user": [[shape, dtype], ...], "full_flops": n, "half_of": id|None}
    policy: dict  # PolicyConfig.to_json(): {"name", "fields"}
    session: dict  # {"cfg", "branch_order", "batch_order", "batched_context"}
    weights: dict = field(default_factory=dict)
    created_with: dict = field(default_factory=dict)
    files: dict[str, dict] = field(default_factory=dict)  # rel path -> {"sha256": hex, "bytes": n}, every file named
    version: int = VERSION

    def to_json(self) -> dict:
        return {
            "format_name": FORMAT_NAME, "version": self.version, "format": self.format, "created_with": self.created_with,
            "model": self.model, "call": self.call, "inputs": self.inputs, "plan": self.plan,
            "stages": {k: s.to_json() for k, s in self.stages.items()}, "signatures": self.signatures,
            "policy": self.policy, "session": self.session, "weights": self.weights, "files": self.files,
        }

    def named_files(self) -> set[str]:
        """Every file the runtime reads: stage files and the weights."""
        names = {f.file for e in self.stages.values() for f in e.files.values()}
        if self.weights.get("file"):
            names.add(self.weights["file"])
        return names

    def save(self, directory: str | Path) -> Path:
        """Write ``manifest.json`` with its own digest. Note [every named file is recorded]:
        ``files`` must hold a record of every file ``named_files`` lists (export fills it from
        the finished files), so that loading can check everything it will read."""
        unrecorded = sorted(self.named_files() - set(self.files))
        if unrecorded:
            raise ManifestError(f"no SHA-256 recorded for {unrecorded}: record every file before saving the manifest")
        body = self.to_json()
        body["integrity"] = {"algorithm": ALGORITHM, "manifest": manifest_digest(body)}
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(body, indent=1, sort_keys=False))
        return path

    @staticmethod
    def load(directory: str | Path, verify: bool = True) -> Manifest:
        """Read and check ``manifest.json``: format, version, and (unless ``verify=False``) its
        own digest and that it records every file it names. The files themselves are checked
        by ``integrity.verify_files`` (``ExportedTransformer`` does it at construction)."""
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST_NAME} in {directory}: not an export directory (write one with mixcache_compile.export.export)")
        try:
            d = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise IntegrityError(f"{path} is not valid JSON ({err}): the manifest is corrupted; copy or export again") from None
        if not isinstance(d, dict) or d.get("format_name") != FORMAT_NAME:
            raise ManifestError(f"{path} is not a mixcache export manifest")
        recorded = d.get("integrity") if isinstance(d.get("integrity"), dict) else None
        if verify and recorded is not None and recorded.get("manifest") != manifest_digest(d):
            raise IntegrityError(f"{path} does not match its own recorded SHA-256: the manifest is corrupted or was edited "
                                 "after export; copy or export again (or load with verify=False to skip every check)")
        if d.get("version") != VERSION:
            raise ManifestError(f"{path} has manifest version {d.get('version')}; this mixcache_compile reads version {VERSION}: export again")
        if verify and recorded is None:
            raise IntegrityError(f"{path} records no digest of itself; it cannot be checked (export again, or load with verify=False)")
        if d.get("format") not in FORMATS:
            raise ManifestError(f"{path} has format {d.get('format')!r}; known formats: {', '.join(FORMATS)}")
        manifest = Manifest(
            format=d["format"], model=d["model"], call=d["call"], inputs=d["inputs"], plan=d["plan"],
            stages={k: StageEntry.from_json(s) for k, s in d["stages"].items()}, signatures=d["signatures"],
            policy=d["policy"], session=d["session"], weights=d.get("weights", {}), created_with=d.get("created_with", {}),
            files=d.get("files", {}), version=d["version"],
        )
        for rel in manifest.named_files() | set(manifest.files):
            check_relative(rel)
        if verify:
            unrecorded = sorted(manifest.named_files() - set(manifest.files))
            if unrecorded:
                raise IntegrityError(f"{path} names {unrecorded} without a SHA-256 record; export again")
        return manifest

    # ---- rebuilding runtime objects ------------------------------------------------------
    def input_info(self) -> InputInfo:
        i = self.inputs
        return InputInfo(
            user_tensors=list(i["user_tensors"]), timestep=i["timestep"], batch_inputs=list(i["batch_inputs"]),
            symint_sources={int(k): (v[0], v[1]) for k, v in i["symint_sources"].items()},
            batch_symbolic=bool(i["batch_symbolic"]),
        )

    def stage_plan(self) -> StagePlan:
        p, g = self.plan, lambda name: self.stages[name].graph()
        chains = []
        for chain in p["chains"]:
            blocks = []
            for b in chain:
                blocks.append(BlockStage(
                    chain=b["chain"], index=b["index"], label=b["label"], stage=g(b["stage"]),
                    stream_in=list(b["stream_in"]), stream_map=[tuple(x) for x in b["stream_map"]],
                    stream_shapes_in=list(b["stream_shapes_in"]), stream_shapes_out={int(k): v for k, v in b["stream_shapes_out"].items()},
                    attn_out=list(b["attn_out"]), attn_reused=g(b["attn_reused"]) if b["attn_reused"] in self.stages else None,
                    outputs_only_to_next=b["outputs_only_to_next"],
                ))
            chains.append(blocks)
        return StagePlan(
            num_slots=p["num_slots"], placeholders=[], output_spec=list(p["output_spec"]), output_is_slot=list(p["output_is_slot"]),
            prologue=g(p["prologue"]), chains=chains, glue={int(c): g(name) for c, name in p["glue"].items()},
            epilogue=g(p["epilogue"]), chain_names=list(p["chain_names"]), range_reusable=list(p["range_reusable"]),
            modulation_slot=p["modulation_slot"],
        )


def plan_to_json(plan: StagePlan) -> dict:
    """The wiring of ``plan`` with stage names in place of graphs (outputs that are constants
    must be JSON values: a plan whose output is anything else cannot be exported)."""
    for value, is_slot in zip(plan.output_spec, plan.output_is_slot):
        if not is_slot and not (value is None or isinstance(value, (bool, int, float, str))):
            raise ManifestError(f"the graph returns a constant {value!r} the manifest cannot record")
    return {
        "num_slots": plan.num_slots, "output_spec": plan.output_spec, "output_is_slot": plan.output_is_slot,
        "prologue": plan.prologue.name, "epilogue": plan.epilogue.name,
        "glue": {str(c): s.name for c, s in plan.glue.items()},
        "chains": [[{
            "chain": b.chain, "index": b.index, "label": b.label, "stage": b.stage.name, "stream_in": b.stream_in,
            "stream_map": [list(x) for x in b.stream_map], "stream_shapes_in": b.stream_shapes_in,
            "stream_shapes_out": {str(k): v for k, v in b.stream_shapes_out.items()}, "attn_out": b.attn_out,
            "attn_reused": b.attn_reused.name if b.attn_reused is not None else None,
            "outputs_only_to_next": b.outputs_only_to_next,
        } for b in chain] for chain in plan.chains],
        "chain_names": plan.chain_names, "range_reusable": plan.range_reusable, "modulation_slot": plan.modulation_slot,
    }
