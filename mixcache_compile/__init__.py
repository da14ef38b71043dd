"""mixcache-compile: caching of diffusion-transformer inference as a torch.compile backend.

``enable(pipe, policy=...)`` for diffusers pipelines; ``torch.compile(model,
backend="mixcache", options={"session": CacheSession(...)})`` for everything else.
"""

from .api import enable
from .policies.protocol import Action, ActionKind
from .runtime.session import CacheSession

__all__ = ["enable", "CacheSession", "Action", "ActionKind"]
__version__ = "0.1.0"
