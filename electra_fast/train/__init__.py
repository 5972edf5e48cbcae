"""The pretraining job: tokenizer, data (text -> packed sequences), trainer, checkpoints, export."""
from .errors import PretrainError
from .export import export
from .trainer import derive_seed, pretrain

__all__ = ["PretrainError", "derive_seed", "export", "pretrain"]
