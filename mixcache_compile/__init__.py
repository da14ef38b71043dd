"""mixcache-compile: caching of diffusion-transformer inference as a torch.compile backend.

``enable(pipe, policy=...)`` for diffusers pipelines; ``torch.compile(model,
backend="mixcache", options={"session": CacheSession(...)})`` for everything else.
"""

from typing import Any

from .api import enable
from .policies import PolicyConfig, make_config
from .policies.none import NoneConfig
from .policies.protocol import Action, ActionKind
from .policies.static import StaticConfig
from .runtime.session import CacheSession

# Config classes of the lazily imported policies (``policies.POLICIES``), resolved on first use.
_LAZY_CONFIGS = {"FasterCacheConfig": "fastercache", "MixCacheConfig": "mixcache", "FbCacheConfig": "fbcache",
                 "DbCacheConfig": "dbcache", "TeaCacheConfig": "teacache", "PabConfig": "pab"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_CONFIGS:
        from .policies import config_class

        return config_class(_LAZY_CONFIGS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["enable", "CacheSession", "Action", "ActionKind", "PolicyConfig", "make_config", "NoneConfig", "StaticConfig",
           *_LAZY_CONFIGS]
__version__ = "0.1.0"
