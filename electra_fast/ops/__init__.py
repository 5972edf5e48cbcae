"""Public fused ops (each module registers its torch.library ops on import)."""
from .disentangled_attention import disentangled_attention
from .dropout import dropout
from .dropout_add_layer_norm import dropout_add_layer_norm
from .linear import gelu_mlp, linear
from .masking import MaskedTokens, mask_tokens
from .rtd_loss import rtd_loss
from .sampling import gumbel_sample, mlm_loss_and_sample

__all__ = ["MaskedTokens", "disentangled_attention", "dropout", "dropout_add_layer_norm", "gelu_mlp", "linear",
           "mask_tokens", "gumbel_sample", "mlm_loss_and_sample",
           "rtd_loss"]
