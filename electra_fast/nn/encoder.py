"""Post-LayerNorm transformer encoder (BERT / ELECTRA / DeBERTa-v2) with transformers' parameter names.

A layer is ``attention.self`` (standard: query / key / value with SDPA; disentangled:
``electra_fast.nn.DisentangledSelfAttention``, query_proj / key_proj / value_proj [+ pos_key_proj /
pos_query_proj]), ``attention.output`` (dense, LayerNorm), ``intermediate.dense``
and ``output`` (dense, LayerNorm) -- key for key what ``ElectraLayer`` and ``DebertaV2Layer`` hold, so
checkpoints map one to one. ``DisentangledEncoder`` adds ``rel_embeddings`` and its ``LayerNorm``
(``DebertaV2Encoder``).

Masks: ``key_mask`` is bool [B, T] (True = real token) or None; padded keys get no attention weight.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _seed, _validate
from ..ops.disentangled_attention import disentangled_attention
from ..ops.dropout_add_layer_norm import dropout_add_layer_norm
from ..reference.disentangled_attention import attention_span
from .disentangled_attention import DisentangledSelfAttention
from .dropout import Dropout, eager_twin
from ._plain import hooked, not_plain
from .linear import Linear, gelu_mlp, linear
from .packing import Documents, Packed, packing

_ACTS = {"gelu": F.gelu, "relu": F.relu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "swish": F.silu,
         "tanh": torch.tanh}
ACTIVATIONS = tuple(_ACTS)


def rel_embedding_norms(norm_rel_ebd: str, name: str = "norm_rel_ebd") -> set:
    """transformers' ``norm_rel_ebd`` ('|'-separated 'layer_norm' / 'none') as a set; a typo was a silent no-norm."""
    norms = {n.strip() for n in str(norm_rel_ebd).lower().split("|")}
    if not isinstance(norm_rel_ebd, str) or not norms <= {"layer_norm", "none"}:
        raise ValueError(f"{name}: expected 'layer_norm' or 'none' (transformers' '|'-separated list of them), got "
                         f"{norm_rel_ebd!r}")
    return norms


def activation(name: str):
    if name not in _ACTS:
        raise ValueError(f"hidden_act: expected one of {ACTIVATIONS}, got {name!r}")
    return _ACTS[name]


class StandardSelfAttention(nn.Module):
    """[B, T, H] -> [B, T, H] (transformers ElectraSelfAttention).

    ``scaled_dot_product_attention``, except for training with attention dropout on CPU: there the fused
    attention op without position terms, whose dropout regenerates a Philox mask per block - torch's CPU
    attention dropout is bernoulli_ over materialised [B, heads, T, T] probabilities, one of the most
    expensive ops of a CPU training step (on CUDA, SDPA's flash kernels already fuse dropout). Padded query
    rows then hold 0 instead of SDPA's mean of V: nothing downstream reads them. The eager twin (reference
    backend) keeps SDPA's own dropout.
    """

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            _validate.integer_arg(name, value, 1)
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size: {hidden_size} is not divisible by num_heads={num_heads}")
        _validate.probability("dropout", dropout, one=True)
        self.num_heads = num_heads
        self.query = Linear(hidden_size, hidden_size)
        self.key = Linear(hidden_size, hidden_size)
        self.value = Linear(hidden_size, hidden_size)
        # a module, as transformers' attention.self.dropout: code that finds dropout modules by type sets its p
        self.dropout = Dropout(dropout)

    def __setstate__(self, state):
        p = state.pop("dropout_p", None)  # pickled before the dropout was a module: its probability
        super().__setstate__(state)
        if p is not None:
            self.dropout = Dropout(p)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x [B, T, H] float; key_mask bool / integer [B, T] (nonzero = real token), None, or a ``Packed`` layout
        with x [N, H] (an unpadded batch's real tokens). Returns x's shape."""
        _validate.tensor("x", x)
        if x.dim() != (2 if isinstance(key_mask, Packed) else 3):
            raise ValueError(f"x: expected [B, T, hidden] (or [N, hidden] with a Packed layout as key_mask), got "
                             f"shape {tuple(x.shape)}")
        if isinstance(key_mask, torch.Tensor) and key_mask.dtype != torch.bool:  # SDPA takes bool masks only
            key_mask = _validate.mask_dtype("key_mask", key_mask, "[B, T], nonzero = real token") != 0
        p = self.dropout.p if self.training else 0.0
        return standard_attention(x, self.query, self.key, self.value, self.num_heads, key_mask, p)


def standard_attention(x: torch.Tensor, query: nn.Linear, key: nn.Linear, value: nn.Linear, num_heads: int,
                       key_mask: Optional[torch.Tensor], dropout_p: float, fused_dropout: bool = True) -> torch.Tensor:
    """x [B, T, H] -> [B, T, H]: :class:`StandardSelfAttention`'s computation on any three projections (also
    those of a transformers model, ``electra_fast.integrations``); ``dropout_p`` already 0 outside training.
    ``fused_dropout=False`` keeps SDPA (and its padded query rows) with dropout too. With a ``Packed`` key_mask
    (electra_fast.nn.packing), x [N, H] holds an unpadded batch's real tokens and the result is [N, H]."""
    # one [H, 3H] projection instead of three: a single larger GEMM is faster on CPU. q / k / v stay views
    # of it (unbind, then transpose): the fused op returns token-major outputs and gradients for such views,
    # so the output's transpose back is free and the gradients stack into the projection's layout in one copy.
    if not_plain(query=query, key=key, value=value) is None:
        qkv = linear(x, torch.cat([query.weight, key.weight, value.weight]),
                     torch.cat([query.bias, key.bias, value.bias]))
    else:  # a wrapped (LoRA), pruned or hooked projection: called, so its own computation counts
        qkv = torch.cat([query(x), key(x), value(x)], -1)
    if isinstance(key_mask, Packed):  # x [N, H]: the real tokens of an unpadded batch (electra_fast.nn.packing)
        N, H = x.shape
        q, k, v = qkv.view(N, 3, num_heads, H // num_heads).unbind(1)
        out = disentangled_attention(q, k, v, cu_seqlens=key_mask.cu_seqlens, max_seqlen=key_mask.max_seqlen,
                                     dropout_p=dropout_p, seed=_seed.draw() if dropout_p > 0 else None,
                                     scale=int(q.shape[-1]) ** -0.5)
        return out.reshape(N, H)
    B, T, H = x.shape
    qkv = qkv.view(B, T, 3, num_heads, H // num_heads)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    if fused_dropout and dropout_p > 0 and x.device.type == "cpu" and _seed.drawable() and not eager_twin():
        out = disentangled_attention(q, k, v, attention_mask=key_mask, dropout_p=dropout_p, seed=_seed.draw(),
                                     scale=int(q.shape[-1]) ** -0.5)
    else:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(B, T, H)


class _AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual) (transformers *SelfOutput / *Output).

    The dropout, the add and the norm run as one fused op (``electra_fast.dropout_add_layer_norm``: the same
    mask as the Dropout module's, one pass each way) when the dense output and the residual share a dtype; the
    eager twin keeps torch's three ops."""

    def __init__(self, d_in: int, d_out: int, eps: float, dropout: float):
        super().__init__()
        self.dense = Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dense(x), residual)

    def norm(self, y: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """LayerNorm(dropout(y) + residual): the sublayer after its dense layer."""
        return add_norm(y, residual, self.LayerNorm, self.dropout, self.training)


def add_norm(y: torch.Tensor, residual: torch.Tensor, ln: nn.LayerNorm, dropout: nn.Module,
             training: bool) -> torch.Tensor:
    """LayerNorm(dropout(y) + residual): one fused op (``dropout.p``, Philox) when y and the residual share a dtype
    and shape, else torch's three ops with the ``dropout`` module (also when the LayerNorm or the dropout is wrapped
    or hooked: the fused op would skip them); used by :class:`_AddNorm` and the transformers adapters
    (``electra_fast.integrations``)."""
    if (y.dtype == residual.dtype and y.shape == residual.shape and ln.weight is not None
            and not_plain(LayerNorm=ln) is None and type(dropout) in (Dropout, nn.Dropout) and not hooked(dropout)
            and ln.weight.dtype in (torch.float32, y.dtype)
            and (torch.compiler.is_compiling() or not eager_twin())  # dynamo cannot read the ContextVar
            and (not training or _seed.drawable())):  # a trace or an export has no seed per call: torch's dropout
        p = dropout.p if training else 0.0
        return dropout_add_layer_norm(y, residual, ln.weight, ln.bias, p=p, seed=_seed.draw() if p > 0 else None,
                                      eps=ln.eps)
    return ln(dropout(y) + residual)


class _Attention(nn.Module):
    def __init__(self, self_attention: nn.Module, hidden_size: int, eps: float, dropout: float):
        super().__init__()
        self.self = self_attention
        self.output = _AddNorm(hidden_size, hidden_size, eps, dropout)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], rel_embeddings: Optional[torch.Tensor] = None,
                query_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, H] -> attention output after its add-norm [B, T, H] (``query_states``: see EncoderLayer)."""
        if query_states is not None:
            a = self.self(x, key_mask, rel_embeddings=rel_embeddings, query_states=query_states)
        elif rel_embeddings is None:
            a = self.self(x, key_mask)
        else:
            a = self.self(x, key_mask, rel_embeddings=rel_embeddings)
        return self.output(a, x if query_states is None else query_states)


class _Intermediate(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.dense = Linear(hidden_size, intermediate_size)
        self.act = activation(act)
        self.act_name = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class EncoderLayer(nn.Module):
    """One post-LN transformer layer; ``attention.self`` is standard or disentangled.

    Args: ``self_attention`` the attention module (:class:`StandardSelfAttention` or
    ``DisentangledSelfAttention``); ``hidden_size`` H; ``intermediate_size`` the FFN width; ``act`` one of
    ``ACTIVATIONS``; ``eps`` the LayerNorms' epsilon; ``dropout`` the hidden-state dropout in [0, 1]."""

    def __init__(self, self_attention: nn.Module, hidden_size: int, intermediate_size: int, act: str,
                 eps: float, dropout: float):
        super().__init__()
        _validate.integer_arg("intermediate_size", intermediate_size, 1)
        _validate.layer_norm_eps("layer_norm_eps", eps)
        self.attention = _Attention(self_attention, hidden_size, eps, dropout)
        self.intermediate = _Intermediate(hidden_size, intermediate_size, act)
        self.output = _AddNorm(intermediate_size, hidden_size, eps, dropout)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor],
                rel_embeddings: Optional[torch.Tensor] = None,
                query_states: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, T, H] (keys and values; also the queries unless ``query_states`` [B, T, H] is given, which is then
        the attention's residual too, as in DeBERTa's layer) -> [B, T, H]."""
        a = self.attention(x, key_mask, rel_embeddings, query_states)
        if self._fused_mlp():  # the GELU's backward fused into the second product's
            d1, d2 = self.intermediate.dense, self.output.dense
            return self.output.norm(gelu_mlp(a, d1.weight, d1.bias, d2.weight, d2.bias), a)
        return self.output(self.intermediate(a), a)

    def _fused_mlp(self) -> bool:
        """Whether the fused GELU MLP computes what calling ``intermediate`` and ``output`` would: erf GELU, the
        layer's own containers unhooked, their dense layers plain (not wrapped, pruned or hooked)."""
        inter, out = self.intermediate, self.output
        return (type(inter) is _Intermediate and inter.act_name == "gelu" and type(out) is _AddNorm
                and not hooked(inter) and not hooked(out)
                and not_plain(**{"intermediate.dense": inter.dense, "output.dense": out.dense}) is None)


def encoder_inputs(x: torch.Tensor, key_mask: Optional[torch.Tensor], document_ids) -> Optional[torch.Tensor]:
    """The encoders' inputs checked (one behaviour on the unpadded and the padded path: a float 0/1 mask was an
    additive bias on SDPA's path, ``document_ids`` of another shape merged rows); ``key_mask`` as bool [B, T]."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError("hidden_states: expected a non-empty float tensor [B, T, hidden], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    B, T = x.shape[:2]
    for name, t in (("key_mask", key_mask), ("document_ids", document_ids)):
        if t is None or isinstance(t, Documents):
            continue
        _validate.mask_dtype(name, t, "[B, T]")
        if tuple(t.shape) != (B, T):
            raise ValueError(f"{name}: expected shape {(B, T)} (the batch's [B, T]), got {tuple(t.shape)}")
    if isinstance(document_ids, Documents) and (document_ids.packed.batch, document_ids.packed.length) != (B, T):
        raise ValueError(f"document_ids: a layout of {(document_ids.packed.batch, document_ids.packed.length)} rows "
                         f"for a batch of {(B, T)}")
    return key_mask if key_mask is None or key_mask.dtype == torch.bool else key_mask != 0


class Encoder(nn.Module):
    """``layer`` ModuleList of standard-attention layers (transformers ElectraEncoder).

    Args: ``num_layers`` (>= 0), ``hidden_size``, ``num_heads``, ``intermediate_size``, ``act``, ``eps``,
    ``dropout`` as :class:`EncoderLayer`'s; ``attention_dropout`` the attention probabilities' dropout in [0, 1]."""

    def __init__(self, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int, act: str,
                 eps: float, dropout: float, attention_dropout: float):
        super().__init__()
        _validate.integer_arg("num_layers", num_layers, 0)
        _validate.probability("attention_dropout", attention_dropout, one=True)
        self.layer = nn.ModuleList(
            EncoderLayer(StandardSelfAttention(hidden_size, num_heads, attention_dropout), hidden_size,
                         intermediate_size, act, eps, dropout) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], unpad: bool = True,
                document_ids=None) -> torch.Tensor:
        """x [B, T, H], key_mask bool [B, T] or None -> [B, T, H]. A right-padded batch runs unpadded (``unpad``;
        electra_fast.nn.packing): its padded positions come back as zeros. ``document_ids`` int [B, T] (or its
        ``packing.Documents``): rows of several documents (each run of equal ids), attended each on its own (always
        packed)."""
        key_mask = encoder_inputs(x, key_mask, document_ids)
        packed = packing(key_mask, document_ids) if unpad or document_ids is not None else None
        h = x if packed is None else packed.unpad(x)
        for layer in self.layer:
            h = layer(h, key_mask if packed is None else packed)
        return h if packed is None else packed.pad(h)


class DisentangledEncoder(nn.Module):
    """``layer`` + ``rel_embeddings`` [2k, H] + ``LayerNorm`` on them (transformers DebertaV2Encoder).

    Args: as :class:`Encoder`'s, plus ``pos_att_type`` / ``share_att_key`` / ``position_buckets`` /
    ``max_relative_positions`` as ``DebertaV2Config``'s, ``span`` k (the table holds 2k rows), ``norm_rel_ebd``
    ``"layer_norm"`` or ``"none"``."""

    def __init__(self, num_layers: int, hidden_size: int, num_heads: int, intermediate_size: int, act: str,
                 eps: float, dropout: float, attention_dropout: float, pos_att_type: Sequence[str],
                 share_att_key: bool, position_buckets: int, max_relative_positions: int, span: int,
                 norm_rel_ebd: str):
        super().__init__()
        _validate.integer_arg("num_layers", num_layers, 0)
        self.layer = nn.ModuleList(
            EncoderLayer(DisentangledSelfAttention(hidden_size, num_heads, position_buckets=position_buckets,
                                                   max_relative_positions=max_relative_positions,
                                                   pos_att_type=pos_att_type, share_att_key=share_att_key,
                                                   attention_dropout=attention_dropout, pos_dropout=dropout),
                         hidden_size, intermediate_size, act, eps, dropout) for _ in range(num_layers))
        need = attention_span(position_buckets, max_relative_positions)
        if _validate.integer_arg("span", span, 1) < need:  # the attention reads 2 * need rows
            raise ValueError(f"span: expected >= {need} (position_buckets if > 0 else max_relative_positions), "
                             f"got {span}")
        self.rel_embeddings = nn.Embedding(2 * span, hidden_size)
        norms = rel_embedding_norms(norm_rel_ebd)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps) if "layer_norm" in norms else None

    def rel_embedding(self) -> torch.Tensor:
        rel = self.rel_embeddings.weight
        return rel if self.LayerNorm is None else self.LayerNorm(rel)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], unpad: bool = True,
                document_ids=None) -> torch.Tensor:
        """As :meth:`Encoder.forward`; relative positions are counted within each row (each document) either way."""
        key_mask = encoder_inputs(x, key_mask, document_ids)
        rel = self.rel_embedding()
        packed = packing(key_mask, document_ids) if unpad or document_ids is not None else None
        h = x if packed is None else packed.unpad(x)
        for layer in self.layer:
            h = layer(h, key_mask if packed is None else packed, rel_embeddings=rel)
        return h if packed is None else packed.pad(h)
