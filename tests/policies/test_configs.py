"""Typed policy configs: validation (same errors for the keyword and the config form), JSON
round-trips for every registered policy, and building policies from configs."""

from __future__ import annotations

import dataclasses
import json

import pytest

import mixcache_compile
from mixcache_compile.policies import (
    DEFAULT_POLICY, POLICIES, PolicyConfig, config_class, make_config, make_policy, policy_class, register_policy,
)
from mixcache_compile.policies.protocol import Action, ActionKind

# Non-default values of every field kind each config normalises (tuples, sets, mappings with
# tuple keys, actions, None), so a round-trip that drops or changes any of them fails.
NON_DEFAULT: dict[str, dict] = {
    "none": {},
    "static": {"schedule": {1: "step", (2, "uncond"): "cfg", 3: "block:1-3", 4: "attn:0,2"}, "every": 3, "reuse": "cfg", "warmup": 2},
    "fastercache": {"attn_interval": 3, "attn_window": {2, 5, 7}, "attn_weight": 0.3, "cfg_window": None, "boost": "compound",
                    "alpha_low": 0.25, "low_boost_window": (0.1, 0.5), "lowpass_divisor": 4, "num_steps": 20},
    "mixcache": {"threshold": 0.07, "warmup": 0.1, "tau": 0.1, "Fn": 2, "Bn": 0, "extrapolate": False, "damping": 0.25,
                 "repeat_penalty": 2.0, "cfg_weights": [1.2, 0.8], "candidates": ["step", "block"], "num_steps": 12},
    "fbcache": {"threshold": 0.12, "Fn": 2, "Bn": 1, "warmup": 3, "update": "always", "max_cached": 2},
    "dbcache": {"threshold": 0.2, "Fn": 1, "Bn": 1, "warmup": 0},
    "teacache": {"threshold": 0.3, "coefficients": [1.0, -2.0, 0.5], "warmup": 2, "final_full": 0},
    "pab": {"interval": 3, "window": range(2, 6), "blocks": [2, 0, 2], "num_steps": 30},
}


def test_every_registered_policy_has_a_case():
    assert set(NON_DEFAULT) == set(POLICIES)


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
@pytest.mark.parametrize("which", ["defaults", "non_default"])
def test_config_round_trips_through_json(name, which):
    config = make_config(name, **(NON_DEFAULT[name] if which == "non_default" else {}))
    text = json.dumps(config.to_json())
    back = PolicyConfig.from_json(json.loads(text))
    assert type(back) is type(config) and back == config
    assert config_class(name).from_json(json.loads(text)) == config
    assert json.dumps(back.to_json()) == text  # a second trip writes the same text


def test_normal_form_makes_equal_options_equal_configs():
    pab = config_class("pab")
    assert pab(window=range(2, 6), blocks=[2, 0, 2]) == pab(window={2, 3, 4, 5}, blocks=(0, 2))
    assert pab(window=(0, 1)).window == (0.0, 1.0)
    static = make_config("static", schedule={3: "block:1-3"}, reuse="cfg")
    assert static.schedule == {3: Action(ActionKind.BLOCK, block_range=(1, 3))} and static.reuse.kind is ActionKind.CFG
    assert make_config("mixcache", candidates=["block", "step"]).candidates == ("block", "step")
    assert make_config("mixcache", cfg_weights=[1.0, 0.5]) == make_config("mixcache", cfg_weights=(1.0, 0.5))


def test_configs_are_frozen():
    config = make_config("fbcache")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold = 0.5  # type: ignore[misc]
    assert dataclasses.replace(config, threshold=0.5).threshold == 0.5


# (policy, bad options, expected exception, message fragment)
BAD = [
    ("fbcache", {"threshold": -1}, ValueError, "threshold must be >= 0.0"),
    ("fbcache", {"threshold": "low"}, TypeError, "threshold must be a number"),
    ("fbcache", {"Fn": 0}, ValueError, "Fn must be an int >= 1"),
    ("fbcache", {"update": "never"}, ValueError, "update must be one of"),
    ("dbcache", {"max_cached": 0}, ValueError, "max_cached must be an int >= 1"),
    ("pab", {"interval": 1}, ValueError, "interval must be an int >= 2"),
    ("pab", {"window": (0.5, 0.2)}, ValueError, "window as fractions"),
    ("pab", {"blocks": []}, ValueError, "blocks must name at least one block"),
    ("teacache", {"coefficients": "1,2"}, TypeError, "coefficients must be a non-empty sequence"),
    ("fastercache", {"boost": "double"}, ValueError, "boost must be one of"),
    ("fastercache", {"attn_weight": "cubic"}, ValueError, "attn_weight must be 'linear'"),
    ("fastercache", {"t0": 1.5}, ValueError, "t0 must be <= 1.0"),
    ("mixcache", {"threshold": -0.1}, ValueError, "threshold must be >= 0.0"),
    ("mixcache", {"candidates": ("step", "nonsense")}, ValueError, "candidates must be a non-empty subset"),
    ("mixcache", {"repeat_penalty": 0.5}, ValueError, "repeat_penalty must be >= 1.0"),
    ("static", {"every": 0}, ValueError, "every must be a positive int"),
    ("static", {"schedule": {(1, "both"): "step"}}, ValueError, "is not a step index or"),
    ("static", {"schedule": {1: "leap"}}, ValueError, "unknown action 'leap'"),
]


@pytest.mark.parametrize("name, bad, exc, fragment", BAD, ids=[f"{n}-{next(iter(b))}" for n, b, _, _ in BAD])
def test_keyword_and_config_forms_raise_the_same_error(name, bad, exc, fragment):
    messages = []
    for build in (lambda: config_class(name)(**bad), lambda: make_config(name, **bad), lambda: make_policy(name, **bad)):
        with pytest.raises(exc) as err:
            build()
        messages.append(str(err.value))
    assert fragment in messages[0]
    assert messages[0] == messages[1] == messages[2]


def test_unknown_names_and_options_name_the_valid_ones():
    with pytest.raises(ValueError, match="unknown policy 'nonesuch'; valid policies: dbcache, fastercache"):
        make_config("nonesuch")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['thresh'\] for policy 'fbcache'; valid options: \['threshold'"):
        make_policy("fbcache", thresh=0.1)
    with pytest.raises(TypeError, match="policy options go with a policy name, not with a FbCacheConfig"):
        make_policy(make_config("fbcache"), threshold=0.2)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['thresh'\] for policy 'fbcache'"):
        PolicyConfig.from_json({"name": "fbcache", "fields": {"thresh": 0.1}})
    with pytest.raises(ValueError, match="got a config of policy 'pab', not 'fbcache'"):
        config_class("fbcache").from_json(make_config("pab").to_json())
    with pytest.raises(ValueError, match="a policy config in JSON is"):
        PolicyConfig.from_json({"fields": {}})


def test_policies_are_built_from_their_config():
    for name in POLICIES:
        config = make_config(name, **NON_DEFAULT[name])
        policy = make_policy(config)
        assert type(policy) is policy_class(name) and policy.name == name and policy.config is config
        assert make_policy(name, **NON_DEFAULT[name]).config == config
    fb = make_policy(mixcache_compile.FbCacheConfig(threshold=0.12, Fn=2))
    assert (fb.threshold, fb.Fn, fb.Bn) == (0.12, 2, 0)
    with pytest.raises(TypeError, match="fbcache policy takes a FbCacheConfig"):
        policy_class("fbcache")(make_config("pab"))


def test_dbcache_config_keeps_its_own_defaults_and_policy():
    db = make_config("dbcache")
    assert (db.threshold, db.Fn, db.Bn, db.warmup) == (0.08, 8, 8, 8)
    assert type(make_policy(db)).__name__ == "DBCachePolicy"


def test_top_level_names_and_default_constant():
    assert mixcache_compile.MixCacheConfig is config_class("mixcache")
    assert mixcache_compile.PabConfig().window == (0.2, 0.9)
    assert make_policy().name == DEFAULT_POLICY
    assert mixcache_compile.CacheSession().policy.name == DEFAULT_POLICY


def test_a_callable_option_has_no_json_form():
    config = make_config("fastercache", attn_weight=lambda step, num_steps: 0.5)
    with pytest.raises(TypeError, match="FasterCacheConfig.attn_weight cannot be written as JSON"):
        config.to_json()


def test_register_policy_adds_a_name(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class EveryOtherConfig(PolicyConfig):
        name = "every_other_test"
        offset: int = 0

    class EveryOther:
        name = "every_other_test"

        def __init__(self, config: EveryOtherConfig) -> None:
            self.config = config

        def needs(self, model):  # pragma: no cover - not run here
            raise NotImplementedError

        def decide(self, obs):  # pragma: no cover
            raise NotImplementedError

        def reset(self) -> None:
            pass

    monkeypatch.setitem(POLICIES, "every_other_test", (EveryOtherConfig, EveryOther))
    register_policy(EveryOtherConfig, EveryOther)
    policy = make_policy("every_other_test", offset=1)
    assert isinstance(policy, EveryOther) and policy.config == EveryOtherConfig(offset=1)
    assert PolicyConfig.from_json(policy.config.to_json()) == EveryOtherConfig(offset=1)


def test_manifest_policy_entry_round_trips_and_reads_old_entries():
    from mixcache_compile.export.manifest import ManifestError, policy_from_json, policy_to_json

    for name in POLICIES:
        config = make_config(name, **NON_DEFAULT[name])
        entry = json.loads(json.dumps(policy_to_json(config)))
        assert entry["name"] == name and policy_from_json(entry) == config
    # Manifests written before configs: {"name", "options"} with manifest-encoded options.
    old = {"name": "static", "options": {"__dict__": {"every": 3, "reuse": "cfg"}}}
    assert policy_from_json(old) == make_config("static", every=3, reuse="cfg")
    with pytest.raises(ManifestError, match="cannot record the policy in the manifest: FasterCacheConfig.attn_weight"):
        policy_to_json(make_config("fastercache", attn_weight=lambda step, num_steps: 0.5))
    with pytest.raises(ManifestError, match=r"cannot be rebuilt: threshold must be >= 0.0"):
        policy_from_json({"name": "fbcache", "fields": {"threshold": -1}})
