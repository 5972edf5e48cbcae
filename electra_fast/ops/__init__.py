"""Public fused ops (each module registers its torch.library ops on import)."""
from .rtd_loss import rtd_loss
from .sampling import gumbel_sample, mlm_loss_and_sample

__all__ = ["gumbel_sample", "mlm_loss_and_sample", "rtd_loss"]
