"""ElectraPretrainingModel: generator + discriminator replaced-token-detection pretraining on the fused ops.

One step (``forward``), for ``input_ids`` int [B, T] and ``attention_mask`` [B, T] (1 = real token):

1. ``electra_fast.mask_tokens`` selects positions (never padding, [CLS], [SEP], [MASK], [PAD]) and builds
   the generator's input;
2. the generator encodes it; its hidden states are gathered at the N selected positions *before* the
   head, and ``electra_fast.mlm_loss_and_sample`` projects them onto the tied vocabulary, takes the MLM
   loss and draws a Gumbel-max replacement per row ([N, V] logits never exist);
3. the samples replace every selected position of the original ids (a sample equal to the original is
   labelled real) and the discriminator scores every token;
4. ``electra_fast.rtd_loss`` takes the token mean of the sigmoid loss over all non-padding tokens.

``loss = mlm_loss + cfg.disc_weight * rtd_loss``. The samples are integers, so no gradient of the RTD
loss reaches the generator except through embeddings shared on purpose ("tied"; "gdes" blocks it).

Seeds: ``seed`` (int in [0, 2**63), or drawn from torch's default generator when None) keys the step's
corruption: masking uses Philox with ``seed``, Gumbel sampling ``(seed + 1) mod 2**63`` (the Philox
purposes differ as well). Dropout (hidden, SDPA attention, and the disentangled attention's Philox seed)
draws from torch's default generator, so a training run is reproducible under ``torch.manual_seed``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn

from .. import _backend, _seed, _validate
from ..ops.masking import check_word_starts, mask_tokens
from ..ops.rtd_loss import rtd_loss as rtd_loss_op
from ..ops.sampling import mlm_loss_and_sample
from ..nn.embeddings import DebertaV2Embeddings, ElectraEmbeddings, GDESEmbedding, positions
from ..nn.encoder import DisentangledEncoder, Encoder
from ..nn.packing import Documents, document_layout, packing
from ..nn.heads import DiscriminatorHead, GeneratorHead
from ..nn.linear import Linear
from .config import ElectraConfig

SEED_LIMIT = _seed.SEED_LIMIT


@dataclass
class ElectraPretrainingOutput:
    """Scalar tensors: ``mlm_loss`` fp32, ``rtd_loss`` and ``loss`` fp32 (fp64 for an fp64 model); ``metrics`` holds
    detached fp32 scalars."""
    loss: torch.Tensor
    mlm_loss: torch.Tensor
    rtd_loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    discriminator_logits: Optional[torch.Tensor] = None   # [B, T]
    corrupted_ids: Optional[torch.Tensor] = None          # [B, T] the discriminator's input
    masked: Optional[torch.Tensor] = None                 # bool [B, T] selected positions
    generator_input_ids: Optional[torch.Tensor] = None    # [B, T] the generator's input ([MASK] / kept / random)
    generator_correct: Optional[torch.Tensor] = None      # bool [N] per selected position (row-major): argmax right


class Backbone(nn.Module):
    """transformers' ``ElectraModel`` (standard) or ``DebertaV2Model`` (disentangled) layout:
    ``embeddings`` [+ ``embeddings_project``] + ``encoder``; ids [B, T] -> hidden [B, T, H]."""

    def __init__(self, cfg: ElectraConfig, hidden: int, layers: int, heads: int, ffn: int,
                 position_table: bool = False):
        super().__init__()
        self.disentangled = cfg.disentangled
        p, pa, eps = cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob, cfg.layer_norm_eps
        if cfg.disentangled:
            self.embeddings = DebertaV2Embeddings(cfg.vocab_size, cfg.embedding_size, hidden,
                                                  cfg.max_position_embeddings, cfg.type_vocab_size,
                                                  cfg.position_biased_input, cfg.pad_token_id, eps, p,
                                                  position_table=position_table)
            self.encoder = DisentangledEncoder(layers, hidden, heads, ffn, cfg.hidden_act, eps, p, pa,
                                               cfg.pos_att_type, cfg.share_att_key, cfg.position_buckets,
                                               cfg.max_relative_distance, cfg.relative_span, cfg.norm_rel_ebd)
        else:
            self.embeddings = ElectraEmbeddings(cfg.vocab_size, cfg.embedding_size, cfg.max_position_embeddings,
                                                cfg.type_vocab_size, cfg.pad_token_id, eps, p)
            if cfg.embedding_size != hidden:
                self.embeddings_project = Linear(cfg.embedding_size, hidden)
            self.encoder = Encoder(layers, hidden, heads, ffn, cfg.hidden_act, eps, p, pa)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``document_ids`` int [B, T] or None: rows holding several documents (each run of equal ids); attention
        stays inside each and absolute positions restart at each (electra_fast.nn.packing; also the
        ``packing.Documents`` a pretraining step builds once for both of its models)."""
        key = _key_mask(attention_mask)
        _check_document_ids(document_ids, input_ids)
        docs = document_layout(document_ids, key)
        x = self.embeddings(input_ids, token_type_ids, attention_mask,
                            position_ids=None if docs is None else docs.positions)
        if hasattr(self, "embeddings_project"):
            x = self.embeddings_project(x)
        return self.encoder(x, key, document_ids=docs)


def _check_document_ids(document_ids, input_ids: torch.Tensor) -> None:
    """``document_ids``: None, a built ``packing.Documents``, or integer ids of ``input_ids``' shape and device (a
    [1, 2T] tensor for a [2, T] batch merged its rows silently)."""
    if document_ids is None or isinstance(document_ids, Documents):
        return
    _validate.ids("document_ids", document_ids)
    _validate.same_shape("document_ids", document_ids, "input_ids", input_ids)
    _validate.same_device("document_ids", document_ids, "input_ids", input_ids)


def check_inputs(cfg: ElectraConfig, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 token_type_ids: Optional[torch.Tensor] = None, document_ids=None) -> None:
    """ValueError / TypeError naming the argument for inputs that ``cfg``'s models cannot take: ids int [B, T] in
    the vocabulary and within the positions; a mask, token types or document ids of their shape and device. Run
    once per public call (the id range reads the data: a host sync on CUDA; not in a captured graph), not by the
    modules a step runs."""
    _validate.ids("input_ids", input_ids)
    _validate.rank("input_ids", input_ids, 2, "[B, T]")
    if input_ids.device.type == "meta":  # the id-range checks below read the data
        raise ValueError("input_ids: expected a tensor with data (cpu / cuda), got a meta tensor")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids: expected a non-empty batch [B, T] (B, T >= 1), got shape "
                         f"{tuple(input_ids.shape)}")
    _validate.seq_len_fits(input_ids.shape[1], cfg.max_position_embeddings)
    _check_range("input_ids", input_ids, "vocab_size", cfg.vocab_size)
    if attention_mask is not None:
        _validate.mask_dtype("attention_mask", attention_mask, "[B, T], 1 = real token, 0 = padding")
        _validate.same_shape("attention_mask", attention_mask, "input_ids", input_ids)
        _validate.same_device("attention_mask", attention_mask, "input_ids", input_ids)
    if token_type_ids is not None:
        _check_token_types(cfg, input_ids, token_type_ids)
    _check_document_ids(document_ids, input_ids)


def _check_token_types(cfg: ElectraConfig, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> None:
    _validate.ids("token_type_ids", token_type_ids)
    _validate.same_shape("token_type_ids", token_type_ids, "input_ids", input_ids)
    _validate.same_device("token_type_ids", token_type_ids, "input_ids", input_ids)
    # ELECTRA's embeddings keep at least one type row; DeBERTa's ignore token types when type_vocab_size is 0
    if cfg.disentangled and cfg.type_vocab_size == 0:
        return
    _check_range("token_type_ids", token_type_ids, "type_vocab_size", max(cfg.type_vocab_size, 1))


def _check_range(name: str, ids: torch.Tensor, limit_name: str, limit: int) -> None:
    """ValueError for ids outside [0, limit). Kept under torch.compile (a graph break: a bad id there gave a silently
    wrong loss or an out-of-bounds abort in Inductor's kernel); skipped where no value can be read: torch.export and
    torch.jit.trace (a branch on the ids' values is data-dependent, which export refused), meta / fake tensors."""
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return
    if not torch.compiler.is_compiling() and not _validate.inspectable(ids):  # meta / fake: no values
        return
    lo, hi = torch.aminmax(ids)
    if lo < 0 or hi >= limit:
        raise ValueError(f"{name}: ids must lie in [0, {limit_name}={limit}), got values in [{int(lo)}, {int(hi)}]")


def _key_mask(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """bool [B, T] key-padding mask, or None when nothing is padded (the fast SDPA path)."""
    if attention_mask is None:
        return None
    _validate.mask_dtype("attention_mask", attention_mask, "[B, T], 1 = real token, 0 = padding")
    m = attention_mask.bool()
    if not _validate.capturing() and bool(m.all()):  # a graph keeps the mask: the next batch may be padded
        return None
    # a row without any real token attends to everything (its outputs are ignored) instead of NaN
    return m | ~m.any(1, keepdim=True)


class ElectraGenerator(nn.Module):
    """Masked-LM generator: ``backbone`` + ``head`` (output projection tied to the word embeddings)."""

    def __init__(self, cfg: ElectraConfig):
        super().__init__()
        self.config = cfg
        self.emd = cfg.enhanced_mask_decoder
        self.backbone = Backbone(cfg, cfg.generator_hidden_size, cfg.generator_num_hidden_layers,
                                 cfg.generator_num_attention_heads, cfg.generator_intermediate_size,
                                 position_table=self.emd)
        # ELECTRA's generator head always uses gelu; DeBERTa's uses hidden_act
        act = cfg.hidden_act if cfg.disentangled else "gelu"
        self.head = GeneratorHead(cfg.generator_hidden_size, cfg.embedding_size, cfg.vocab_size, act,
                                  cfg.layer_norm_eps)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.backbone.embeddings.word_embeddings

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, document_ids=None) -> torch.Tensor:
        """ids [B, T] -> the hidden states [B, T, H] the MLM head reads.

        With ``enhanced_mask_decoder`` (DeBERTa's EMD, Microsoft's ``EnhancedMaskDecoder.emd_context_layer``): let
        ``h`` be the input of the last encoder layer and ``z`` the absolute position embeddings (not part of the
        encoder's input); the last layer runs twice more with keys / values from ``h`` and queries (and the
        attention residual) from ``q``, starting at ``q = z + h``; the MLM head reads the final ``q``. The last
        layer's ordinary pass over ``h`` is not needed and not run. Unpadded / document-masked batches run packed,
        as in the encoder (electra_fast.nn.packing)."""
        if not self.emd:
            return self.backbone(input_ids, attention_mask, token_type_ids, document_ids)
        bb, key = self.backbone, _key_mask(attention_mask)
        _check_document_ids(document_ids, input_ids)
        docs = document_layout(document_ids, key)
        pos = None if docs is None else docs.positions
        h = bb.embeddings(input_ids, token_type_ids, attention_mask, position_ids=pos)
        z = positions(bb.embeddings.position_embeddings, input_ids.shape[1], pos).to(h.dtype).expand_as(h)
        packed = packing(key, docs)
        if packed is not None:
            h, z, key = packed.unpad(h), packed.unpad(z), packed
        rel = bb.encoder.rel_embedding()
        for layer in bb.encoder.layer[:-1]:
            h = layer(h, key, rel_embeddings=rel)
        q = h + z
        for _ in range(2):
            q = bb.encoder.layer[-1](h, key, rel_embeddings=rel, query_states=q)
        return q if packed is None else packed.pad(q)

    def logits(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """Full [B, T, V] MLM logits (inspection / interop; training never builds them); inputs checked as
        :func:`check_inputs` says."""
        check_inputs(self.config, input_ids, attention_mask, token_type_ids)
        h = self.encode(input_ids, attention_mask, token_type_ids)
        return self.head.logits(h, self.word_embeddings.weight)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """ids [B, T] -> [B, T, V] MLM logits, as :meth:`logits` (calling the module raised torch's "missing the
        required forward function")."""
        return self.logits(input_ids, attention_mask, token_type_ids)


class ElectraDiscriminator(nn.Module):
    """Replaced-token detector: ``backbone`` + ``head`` (one logit per token)."""

    def __init__(self, cfg: ElectraConfig):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                                 cfg.intermediate_size)
        self.head = DiscriminatorHead(cfg.hidden_size, cfg.hidden_act)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, document_ids=None) -> torch.Tensor:
        """ids [B, T] -> logits [B, T]; ``document_ids`` as in :meth:`Backbone.forward`; inputs checked as
        :func:`check_inputs` says."""
        check_inputs(self.config, input_ids, attention_mask, token_type_ids, document_ids)
        return self.rtd_logits(input_ids, attention_mask, token_type_ids, document_ids)

    def rtd_logits(self, input_ids, attention_mask=None, token_type_ids=None, document_ids=None) -> torch.Tensor:
        """:meth:`forward` without the input checks, for callers that ran them (a pretraining step)."""
        return self.head(self.backbone(input_ids, attention_mask, token_type_ids, document_ids))


def _tied_tables_agree(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook of a tied model: its one embeddings module appears under both models' names, so a
    state dict from an untied model loaded with "All keys matched" and the discriminator's tables silently replaced
    the generator's."""
    g, d = f"{prefix}generator.backbone.embeddings.", f"{prefix}discriminator.backbone.embeddings."

    def same(a, b) -> bool:  # NaN where the other has NaN too: a table of a diverged run is still one table
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all()))

    differ = [key[len(d):] for key, value in state_dict.items() if key.startswith(d) and g + key[len(d):] in state_dict
              and not same(value, state_dict[g + key[len(d):]])]
    if differ:
        raise ValueError(f"state_dict: its generator and discriminator embeddings differ ({', '.join(differ)}), but "
                         "this model ties them (embedding_sharing='tied'); load it into a model with "
                         "embedding_sharing='none'")


class ElectraPretrainingModel(nn.Module):
    """Generator + discriminator with ``cfg.embedding_sharing`` = "none" | "tied" | "gdes".

    ``fused=False`` runs the model as its eager twin (``electra_fast.eager_twin_mode()``: torch's own modules,
    the ops' reference kernels), same parameters and semantics.
    """

    def __init__(self, config: ElectraConfig, fused: bool = True):
        super().__init__()
        if not isinstance(config, ElectraConfig):
            raise TypeError(f"config: expected an ElectraConfig, got {type(config).__name__}")
        config.validate(warn=False)  # a field set after construction (attention="bogus") built a model silently
        self.config = config
        self.fused = fused
        self.generator = ElectraGenerator(config)
        self.discriminator = ElectraDiscriminator(config)
        self.apply(lambda m: init_weights(m, config.initializer_range))
        self._share_embeddings()

    def _share_embeddings(self) -> None:
        g, d = self.generator.backbone.embeddings, self.discriminator.backbone.embeddings
        if self.config.embedding_sharing == "tied":
            self.discriminator.backbone.embeddings = g
            self.register_load_state_dict_pre_hook(_tied_tables_agree)
        elif self.config.embedding_sharing == "gdes":
            d.word_embeddings = GDESEmbedding(g.word_embeddings)
            if d.position_embeddings is not None:
                d.position_embeddings = GDESEmbedding(g.position_embeddings)

    # ------------------------------------------------------------------ checks
    def _check_inputs(self, input_ids, attention_mask, seed, token_type_ids=None, document_ids=None,
                      word_starts=None):
        """The checked seed (an int; a one-element integer tensor becomes one), or None."""
        check_inputs(self.config, input_ids, attention_mask, token_type_ids, document_ids)
        if word_starts is not None:  # mask_tokens runs with validate=False: the step would mask nothing
            check_word_starts(word_starts, input_ids, attention_mask)
        return None if seed is None else _seed.check(seed)

    # ------------------------------------------------------------------ step
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                seed: Optional[int] = None, token_type_ids: Optional[torch.Tensor] = None,
                word_starts: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None) -> ElectraPretrainingOutput:
        """One pretraining step's forward. input_ids int [B, T]; attention_mask [B, T] (1 = real, right padding
        with ``document_ids``) or None; seed: an int in [0, 2**63) (or a one-element integer tensor) keying the
        masking, sampling and dropout, or None (drawn from torch's generator); token_type_ids int [B, T] or None;
        word_starts bool / uint8 [B, T] (1 = a word begins: whole-word masking) or
        None; document_ids int [B, T] or None: rows packed from several documents, each maximal run of equal ids
        one document (DOC-SENTENCES packing: attention stays inside a document, positions restart at each).
        Returns :class:`ElectraPretrainingOutput` (loss = MLM + disc_weight x RTD)."""
        seed = self._check_inputs(input_ids, attention_mask, seed, token_type_ids, document_ids, word_starts)
        if seed is None:
            seed = _seed.draw()
        ctx = contextlib.nullcontext() if self.fused else _backend.eager_twin_mode()
        with ctx:
            return self._step(input_ids, attention_mask, seed, token_type_ids, word_starts, document_ids)

    def _step(self, input_ids, attention_mask, seed, token_type_ids, word_starts=None, document_ids=None):
        cfg = self.config
        gen, disc = self.generator, self.discriminator
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask != 0
        m = mask_tokens(input_ids, mask_token_id=cfg.mask_token_id, vocab_size=cfg.vocab_size, seed=seed,
                        mask_prob=cfg.mask_prob, mask_token_frac=cfg.mask_token_frac,
                        random_token_frac=cfg.random_token_frac, special_token_ids=cfg.masking_excluded_ids,
                        attention_mask=attention_mask, word_starts=word_starts, strategy=cfg.masking_strategy,
                        validate=False)  # ids were checked above; word_starts' shape is checked regardless
        masked = m.masked
        if document_ids is not None:  # one layout for both models (its host syncs once per step)
            document_ids = document_layout(document_ids, _key_mask(attention_mask))
        gen_hidden = gen.encode(m.input_ids, attention_mask, token_type_ids, document_ids)
        # the generator head runs at the masked positions only
        h = gen.head.transform(gen_hidden[masked])
        targets = input_ids[masked]
        # under autocast the head's output may be bf16/fp16 while the tied table stays fp32: the op takes one
        # dtype (it accumulates in fp32 regardless)
        weight, bias = gen.word_embeddings.weight.to(h.dtype), gen.head.bias.to(h.dtype)
        mlm_loss, sampled, gen_metrics = mlm_loss_and_sample(
            h, weight, targets, bias=bias, seed=(seed + 1) % SEED_LIMIT,
            temperature=cfg.temperature, disallowed_ids=cfg.disallowed_sample_ids, return_metrics=True)
        corrupted = input_ids.masked_scatter(masked, sampled.to(input_ids.dtype))
        logits = disc.rtd_logits(corrupted, attention_mask, token_type_ids, document_ids)
        rtd_loss, disc_metrics = rtd_loss_op(logits, corrupted, input_ids, attention_mask, return_metrics=True)
        loss = mlm_loss.float() + cfg.disc_weight * rtd_loss
        metrics = {"generator_accuracy": gen_metrics["accuracy"].float(),
                   "discriminator_accuracy": disc_metrics["accuracy"],
                   "discriminator_precision": disc_metrics["precision"],
                   "discriminator_recall": disc_metrics["recall"],
                   "replaced_fraction": disc_metrics["replaced_fraction"]}
        return ElectraPretrainingOutput(loss=loss, mlm_loss=mlm_loss.float(), rtd_loss=rtd_loss, metrics=metrics,
                                        discriminator_logits=logits, corrupted_ids=corrupted, masked=masked,
                                        generator_input_ids=m.input_ids, generator_correct=gen_metrics["correct"])

    # ------------------------------------------------------------------ interop
    def save_pretrained(self, path) -> None:
        """path/generator + path/discriminator (transformers checkpoints) + path/electra_fast.json. ``path`` must be
        new or an empty directory (ValueError otherwise; unlike transformers' save_pretrained, nothing is
        overwritten); the directory appears whole or not at all."""
        from . import interop
        interop.save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path, fused: bool = True) -> "ElectraPretrainingModel":
        """The pair :meth:`save_pretrained` (or ``electra-fast export``) wrote to ``path`` (str or os.PathLike), with
        its config and embedding sharing; ``fused=False`` gives the eager twin. A missing or damaged file is a
        ValueError / FileNotFoundError naming it."""
        from . import interop
        return interop.from_pretrained(cls, path, fused=fused)

    @classmethod
    def from_transformers(cls, generator_path, discriminator_path, *, embedding_sharing: Optional[str] = None,
                          fused: bool = True, **config_overrides) -> "ElectraPretrainingModel":
        """Load directories written by transformers' ``save_pretrained`` (ELECTRA or DeBERTa-v2).

        transformers' configs record no [CLS] / [SEP] / [MASK] / [UNK] ids: pass the tokenizer's as
        ``cls_token_id=``, ``sep_token_id=``, ``mask_token_id=``, ``unk_token_id=`` (else ElectraConfig's defaults,
        BERT's 101 / 102 / 103 / 100). ``electra-fast pretrain --init-from`` reads them from the tokenizer."""
        from . import interop
        return interop.from_transformers(cls, generator_path, discriminator_path, embedding_sharing=embedding_sharing,
                                         fused=fused, **config_overrides)


@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    """transformers' BERT initialisation: N(0, std) weights, zero biases, zero padding row, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, std)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()
