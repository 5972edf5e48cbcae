"""electra_fast: fused kernels for ELECTRA / DeBERTa-v3 replaced-token-detection pretraining."""
from ._backend import available_backends, eager_twin_mode, use_backend
from ._extension import extension_loaded
from .nn.masking import TokenMasker
from .ops import (MaskedTokens, disentangled_attention, dropout, dropout_add_layer_norm, gelu_mlp, gumbel_sample,
                  linear, mask_tokens, mlm_loss_and_sample, rtd_loss)
from .models import ElectraConfig, ElectraPretrainingModel


_PATCHING = ("patch", "unpatch", "is_patched", "from_pretrained", "apply_to_transformers", "remove_from_transformers")


def __getattr__(name):
    # The training job (tokenizers, tqdm, data loading) loads on first use, not with every `import electra_fast`.
    if name == "pretrain":
        from .train import pretrain
        return pretrain
    # So does the transformers adapter (electra_fast.integrations), which nothing below the top level imports.
    if name in ("patch_deberta_v2", "unpatch_deberta_v2"):
        from .integrations.transformers import deberta_v2
        return getattr(deberta_v2, name)
    if name in _PATCHING:
        from .integrations.transformers import patching
        return getattr(patching, name)
    raise AttributeError(f"module 'electra_fast' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "ElectraConfig", "ElectraPretrainingModel", "MaskedTokens", "TokenMasker", "available_backends",
    "disentangled_attention", "dropout", "dropout_add_layer_norm", "extension_loaded", "gelu_mlp", "gumbel_sample",
    "linear", "mask_tokens", "mlm_loss_and_sample", *_PATCHING,
    "patch_deberta_v2", "pretrain", "rtd_loss", "unpatch_deberta_v2", "use_backend", "eager_twin_mode", "__version__",
]


def __dir__():
    # the names __getattr__ loads on first use, for tab completion and dir()
    return sorted(set(globals()) | set(__all__))
