"""The pretraining job: tokenizer, data (text -> packed sequences), trainer, checkpoints, export."""
from .errors import PretrainError
from .export import export
from .._seed import derive_seed
from .trainer import pretrain

__all__ = ["PretrainError", "derive_seed", "export", "pretrain"]
