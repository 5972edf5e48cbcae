"""Generator + discriminator pretraining models on the fused ops, with transformers checkpoint interop."""
from .config import PRESETS, ElectraConfig
from .modeling import (ElectraDiscriminator, ElectraGenerator, ElectraPretrainingModel,
                       ElectraPretrainingOutput)

__all__ = ["PRESETS", "ElectraConfig", "ElectraDiscriminator", "ElectraGenerator", "ElectraPretrainingModel",
           "ElectraPretrainingOutput"]
