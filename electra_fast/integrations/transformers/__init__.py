"""electra_fast inside transformers models.

- ``patching.py``: ``electra_fast.patch(model)`` / ``unpatch`` / ``is_patched`` / ``from_pretrained`` /
  ``apply_to_transformers``: one mechanism for every family. Each family module lists ``patching.Rule`` s (which
  transformers classes, under which option, why an instance cannot be served, what to override or swap), and
  ``patch`` walks a model's modules and installs them in place, reversibly (``integrations._swap``).
- ``layers.py``: what the families share (the fused add-norm, the GELU feed-forward block, the loss-only MLM head,
  padding-mask reading), as methods bound to transformers' own module instances.
- ``bert.py``: BERT, RoBERTa, ELECTRA (one layer layout); ``deberta_v2.py``: DeBERTa-v2/v3, whose attention is
  swapped for ``FusedDisentangledSelfAttention`` (also patched alone by ``patch_deberta_v2``).

transformers itself is imported on first use, not by importing these modules.
"""
