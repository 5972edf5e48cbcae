"""Public fused ops (each module registers its torch.library ops on import)."""
from .rtd_loss import rtd_loss

__all__ = ["rtd_loss"]
