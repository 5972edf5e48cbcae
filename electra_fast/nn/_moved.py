"""Names that moved out of ``electra_fast.nn`` into the transformers adapter
(``electra_fast.integrations.transformers.deberta_v2``). They keep working, with a DeprecationWarning naming the
new place. This is the one place in nn/ that reaches into integrations/, and only when a moved name is used:
``import electra_fast.nn`` never imports the adapter (tests/test_integrations_deberta_v2.py checks it)."""
from __future__ import annotations

import functools
import warnings

NEW_HOME = "electra_fast.integrations.transformers.deberta_v2"


def moved(old: str, new: str):
    """Warn that ``electra_fast.nn.<old>`` is now ``<NEW_HOME>.<new>`` (a dotted name) and return the new object."""
    warnings.warn(f"electra_fast.nn.{old} is deprecated: use {NEW_HOME}.{new}", DeprecationWarning, stacklevel=3)
    from ..integrations.transformers import deberta_v2  # deferred: only a moved name needs the adapter

    return functools.reduce(getattr, new.split("."), deberta_v2)
