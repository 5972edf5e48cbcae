"""Parity report (#19): the default pretraining job, electra_fast's fused model vs ELECTRA written here on transformers.

Both sides train the default job's configuration (electra-tiny, temperature 3, the embedded corpus, batch 16 x 128,
lr 1e-3 with 10 % warm-up then linear decay, AdamW(0.9, 0.999, 1e-6), weight decay 0.01 off LayerNorm / biases, clip
1.0, loss = MLM + 50 RTD) from the same initial weights, on the same packed sequences in the same order (the run's
own token cache, held-out split and sampler: the data is the only thing taken from electra_fast), with their own
randomness:
  fused        ``electra-fast pretrain --seed S --precision fp32 --eval-every E`` (and ``--precision bf16``)
  independent  transformers' ElectraForMaskedLM (generator) + ElectraForPreTraining (discriminator), embeddings
               shared; ELECTRA's masking written here from google-research/electra pretrain_helpers.py (n =
               max(1, min(N, round(0.15 n_real))) of the non-special real tokens, 85 % [MASK], 15 % kept), Gumbel
               samples from the full generator logits / temperature (special ids excluded, as the fused job's
               config says), binary cross-entropy over every real token, torch's RNG seeded with S.
Held-out metrics every E steps on the same held-out sequences, each side with its own fixed masking seed.

Criterion: at every evaluation step after warm-up, each fused run's held-out AUC, F1 and generator accuracy lie inside
the band the independent seeds span, widened by that band's width (max - min) on each side (the run-to-run spread
measured across the independent seeds); bf16 vs fp32 the same with the fp32 fused seeds' band.

Usage (from any directory but the repository root; several minutes per run on 2 cores):
    python tools/parity_report.py --out bench/results/parity --seeds 0,1,2 [--steps 600 --eval-every 100]
writes parity.json (every curve, the bands and the verdict) and parity.png into --out.
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


def _mask(ids: torch.Tensor, special: torch.Tensor, mask_id: int, g: torch.Generator):
    """google-research/electra's mask(): per row, n positions among the non-special tokens; 85 % [MASK], 15 % kept."""
    B, T = ids.shape
    cand = ~torch.isin(ids, special)
    n_max = int((0.15 + 0.005) * T)
    selected = torch.zeros_like(cand)
    for b in range(B):
        idx = cand[b].nonzero().flatten()
        n = min(len(idx), max(1, min(n_max, int(round(T * 0.15)))))  # every token of a packed row is real
        pick = idx[torch.randperm(len(idx), generator=g)[:n]]
        selected[b, pick] = True
    to_mask = selected & (torch.rand(B, T, generator=g) < 0.85)
    return torch.where(to_mask, torch.full_like(ids, mask_id), ids), selected


class Independent:
    def __init__(self, run_dir: str, seed: int):
        import transformers

        from electra_fast.models import ElectraPretrainingModel
        from electra_fast.models.interop import export_state, transformers_config

        from electra_fast.train import checkpoint
        ckpts = os.path.join(run_dir, "checkpoints")
        cfg = checkpoint.load_config(os.path.join(ckpts, sorted(os.listdir(ckpts))[-1]))
        torch.manual_seed(seed)  # the fused job's initial weights for this seed (the job seeds the same way)
        init = ElectraPretrainingModel(cfg)
        parts = []
        for role, cls in (("generator", transformers.ElectraForMaskedLM),
                          ("discriminator", transformers.ElectraForPreTraining)):
            hf = dict(transformers_config(cfg, role))
            hf.pop("architectures", None)
            model = cls(transformers.ElectraConfig(**hf))
            model.load_state_dict(export_state(init, role), strict=False)
            parts.append(model.train())
        self.gen, self.disc = parts
        self.disc.electra.embeddings = self.gen.electra.embeddings  # ELECTRA ties the embedding layer
        self.cfg = cfg
        self.special = torch.tensor(sorted(cfg.disallowed_sample_ids), dtype=torch.long)
        self.params = list({id(p): p for m in (self.gen, self.disc) for p in m.parameters()}.values())

    def losses(self, ids: torch.Tensor, g: torch.Generator):
        cfg = self.cfg
        masked, selected = _mask(ids, self.special, cfg.mask_token_id, g)
        logits = self.gen(input_ids=masked).logits[selected]  # [n_sel, V]
        mlm = F.cross_entropy(logits, ids[selected])
        with torch.no_grad():
            z = logits.float() / cfg.temperature
            z[:, self.special] = -math.inf
            u = torch.rand(z.shape, generator=g).clamp_min(1e-20)
            sample = torch.argmax(z - torch.log(-torch.log(u)), dim=-1)
        corrupted = ids.clone()
        corrupted[selected] = sample
        labels = (corrupted != ids).float()
        d = self.disc(input_ids=corrupted).logits
        rtd = F.binary_cross_entropy_with_logits(d, labels)
        gen_acc = (logits.argmax(-1) == ids[selected]).float().mean()
        return mlm + cfg.disc_weight * rtd, d.detach(), labels, gen_acc.detach(), selected.sum()


def _evaluate(model: Independent, batches, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    model.gen.eval(), model.disc.eval()
    scores, labels, correct, total = [], [], 0.0, 0
    with torch.no_grad():
        for ids in batches:
            _, d, lab, acc, n = model.losses(ids, g)
            scores.append(d.flatten()), labels.append(lab.flatten())
            correct += float(acc) * int(n)
            total += int(n)
    model.gen.train(), model.disc.train()
    s, lab = torch.cat(scores), torch.cat(labels)
    pred = s > 0
    tp = float((pred & lab.bool()).sum())
    precision = tp / max(1.0, float(pred.sum()))
    recall = tp / max(1.0, float(lab.sum()))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"eval_discriminator_auc": _auc(s, lab), "eval_discriminator_f1": f1,
            "eval_generator_accuracy": correct / max(1, total)}


def train_independent(run_dir: str, seed: int, steps: int, eval_every: int, batch: int) -> list:
    from electra_fast.train import data as data_mod
    from electra_fast.train.evaluation import SplitSampler, heldout_count, split
    from electra_fast.train.optim import linear_schedule, param_groups

    run = json.load(open(os.path.join(run_dir, "run.json")))
    stream = [os.path.join(run_dir, "cache", f) for f in os.listdir(os.path.join(run_dir, "cache"))
              if f.startswith("tokens-") and f.endswith(".bin")][0]
    model = Independent(run_dir, seed)
    cfg = model.cfg
    packed = data_mod.PackedSequences(stream, run.get("seq_len", 128), cfg.cls_token_id, cfg.sep_token_id)
    held_ids, train_ids = split(len(packed), heldout_count(len(packed)))
    sampler = SplitSampler(train_ids, seed)  # the fused job's order for this seed
    held = [packed.batch(list(held_ids[i:i + batch])) for i in range(0, len(held_ids), batch)]
    groups = []
    for m in (model.gen, model.disc):
        for grp in param_groups(m, 0.01):
            groups.append(grp)
    seen, dedup = set(), []
    for grp in groups:  # the shared embeddings belong to one group only
        ps = [p for p in grp["params"] if id(p) not in seen]
        seen.update(id(p) for p in ps)
        if ps:
            dedup.append({"params": ps, "weight_decay": grp["weight_decay"]})
    opt = torch.optim.AdamW(dedup, lr=1e-3, betas=(0.9, 0.999), eps=1e-6)
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
            rec = {"step": step, "loss": float(loss), **_evaluate(model, held, 0x4556414C)}
            curve.append(rec)
            print(f"independent seed {seed} step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in rec.items()
                                                                     if k != "step")
                  + f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return curve


# ------------------------------------------------------------------------------------------ the fused side
def train_fused(out: str, seed: int, steps: int, eval_every: int, precision: str) -> list:
    import electra_fast

    if not os.path.exists(os.path.join(out, "checkpoints", f"step-{steps:08d}")):  # else: read the finished run
        electra_fast.pretrain(out=out, seed=seed, steps=steps, eval_every=eval_every, precision=precision,
                              progress=False)
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{"step": r["step"], "loss": r.get("loss"), **{k: r[k] for k in METRICS}} for r in recs
            if METRICS[0] in r]


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


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    colors = {"independent": "tab:gray", "fused_fp32": "tab:blue", "fused_bf16": "tab:orange"}
    for ax, k in zip(axes, METRICS):
        for side, runs in result["runs"].items():
            for seed, curve in runs.items():
                ax.plot([r["step"] for r in curve], [r[k] for r in curve], color=colors[side], alpha=0.8,
                        label=f"{side} seed {seed}")
        ax.set_title(k.replace("eval_", "held-out "))
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--sides", default="fused_fp32,independent,fused_bf16")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    path = os.path.join(args.out, "parity.json")
    result = json.load(open(path)) if os.path.exists(path) else {"runs": {}}
    result.update(steps=args.steps, eval_every=args.eval_every, batch=args.batch,
                  cpu=open("/proc/cpuinfo").read().split("model name")[1].split(":")[1].split("\n")[0].strip(),
                  torch=torch.__version__, threads=torch.get_num_threads())
    for side in args.sides.split(","):
        for seed in seeds:
            runs = result["runs"].setdefault(side, {})
            if runs.get(str(seed)):
                continue
            t0 = time.perf_counter()
            if side.startswith("fused"):
                curve = train_fused(os.path.join(args.out, f"run-{side}-{seed}"), seed, args.steps, args.eval_every,
                                    side.split("_")[1])
            else:
                curve = train_independent(os.path.join(args.out, f"run-fused_fp32-{seed}"), seed, args.steps,
                                          args.eval_every, args.batch)
            runs[str(seed)] = curve
            result.setdefault("seconds", {})[f"{side}-{seed}"] = round(time.perf_counter() - t0, 1)
            json.dump(result, open(path, "w"), indent=1)
    warm = min(10_000, args.steps // 10)
    verdict = {}
    if "independent" in result["runs"]:
        band = bands(list(result["runs"]["independent"].values()))
        verdict["fused_fp32 vs independent"] = {s: inside(c, band, warm)
                                                for s, c in result["runs"].get("fused_fp32", {}).items()}
    if "fused_fp32" in result["runs"]:
        band = bands(list(result["runs"]["fused_fp32"].values()))
        verdict["fused_bf16 vs fused_fp32"] = {s: inside(c, band, warm)
                                               for s, c in result["runs"].get("fused_bf16", {}).items()}
    result["verdict"] = verdict
    json.dump(result, open(path, "w"), indent=1)
    plot(result, os.path.join(args.out, "parity.png"))
    for name, per_seed in verdict.items():
        n = sum(len(v) for v in per_seed.values())
        print(f"{name}: {'within the spread' if n == 0 else f'{n} point(s) outside'} {per_seed if n else ''}")


if __name__ == "__main__":
    main()
