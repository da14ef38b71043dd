"""``PolicyConfig``: the typed, frozen options of one policy, and their JSON form.

Every policy module defines ``<Name>Config(PolicyConfig)`` next to its policy class: a frozen
dataclass whose fields are the policy's options (defaults documented on the fields) and whose
``__post_init__`` is the one place the options are validated and normalised. The policy class
is constructed from its config (``FBCachePolicy(FbCacheConfig(threshold=0.1))``); the keyword
form (``make_policy("fbcache", threshold=0.1)``) only builds the config, so both forms raise
the same errors.

Note [config normal form]: ``__post_init__`` stores every value in one canonical form (ints
checked, numbers as float, sequences as tuples, explicit step sets as frozensets, actions as
``Action``), so two configs built from equal options compare equal, and a config survives
``from_json(json.loads(json.dumps(cfg.to_json())))`` unchanged. The JSON form is
``{"name": ..., "fields": {field: value}}`` with every field spelled out; values JSON has no
word for are tagged (``{"__tuple__": [...]}``, ``{"__set__": [...]}``, ``{"__pairs__": [[k, v],
...]}`` for mappings with non-string keys, ``{"__action__": "block:1-3"}``). A value that
cannot be written (a callable) makes ``to_json`` raise, naming the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from .protocol import Action, ActionKind

C = TypeVar("C", bound="PolicyConfig")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """Base of every policy config. ``name`` is the registry name of the policy it configures."""

    name: ClassVar[str] = ""

    def _set(self, field_name: str, value: Any) -> None:
        """Store a normalised value from ``__post_init__`` (the dataclass is frozen)."""
        object.__setattr__(self, field_name, value)

    def options(self) -> dict[str, Any]:
        """The fields as keyword arguments (shallow: values stay as stored)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> dict[str, Any]:
        """``{"name": ..., "fields": {...}}``, JSON-ready (see Note [config normal form])."""
        fields = {}
        for key, value in self.options().items():
            try:
                fields[key] = encode_json(value)
            except TypeError as err:
                raise TypeError(f"{type(self).__name__}.{key} cannot be written as JSON: {err}") from None
        return {"name": self.name, "fields": fields}

    @classmethod
    def from_json(cls: type[C], data: Mapping[str, Any]) -> C:
        """The config ``to_json`` wrote. On ``PolicyConfig`` itself the class is chosen by
        ``data["name"]`` from the registry; on a subclass the name must match it."""
        if not isinstance(data, Mapping) or not isinstance(data.get("name"), str) or not isinstance(data.get("fields"), Mapping):
            raise ValueError(f"a policy config in JSON is {{'name': str, 'fields': {{...}}}}, got {data!r}")
        from . import config_class  # the registry lives in the package (it imports this module)

        target = config_class(data["name"]) if cls is PolicyConfig else cls
        if target.name != data["name"]:
            raise ValueError(f"{cls.__name__}.from_json got a config of policy {data['name']!r}, not {cls.name!r}")
        valid = [f.name for f in dataclasses.fields(target)]
        unknown = sorted(set(data["fields"]) - set(valid))
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} for policy {target.name!r}; valid fields: {valid}")
        return target(**{k: decode_json(v) for k, v in data["fields"].items()})  # type: ignore[return-value]


def expect_config(config: Any, cls: type[C]) -> C:
    """``config`` if it is a ``cls``, ``cls()`` (the defaults) for None; else a TypeError
    naming what the policy takes."""
    if config is None:
        return cls()
    if not isinstance(config, cls):
        raise TypeError(f"{cls.name} policy takes a {cls.__name__}, got {config!r} (for keyword options use make_policy({cls.name!r}, ...))")
    return config


# ---- JSON values JSON cannot spell -------------------------------------------------------------
def encode_json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Action):
        return {"__action__": action_text(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_json(v) for v in value]}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [encode_json(v) for v in sorted(value)]}
    if isinstance(value, list):
        return [encode_json(v) for v in value]
    if isinstance(value, Mapping):
        if all(isinstance(k, str) for k in value):
            return {k: encode_json(v) for k, v in value.items()}
        return {"__pairs__": [[encode_json(k), encode_json(v)] for k, v in value.items()]}
    raise TypeError(f"a {type(value).__name__} ({value!r}) has no JSON form; use numbers, strings, tuples, sets or mappings")


def decode_json(value: Any) -> Any:
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__action__":
            return Action.parse(inner)
        if tag == "__tuple__":
            return tuple(decode_json(v) for v in inner)
        if tag == "__set__":
            return frozenset(decode_json(v) for v in inner)
        if tag == "__pairs__":
            return {_hashable(decode_json(k)): decode_json(v) for k, v in inner}
        if tag == "__dict__":  # export manifests written before configs wrapped string-keyed mappings
            return {k: decode_json(v) for k, v in inner.items()}
    return {k: decode_json(v) for k, v in value.items()}


def _hashable(value: Any) -> Any:
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def action_text(action: Action) -> str:
    """The ``Action.parse`` spelling of an action (``block:1-3``, ``attn:0,2``, ``step``)."""
    if action.kind is ActionKind.BLOCK and action.block_range:
        return f"block:{action.block_range[0]}-{action.block_range[1]}"
    if action.kind is ActionKind.ATTN:
        return "attn:" + ",".join(map(str, action.attn_blocks))
    return action.kind.value.lower()
