"""electra_fast: fused kernels for ELECTRA / DeBERTa-v3 replaced-token-detection pretraining."""
from ._backend import available_backends, use_backend
from ._extension import extension_loaded
from .ops import gumbel_sample, mlm_loss_and_sample, rtd_loss

__version__ = "0.1.0"

__all__ = ["available_backends", "extension_loaded", "gumbel_sample", "mlm_loss_and_sample", "rtd_loss",
           "use_backend", "__version__"]
