"""Parity report (#19): electra_fast's fused pretraining job vs ELECTRA / DeBERTa-v3 written here on transformers.

Both sides train the same configuration (batch 16 x 128 of the embedded corpus, temperature 3, lr 1e-3 with 10 %
warm-up then linear decay, AdamW(0.9, 0.999, 1e-6), weight decay 0.01 off LayerNorm / biases, clip 1.0, loss = MLM +
50 RTD) from the same initial weights, on the same packed sequences in the same order (the run's own token cache,
held-out split and sampler: the data is the only thing taken from electra_fast), with their own randomness:
  fused        ``electra_fast.pretrain(seed=S, precision=fp32, eval_every=E)`` (and bf16 / fp16 autocast)
  independent  ``--layout electra`` (the default job, electra-tiny): transformers' ElectraForMaskedLM (generator) +
               ElectraForPreTraining (discriminator), the embedding layer shared;
               ``--layout deberta`` (:func:`deberta_tiny_config`): DebertaV2ForMaskedLM + DebertaV2Model with an RTD
               head, GDES written here (:class:`GDES`);
               masking written from google-research/electra pretrain_helpers.py: n = max(1, min(N, round(0.15
               n_real))) of the candidates (real tokens except [CLS] / [SEP] / [MASK]), ELECTRA 85 % [MASK] / 15 %
               kept, DeBERTa (BERT's rule) 80 % [MASK] / 10 % random / 10 % kept; Gumbel-max samples from the full
               generator logits / temperature (nothing excluded, as ELECTRA and the fused config say); a sampled
               original is labelled real; binary cross-entropy over every real token; torch's RNG seeded with S.
Held-out metrics every E steps on the same held-out sequences, computed for both sides by this file's evaluation with
one fixed corruption draw (``EVAL_SEED``): the fused run saves a checkpoint at each evaluation step and each is
evaluated here (its job's own held-out numbers, from another fixed draw, are kept as ``own_eval_*``). With a draw of
its own per side, the draw alone shifts every run of a side alike (AUC by up to ~0.006 on this slice), which reads as
a gap between the implementations that is none.

Criterion: at every evaluation step after warm-up, each fused run's held-out AUC, F1 and generator accuracy are
compared with the band the independent seeds span, widened by that band's width (max - min) on each side (the
run-to-run spread measured across the independent seeds); bf16 / fp16 vs fp32 the same with the fp32 fused seeds'
band. A band from three seeds is itself noisy: a fourth run of the *same* implementation falls outside it at a point
with probability ``chance_outside(3)`` = 0.13 (normal run-to-run noise; Monte Carlo). So the verdict is not "no point
outside" (two identical implementations would fail it almost surely over 54 points) but: the points outside are no
more than the 95th percentile of Binomial(points checked, 0.13) (points treated as independent, which the correlation
along a curve makes approximate), in both directions of the comparison (fused runs against the independent band, and
independent runs against the fused band, each direction with its own band's size and point count), and each count says
how many misses lie above and below. A side with one run spans no band: that comparison gets no verdict.

Usage (from any directory but the repository root; minutes per run on 2 cores):
    python tools/parity_report.py --out OUT --seeds 0,1,2 [--layout deberta] [--steps 600 --eval-every 100]
        [--sides fused_fp32,independent,fused_bf16,fused_fp16]
writes OUT/parity.json (every curve, the bands, the verdict and its point counts, each run's seconds and machine)
and OUT/parity.png; a rerun reuses the finished runs in OUT. bench/results/parity/ holds copies named
CPU-DATE-MODEL.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("eval_discriminator_auc", "eval_discriminator_f1", "eval_generator_accuracy")


# ------------------------------------------------------------------------------------ the independent side
# What each layout's definition says, written here (not read from electra_fast): the share of selected positions
# set to [MASK] and to a random token (google-research/electra pretrain_helpers.mask(): 85 % / 0 %; BERT's
# create_pretraining_data.py and DeBERTa's NGramMaskGenerator: 80 % / 10 %), and how the discriminator reads
# the generator's embeddings (ELECTRA: the embedding layer shared; DeBERTa-v3: GDES). The fused job's config must
# say the same (checked in ``Independent``), else the comparison would be of two recipes.
DEFINITIONS = {"electra": dict(mask_token_frac=0.85, random_token_frac=0.0, embedding_sharing="tied"),
               "deberta": dict(mask_token_frac=0.8, random_token_frac=0.1, embedding_sharing="gdes")}
MASK_PROB = 0.15


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact ROC AUC with ties counted half (Mann-Whitney U from average ranks)."""
    order = torch.argsort(scores.double())
    s = scores.double()[order]
    ranks = torch.empty_like(s)
    i = 0
    n = len(s)
    while i < n:  # average rank over each run of ties
        j = i
        while j + 1 < n and s[j + 1] == s[i]:
            j += 1
        ranks[i:j + 1] = (i + j) / 2 + 1
        i = j + 1
    pos = labels.bool()[order]
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if not n_pos or not n_neg:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _mask(ids: torch.Tensor, not_candidates: torch.Tensor, mask_id: int, mask_frac: float, random_frac: float,
          vocab_size: int, g: torch.Generator):
    """google-research/electra's mask(): per row n = max(1, min(N, round(0.15 n_real))) positions drawn among the
    candidates (every real token but [CLS] / [SEP] / [MASK] / padding: ``not_candidates``); of those ``mask_frac``
    become [MASK], ``random_frac`` a random non-special token, the rest stay. Every token of a packed row is real."""
    B, T = ids.shape
    cand = ~torch.isin(ids, not_candidates)
    n_max = int((MASK_PROB + 0.005) * T)
    selected = torch.zeros_like(cand)
    for b in range(B):
        idx = cand[b].nonzero().flatten()
        n = min(len(idx), max(1, min(n_max, int(round(T * MASK_PROB)))))
        pick = idx[torch.randperm(len(idx), generator=g)[:n]]
        selected[b, pick] = True
    u = torch.rand(B, T, generator=g)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[not_candidates] = False
    pool = allowed.nonzero().flatten()
    randoms = pool[torch.randint(len(pool), (B, T), generator=g)]
    out = torch.where(selected & (u < mask_frac), torch.full_like(ids, mask_id), ids)
    out = torch.where(selected & (u >= mask_frac) & (u < mask_frac + random_frac), randoms, out)
    return out, selected


def not_candidates(cfg) -> torch.Tensor:
    """Ids never selected for masking, as ELECTRA's ``_get_candidates_mask``: [CLS], [SEP], [MASK] (and padding).
    Not the config's ``disallowed_sample_ids``: those are the ids the generator may not *sample* (none by default;
    reading them here made every [CLS] / [SEP] a candidate, the cause of the first report's gap)."""
    return torch.tensor(sorted({cfg.cls_token_id, cfg.sep_token_id, cfg.mask_token_id, cfg.pad_token_id}))


class GDES(torch.nn.Module):
    """DeBERTa-v3's gradient-disentangled embedding sharing, from its definition: the discriminator looks up
    ``stop_gradient(E_G) + E_delta`` (the sum materialised), E_delta its own parameter."""

    def __init__(self, generator_embedding: torch.nn.Embedding, delta: torch.Tensor):
        super().__init__()
        self._generator = [generator_embedding]  # a reference, not a submodule: E_G belongs to the generator
        self.padding_idx = generator_embedding.padding_idx
        self.delta = torch.nn.Parameter(delta.detach().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self._generator[0].weight.detach() + self.delta, self.padding_idx)


class TransformersPair:
    """transformers' generator and discriminator holding an electra_fast model's initial weights: ELECTRA as
    ElectraForMaskedLM + ElectraForPreTraining with the whole embedding layer shared (and the MLM output tied);
    DeBERTa-v3 as DebertaV2ForMaskedLM + DebertaV2Model with an RTD head (dense, activation, dense to one logit)
    and GDES. ``generate(ids, mask)`` -> MLM logits [B, T, V], ``discriminate(ids, mask)`` -> logits [B, T]."""

    # the DeBERTa RTD head (nn.Sequential here) <- the keys electra_fast's export writes next to DebertaV2Model's
    HEAD_KEYS = {"0.weight": "discriminator_predictions.dense.weight",
                 "0.bias": "discriminator_predictions.dense.bias",
                 "2.weight": "discriminator_predictions.dense_prediction.weight",
                 "2.bias": "discriminator_predictions.dense_prediction.bias"}

    def __init__(self, init):
        import transformers
        from electra_fast.models.interop import export_state, transformers_config

        cfg = init.config
        self.layout = "deberta" if cfg.disentangled else "electra"
        if self.layout == "deberta" and cfg.enhanced_mask_decoder:
            raise ValueError("transformers' DebertaV2ForMaskedLM has no Enhanced Mask Decoder: compare a config "
                             "with enhanced_mask_decoder=False")
        if cfg.embedding_sharing != DEFINITIONS[self.layout]["embedding_sharing"]:
            raise ValueError(f"{self.layout}: the fused config shares embeddings by {cfg.embedding_sharing!r}, the "
                             f"definition by {DEFINITIONS[self.layout]['embedding_sharing']!r}")
        classes = {"electra": (transformers.ElectraConfig, transformers.ElectraForMaskedLM,
                               transformers.ElectraForPreTraining),
                   "deberta": (transformers.DebertaV2Config, transformers.DebertaV2ForMaskedLM,
                               transformers.DebertaV2Model)}[self.layout]
        parts = []
        for role, cls in (("generator", classes[1]), ("discriminator", classes[2])):
            hf = dict(transformers_config(cfg, role))
            hf.pop("architectures", None)
            hf.pop("electra_fast_enhanced_mask_decoder", None)
            model = cls(classes[0](**hf))
            state = dict(export_state(init, role))
            head = {k: state.pop(k) for k in list(state) if k.startswith("discriminator_predictions.")
                    and self.layout == "deberta"}
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or any("lm_head.weight" not in k and "position_ids" not in k for k in missing):
                raise ValueError(f"{role}: weights do not map onto {cls.__name__}: missing {missing}, "
                                 f"unexpected {unexpected}")
            parts.append(model.train())
        self.gen, self.disc = parts
        if self.layout == "electra":
            self.disc.electra.embeddings = self.gen.electra.embeddings  # ELECTRA ties the embedding layer
            if self.gen.generator_lm_head.weight is not self.gen.electra.embeddings.word_embeddings.weight:
                raise ValueError("ElectraForMaskedLM's output projection is not tied to its word embeddings")
            self.head = None
        else:
            from transformers.activations import ACT2FN
            H = cfg.hidden_size
            self.head = torch.nn.Sequential(torch.nn.Linear(H, H), ACT2FN[cfg.hidden_act], torch.nn.Linear(H, 1))
            self.head.load_state_dict({ours: head[theirs] for ours, theirs in self.HEAD_KEYS.items()})
            g_emb = self.gen.deberta.embeddings.word_embeddings
            d_emb = self.disc.embeddings
            d_emb.word_embeddings = GDES(g_emb, d_emb.word_embeddings.weight - g_emb.weight)  # E_delta = E_D - E_G
        self.modules = [m for m in (self.gen, self.disc, self.head) if m is not None]

    def export(self) -> dict:
        """``role.key`` -> tensor, named as electra_fast's ``export_state`` names them (GDES materialised)."""
        gen, disc = self.gen.state_dict(), dict(self.disc.state_dict())
        if self.head is not None:
            disc["embeddings.word_embeddings.weight"] = (gen["deberta.embeddings.word_embeddings.weight"]
                                                         + disc.pop("embeddings.word_embeddings.delta"))
            disc.update({theirs: self.head.state_dict()[ours] for ours, theirs in self.HEAD_KEYS.items()})
        return {**{f"generator.{k}": v for k, v in gen.items()}, **{f"discriminator.{k}": v for k, v in disc.items()}}

    def generate(self, ids, mask=None):
        return self.gen(input_ids=ids, attention_mask=mask).logits

    def discriminate(self, ids, mask=None):
        if self.head is None:
            return self.disc(input_ids=ids, attention_mask=mask).logits
        return self.head(self.disc(input_ids=ids, attention_mask=mask).last_hidden_state).squeeze(-1)

    def parameters(self):
        """Every parameter once (the shared embeddings are reachable from both models)."""
        return list({id(p): p for m in self.modules for p in m.parameters()}.values())

    def train(self, mode: bool = True):
        for m in self.modules:
            m.train(mode)


class Independent:
    """One training side: a :class:`TransformersPair` from the fused job's initial weights for ``seed`` and the
    ELECTRA step written from the definition (:meth:`losses`)."""

    def __init__(self, run_dir: str, seed: int, weights: str = ""):
        """``weights``: a checkpoint directory of the fused run whose weights to hold instead of its initial ones
        (to evaluate the fused side with this side's held-out procedure)."""
        from electra_fast.models import ElectraPretrainingModel
        from electra_fast.train import checkpoint

        ckpts = os.path.join(run_dir, "checkpoints")
        cfg = checkpoint.load_config(os.path.join(ckpts, sorted(os.listdir(ckpts))[-1]))
        torch.manual_seed(seed)  # the fused job's initial weights for this seed (the job seeds the same way)
        init = ElectraPretrainingModel(cfg)
        if weights:
            checkpoint.load_model_state(init, os.path.join(weights, "model.safetensors"))
        self.pair = TransformersPair(init)
        definition = DEFINITIONS[self.pair.layout]
        for k in ("mask_token_frac", "random_token_frac"):
            if abs(getattr(cfg, k) - definition[k]) > 1e-9 or abs(cfg.mask_prob - MASK_PROB) > 1e-9:
                raise ValueError(f"the fused job's {k} {getattr(cfg, k)} / mask_prob {cfg.mask_prob} is not "
                                 f"{self.pair.layout}'s definition ({definition[k]} / {MASK_PROB})")
        self.cfg, self.definition = cfg, definition
        self.not_candidates = not_candidates(cfg)
        # ELECTRA samples from the full softmax (disallow_correct False); a job may exclude ids (its config says)
        self.not_sampled = torch.tensor(sorted(cfg.disallowed_sample_ids), dtype=torch.long)
        self.params = self.pair.parameters()

    def losses(self, ids: torch.Tensor, g: torch.Generator):
        cfg, d = self.cfg, self.definition
        masked, selected = _mask(ids, self.not_candidates, cfg.mask_token_id, d["mask_token_frac"],
                                 d["random_token_frac"], cfg.vocab_size, g)
        logits = self.pair.generate(masked)[selected]  # [n_sel, V]
        mlm = F.cross_entropy(logits, ids[selected])
        with torch.no_grad():
            z = logits.float() / cfg.temperature
            z[:, self.not_sampled] = -math.inf
            u = torch.rand(z.shape, generator=g).clamp_min(1e-20)
            sample = torch.argmax(z - torch.log(-torch.log(u)), dim=-1)
        corrupted = ids.clone()
        corrupted[selected] = sample
        labels = (corrupted != ids).float()  # a sampled original is "real"
        dl = self.pair.discriminate(corrupted)
        rtd = F.binary_cross_entropy_with_logits(dl, labels)  # packed rows: every token is real
        gen_acc = (logits.argmax(-1) == ids[selected]).float().mean()
        return mlm + cfg.disc_weight * rtd, dl.detach(), labels, gen_acc.detach(), selected.sum()


def _evaluate(model: Independent, batches, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    model.pair.train(False)
    scores, labels, correct, total = [], [], 0.0, 0
    with torch.no_grad():
        for ids in batches:
            _, d, lab, acc, n = model.losses(ids, g)
            scores.append(d.flatten()), labels.append(lab.flatten())
            correct += float(acc) * int(n)
            total += int(n)
    model.pair.train(True)
    s, lab = torch.cat(scores), torch.cat(labels)
    pred = s > 0
    tp = float((pred & lab.bool()).sum())
    precision = tp / max(1.0, float(pred.sum()))
    recall = tp / max(1.0, float(lab.sum()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"eval_discriminator_auc": _auc(s, lab), "eval_discriminator_f1": f1,
            "eval_generator_accuracy": correct / max(1, total)}


EVAL_SEED = 0x4556414C  # one fixed draw of held-out corruption, the same for every run of either side


def _data(run_dir: str, cfg, batch: int):
    """(packed sequences of the fused run's token cache, its held-out batches, its training ids)."""
    from electra_fast.train import data as data_mod
    from electra_fast.train.evaluation import heldout_count, split

    run = json.load(open(os.path.join(run_dir, "run.json")))
    stream = [os.path.join(run_dir, "cache", f) for f in os.listdir(os.path.join(run_dir, "cache"))
              if f.startswith("tokens-") and f.endswith(".bin")][0]
    seq_len = (run.get("options") or {}).get("seq_len") or 128  # run.json keeps the options under "options"
    packed = data_mod.PackedSequences(stream, seq_len, cfg.cls_token_id, cfg.sep_token_id)
    held_ids, train_ids = split(len(packed), heldout_count(len(packed)))
    held = [packed.batch(list(held_ids[i:i + batch])) for i in range(0, len(held_ids), batch)]
    return packed, held, train_ids


def evaluate_checkpoint(run_dir: str, checkpoint: str, seed: int, held: list) -> dict:
    """A fused run's checkpoint through this side's held-out evaluation (same code, same draws as the
    independent runs; ``held``: :func:`_data`'s held-out batches): the two sides' curves then differ by their
    training only, not by the evaluation."""
    return _evaluate(Independent(run_dir, seed, weights=checkpoint), held, EVAL_SEED)


def train_independent(run_dir: str, seed: int, steps: int, eval_every: int, batch: int, lr: float) -> list:
    from electra_fast.train.evaluation import SplitSampler
    from electra_fast.train.optim import linear_schedule, param_groups

    model = Independent(run_dir, seed)
    packed, held, train_ids = _data(run_dir, model.cfg, batch)
    sampler = SplitSampler(train_ids, seed)  # the fused job's order for this seed
    seen, dedup = set(), []
    for grp in (grp for m in model.pair.modules for grp in param_groups(m, 0.01)):
        ps = [p for p in grp["params"] if id(p) not in seen]  # the shared embeddings belong to one group only
        seen.update(id(p) for p in ps)
        if ps:
            dedup.append({"params": ps, "weight_decay": grp["weight_decay"]})
    opt = torch.optim.AdamW(dedup, lr=lr, betas=(0.9, 0.999), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(min(10_000, steps // 10), steps))
    torch.manual_seed(seed)  # dropout
    g = torch.Generator().manual_seed(seed)
    curve, t0 = [], time.perf_counter()
    for step in range(1, steps + 1):
        ids = packed.batch(sampler.indices((step - 1) * batch, batch))
        loss, *_ = model.losses(ids, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.params, 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            rec = {"step": step, "loss": float(loss.detach()), **_evaluate(model, held, EVAL_SEED)}
            curve.append(rec)
            print(f"independent seed {seed} step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in rec.items()
                                                                     if k != "step")
                  + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return curve


# ------------------------------------------------------------------------------------------ the fused side
# The job each layout trains. electra: the default job (electra-tiny, embedded corpus, lr 1e-3). deberta: the
# DeBERTa-v3 preset's layout (disentangled attention with c2p + p2c, shared keys, LayerNorm'd relative embeddings,
# no absolute positions, generator of the same width and half the depth, GDES, 80/10/10 masking) at the tiny job's
# size and settings (H 128, 2 layers x 2 heads, temperature 3, lr 1e-3), with two changes transformers needs:
# no Enhanced Mask Decoder (DebertaV2ForMaskedLM has none) and 64 position buckets over 128 positions.
def deberta_tiny_config():
    from electra_fast.models import ElectraConfig
    return ElectraConfig.deberta_v3_layout(128, 2, 2, generator_num_hidden_layers=1, enhanced_mask_decoder=False,
                                           position_buckets=64, max_position_embeddings=128, temperature=3.0)


LR = 1e-3


def job_kwargs(layout: str, out: str) -> dict:
    """The ``electra_fast.pretrain`` arguments of ``layout``'s job (its config file written under ``out``)."""
    if layout == "electra":
        return {"lr": LR}
    path = os.path.join(out, "deberta-tiny.json")
    if not os.path.exists(path):
        deberta_tiny_config().to_json_file(path)
    return {"lr": LR, "model": path}


def train_fused(out: str, seed: int, steps: int, eval_every: int, precision: str, job: dict, batch: int) -> list:
    """The fused run's curve: at every evaluation step, its checkpoint evaluated by :func:`evaluate_checkpoint`
    (``eval_*``), next to the job's own held-out numbers (``own_eval_*``: its own fixed corruption draw)."""
    import electra_fast

    ckpts = os.path.join(out, "checkpoints")
    if not os.path.exists(os.path.join(ckpts, f"step-{steps:08d}")):  # else: read the finished run
        electra_fast.pretrain(out=out, seed=seed, steps=steps, eval_every=eval_every, save_every=eval_every,
                              keep=steps // eval_every + 1, precision=precision, progress=False, **job)
    from electra_fast.train import checkpoint

    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    held = _data(out, checkpoint.load_config(os.path.join(ckpts, f"step-{steps:08d}")), batch)[1]
    curve = []
    for r in (r for r in recs if METRICS[0] in r):
        same = evaluate_checkpoint(out, os.path.join(ckpts, f"step-{r['step']:08d}"), seed, held)
        curve.append({"step": r["step"], "loss": r.get("loss"), **same,
                      **{"own_" + k: r[k] for k in METRICS}})
    return curve


# ------------------------------------------------------------------------------------------------ verdict
def bands(curves: list) -> dict:
    """metric -> step -> (min, max) over the runs."""
    out = {}
    for k in METRICS:
        per_step = {}
        for curve in curves:
            for r in curve:
                per_step.setdefault(r["step"], []).append(r[k])
        out[k] = {s: (min(v), max(v)) for s, v in per_step.items()}
    return out


def inside(curve: list, band: dict, after: int) -> list:
    """The (step, metric, value, low, high) points outside the band widened by its width on each side."""
    misses = []
    for r in curve:
        if r["step"] <= after:
            continue
        for k in METRICS:
            lo, hi = band[k][r["step"]]
            w = hi - lo
            if not lo - w <= r[k] <= hi + w:
                misses.append((r["step"], k, r[k], lo - w, hi + w))
    return misses


MIN_BAND = 2  # runs a side needs for a band: one run spans none


def chance_outside(n_band: int, draws: int = 1_000_000) -> float:
    """P(a further run of the same implementation lies outside the widened band of ``n_band`` runs) at one point,
    for normal run-to-run noise (Monte Carlo, fixed seed)."""
    x = np.random.default_rng(0).standard_normal((draws, n_band + 1))
    lo, hi = x[:, :n_band].min(1), x[:, :n_band].max(1)
    w = hi - lo
    return float(((x[:, n_band] < lo - w) | (x[:, n_band] > hi + w)).mean())


def allowed_outside(checked: int, p: float, level: float = 0.95) -> int:
    """The ``level`` quantile of Binomial(checked, p): the most points outside two identical implementations give
    in ``level`` of reports."""
    cdf = 0.0
    for k in range(checked + 1):
        cdf += math.comb(checked, k) * p ** k * (1 - p) ** (checked - k)
        if cdf >= level:
            return k
    return checked


def count(misses_per_seed: dict, runs: dict, warm: int) -> dict:
    misses = [m for v in misses_per_seed.values() for m in v]
    return {"outside": len(misses), "above": sum(m[2] > m[4] for m in misses),
            "below": sum(m[2] < m[3] for m in misses),
            "checked": sum(len([r for r in runs[s] if r["step"] > warm]) * len(METRICS) for s in misses_per_seed)}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    colors = {"independent": "tab:gray", "fused_fp32": "tab:blue", "fused_bf16": "tab:orange", "fused_fp16": "tab:green"}
    for ax, k in zip(axes, METRICS):
        for side, runs in result["runs"].items():
            for seed, curve in runs.items():
                ax.plot([r["step"] for r in curve], [r[k] for r in curve], color=colors[side], alpha=0.8,
                        label=f"{side} seed {seed}")
        ax.set_title(f"{result.get('layout', 'electra')}: " + k.replace("eval_", "held-out "))
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


SIDES = ("fused_fp32", "independent", "fused_bf16", "fused_fp16")  # trained in this order: independent reads fp32's


def _refuse(line: str) -> None:
    print(f"parity_report: error: {line}", file=sys.stderr)
    sys.exit(2)


def this_machine() -> dict:
    """What a run's timing depends on: recorded per run, since a folder's runs may come from several machines."""
    from electra_fast.bench_report import machine_name
    return {"cpu": machine_name("cpu"), "torch": torch.__version__, "threads": torch.get_num_threads()}


def record_machine(result: dict, key: str, machine: dict) -> None:
    """Note ``machine`` for the run ``key`` (``side-seed``, as ``seconds``); the top-level cpu / torch / threads stay
    only while every run has the same (a report written before per-run records: its top level was every run's)."""
    machines = result.setdefault("machines", {})
    if not machines and "cpu" in result:
        legacy = {k: result.get(k) for k in ("cpu", "torch", "threads")}
        machines.update({f"{side}-{seed}": legacy for side, runs in result["runs"].items() for seed in runs})
    machines[key] = machine
    for k in ("cpu", "torch", "threads"):
        result.pop(k, None)
    if len({json.dumps(m, sort_keys=True) for m in machines.values()}) == 1:
        result.update(machine)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sides", default="fused_fp32,independent,fused_bf16",
                   help=f"any of {', '.join(SIDES)} (independent needs fused_fp32's run)")
    p.add_argument("--layout", choices=tuple(DEFINITIONS), default="electra",
                   help="electra: the default job; deberta: the DeBERTa-v3 layout (deberta_tiny_config)")
    args = p.parse_args()
    sides = [s.strip() for s in args.sides.split(",")]
    unknown = [s for s in sides if s not in SIDES]
    if unknown:  # a misspelt side would train, be saved under its name and break every later run of --out
        _refuse(f"--sides: unknown side(s) {', '.join(map(repr, unknown))}; expected any of {', '.join(SIDES)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        _refuse(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    path = os.path.join(args.out, "parity.json")
    result = {"runs": {}}
    if os.path.exists(path):
        try:
            with open(path) as fh:
                result = json.load(fh)
        except (OSError, ValueError) as e:
            _refuse(f"--out: cannot read {path}: {e}")
        if not isinstance(result, dict) or not isinstance(result.get("runs"), dict):
            _refuse(f"--out: {path} is not a parity report (no runs); use another --out")
        stray = [s for s in result["runs"] if s not in SIDES]
        if stray:
            _refuse(f"--out: {path} holds runs of unknown side(s) {', '.join(map(repr, stray))}; remove them from "
                    "its runs or use another --out")
    if result.get("layout", args.layout) != args.layout:
        _refuse(f"--layout: {path} holds a {result['layout']} report; use another --out")
    # its curves are reused: they must be of the same job (they were relabelled with the new settings)
    for key, value in (("steps", args.steps), ("eval_every", args.eval_every), ("batch", args.batch)):
        if result.get(key, value) != value:
            _refuse(f"--{key.replace('_', '-')}: {path} holds runs of --{key.replace('_', '-')} {result[key]} (not "
                    f"{value}); use another --out")
    os.makedirs(args.out, exist_ok=True)
    job = job_kwargs(args.layout, args.out)
    result.update(layout=args.layout, steps=args.steps, eval_every=args.eval_every, batch=args.batch, lr=job["lr"])
    machine = this_machine()
    if args.layout == "deberta":
        result["config"] = deberta_tiny_config().to_dict()
    for side in sorted(set(sides), key=SIDES.index):
        for seed in seeds:
            runs = result["runs"].setdefault(side, {})
            if runs.get(str(seed)):
                continue
            t0 = time.perf_counter()
            if side.startswith("fused"):
                curve = train_fused(os.path.join(args.out, f"run-{side}-{seed}"), seed, args.steps, args.eval_every,
                                    side.split("_")[1], job, args.batch)
            else:
                curve = train_independent(os.path.join(args.out, f"run-fused_fp32-{seed}"), seed, args.steps,
                                          args.eval_every, args.batch, job["lr"])
            runs[str(seed)] = curve
            result.setdefault("seconds", {})[f"{side}-{seed}"] = round(time.perf_counter() - t0, 1)
            record_machine(result, f"{side}-{seed}", machine)
            json.dump(result, open(path, "w"), indent=1)
    warm = min(10_000, args.steps // 10)
    result["verdict"], result["points"] = judge(result["runs"], warm)
    json.dump(result, open(path, "w"), indent=1)
    plot(result, os.path.join(args.out, "parity.png"))
    for name, pt in result["points"].items():
        if pt["agree"] is None:
            print(f"{name}: no verdict: {pt['no_verdict']}")
            continue
        rev = pt["reverse"]
        print(f"{name}: {pt['outside']}/{pt['checked']} points outside the band ({pt['above']} above, "
              f"{pt['below']} below; identical implementations: <= {pt['allowed']} in 95 % of reports, p = "
              f"{pt['chance_outside_per_point']:.3f} per point), reverse {rev['outside']}/{rev['checked']} (<= "
              f"{rev['allowed']}, p = {rev['chance_outside_per_point']:.3f}) -> {'agree' if pt['agree'] else 'DIFFER'}")


def judge(runs: dict, warm: int):
    """(verdict: comparison -> seed -> the points outside, points: comparison -> counts and ``agree``), the
    module docstring's criterion, for every comparison whose two sides have runs. Each direction is judged with its
    own band's size (its chance per point and its point count); a side with fewer than :data:`MIN_BAND` runs spans
    no band (width 0: ``chance_outside(1)`` is 1, any gap would pass), so that comparison gets ``agree`` None and
    ``no_verdict`` saying why."""
    verdict, points = {}, {}
    comparisons = [("fused_fp32 vs independent", "fused_fp32", "independent")]
    comparisons += [(f"{low} vs fused_fp32", low, "fused_fp32") for low in ("fused_bf16", "fused_fp16")]
    for name, side, ref in comparisons:
        if not runs.get(side) or not runs.get(ref):
            continue
        few = [f"{s} has {len(runs[s])} run" + ("s" if len(runs[s]) != 1 else "") for s in (side, ref)
               if len(runs[s]) < MIN_BAND]
        if few:
            points[name] = {"agree": None, "no_verdict": f"{', '.join(few)}: a band needs at least {MIN_BAND} seeds "
                                                         "per side (--seeds)"}
            continue
        band, reverse_band = bands(list(runs[ref].values())), bands(list(runs[side].values()))
        verdict[name] = {s: inside(c, band, warm) for s, c in runs[side].items()}
        reverse = {s: inside(c, reverse_band, warm) for s, c in runs[ref].items()}
        forward, backward = count(verdict[name], runs[side], warm), count(reverse, runs[ref], warm)
        for counts, n_band in ((forward, len(runs[ref])), (backward, len(runs[side]))):
            p = chance_outside(n_band)
            counts.update(chance_outside_per_point=round(p, 4), allowed=allowed_outside(counts["checked"], p))
        points[name] = {**forward, "reverse": backward,
                        "agree": bool(forward["outside"] <= forward["allowed"]
                                      and backward["outside"] <= backward["allowed"])}
    return verdict, points


if __name__ == "__main__":
    main()
