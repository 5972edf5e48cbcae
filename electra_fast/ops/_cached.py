"""Small constant tensors an op builds once per key (relative-position slot tables, masking's count tables and
special-id lists) and reuses: nobody writes to them."""
from __future__ import annotations

import functools

import torch


def constant_tensors(build):
    """``functools.lru_cache(maxsize=64)`` around ``build(*hashable_args) -> tensor(s)``, run outside inference mode:
    a first call under ``torch.inference_mode()`` (an evaluation) would otherwise cache an inference tensor, and every
    later training call in the process would fail to save it for backward."""
    @functools.lru_cache(maxsize=64)
    @functools.wraps(build)
    def cached(*args):
        with torch.inference_mode(False), torch.no_grad():
            return build(*args)
    return cached
