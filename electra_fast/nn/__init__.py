"""The project's own nn.Modules, built on the fused ops, with explicit constructor arguments (and the parameter
names of the torch / transformers modules they correspond to, so checkpoints map one to one).

Nothing here imports transformers: patching transformers models is ``electra_fast.integrations``."""
from .disentangled_attention import DisentangledSelfAttention
from .dropout import Dropout
from .embeddings import DebertaV2Embeddings, ElectraEmbeddings, GDESEmbedding
from .encoder import DisentangledEncoder, Encoder, EncoderLayer, StandardSelfAttention
from .heads import DiscriminatorHead, GeneratorHead
from .linear import Linear
from .masking import TokenMasker

__all__ = ["DebertaV2Embeddings", "DisentangledEncoder", "DisentangledSelfAttention", "DiscriminatorHead",
           "Dropout", "ElectraEmbeddings", "Encoder", "EncoderLayer", "GDESEmbedding", "GeneratorHead",
           "Linear", "StandardSelfAttention", "TokenMasker"]


def __getattr__(name):
    if name in ("patch_deberta_v2", "unpatch_deberta_v2"):  # moved to integrations/ (deprecated here)
        from ._moved import moved

        return moved(name, name)
    raise AttributeError(f"module 'electra_fast.nn' has no attribute {name!r}")
