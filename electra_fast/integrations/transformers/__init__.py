"""electra_fast inside transformers models. One file per model family (``deberta_v2.py``; BERT / RoBERTa /
ELECTRA to come), each offering:

- ``Fused<transformers class>``: the electra_fast module with the transformers module's constructor (its
  config), forward signature and parameter names, and ``from_transformers(module)`` sharing its Parameters;
- ``patch(model) -> int`` / ``unpatch(model) -> int``: swap every such module of a model in place and back,
  returning how many modules of that family were found (0: not that family), for a model-agnostic patch;
- ``patch_<family>(model)`` / ``unpatch_<family>(model)``: the public form (raises when the model is not of
  the family), re-exported at ``electra_fast``'s top level.

transformers itself is imported on first use, not by importing these modules.
"""
