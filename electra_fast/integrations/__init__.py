"""Adapters that put electra_fast's modules into other libraries' models, in place and reversibly.

``integrations/<library>/<model family>.py``: one file per model family (``transformers/deberta_v2.py``), each
built on ``electra_fast.nn`` / ``electra_fast.ops`` and on ``_swap`` (the reversible swaps every adapter
shares). Nothing in ``electra_fast.nn`` imports this package, and importing it imports no other library: a family
module imports its library on first use.
"""
