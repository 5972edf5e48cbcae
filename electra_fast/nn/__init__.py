"""Drop-in nn.Modules built on the fused ops (same constructor args and parameter names as the modules
they replace)."""
from .disentangled_attention import DisentangledSelfAttention, patch_deberta_v2, unpatch_deberta_v2
from .masking import TokenMasker

__all__ = ["DisentangledSelfAttention", "TokenMasker", "patch_deberta_v2", "unpatch_deberta_v2"]
