"""Drop-in nn.Modules built on the fused ops (same constructor args and parameter names as the modules
they replace)."""
from .disentangled_attention import DisentangledSelfAttention, patch_deberta_v2, unpatch_deberta_v2
from .dropout import Dropout
from .embeddings import DebertaV2Embeddings, ElectraEmbeddings, GDESEmbedding
from .encoder import DisentangledEncoder, Encoder, EncoderLayer, StandardSelfAttention
from .heads import DiscriminatorHead, GeneratorHead
from .masking import TokenMasker

__all__ = ["DebertaV2Embeddings", "DisentangledEncoder", "DisentangledSelfAttention", "DiscriminatorHead",
           "Dropout", "ElectraEmbeddings", "Encoder", "EncoderLayer", "GDESEmbedding", "GeneratorHead",
           "StandardSelfAttention", "TokenMasker", "patch_deberta_v2", "unpatch_deberta_v2"]
