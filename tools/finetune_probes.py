"""Does a pretrained discriminator know anything a task needs? Two probes that fine-tune nothing (#18 diagnostics).

  swap    the RTD head zero-shot: each sentence scored by its largest per-token "replaced" logit; ROC AUC of that
          score for label-0 rows (two words swapped) against label-1 rows. 0.5 = the head does not see the swaps.
  linear  frozen encoder, logistic regression (L-BFGS, L2 chosen on dev from 1e-4 / 1e-3 / 1e-2) on the first
          token's and on the mean-pooled last hidden state, pretrained weights vs the same architecture randomly
          initialised (torch seed 1). Pretrained features no better than random ones = nothing to fine-tune from.

Usage (from any directory but the repository root):
    python tools/finetune_probes.py swap RUN DEV.tsv
    python tools/finetune_probes.py linear RUN TASK_DIR      (TASK_DIR holds the demo's train.tsv and dev.tsv)
RUN: a pretraining run or checkpoint directory. The TSVs are the demo's (``sentence<TAB>label``; label 1 / fresh is
the positive class). Prints one line per probe.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Tuple

import torch
import torch.nn.functional as F

POSITIVE = ("1", "fresh")


def read_tsv(path: str) -> Tuple[List[str], torch.Tensor]:
    """(sentences, labels int [N]: 1 for label 1 / fresh) of a TSV the demo wrote."""
    from electra_fast.finetune.demo import read_split

    rows = read_split(path)
    return [t for t, _ in rows], torch.tensor([1 if y in POSITIVE else 0 for _, y in rows])


def swap_probe(run: str, dev: str) -> float:
    from tokenizers import Tokenizer

    from electra_fast.models import ElectraPretrainingModel
    from electra_fast.train import checkpoint as ckpt

    src = ckpt.resolve(run, warn=lambda m: None)
    model = ElectraPretrainingModel(ckpt.load_config(src))
    ckpt.load_model_state(model, os.path.join(src, "model.safetensors"))
    model.eval()
    tok = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    tok.enable_truncation(128)
    texts, labels = read_tsv(dev)
    scores = []
    with torch.no_grad():
        for text in texts:
            logits = model.discriminator(torch.tensor([tok.encode(text).ids]))[0]
            scores.append(float(logits[1:-1].max()))  # [CLS] and [SEP] are never replaced
    from electra_fast.train.metrics import roc_auc
    return roc_auc(torch.tensor(scores), labels == 0)  # swapped (label 0) is the "replaced" class


def _features(backbone, tok, texts: List[str], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(first token, mean over real tokens) of the last hidden state, each [N, H] fp32."""
    first, mean = [], []
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            encs = tok.encode_batch(texts[i:i + 64])
            T = max(len(e.ids) for e in encs)
            ids = torch.full((len(encs), T), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, e in enumerate(encs):
                ids[j, :len(e.ids)] = torch.tensor(e.ids)
                mask[j, :len(e.ids)] = 1
            h = backbone(ids, mask, torch.zeros_like(ids)).float()
            first.append(h[:, 0])
            mean.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(first), torch.cat(mean)


def _logistic(x_train, y_train, x_dev, y_dev) -> float:
    """Best dev accuracy of an L2-regularised logistic regression over three strengths (standardised features)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_dev = (x_train - mu) / sd, (x_dev - mu) / sd
    best = 0.0
    for l2 in (1e-4, 1e-3, 1e-2):
        w = torch.zeros(x_train.shape[1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(x_train @ w + b, y_train.float()) + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            best = max(best, float(((x_dev @ w + b > 0).long() == y_dev).float().mean()))
    return best


def linear_probe(run: str, task_dir: str) -> dict:
    from tokenizers import Tokenizer

    from electra_fast.finetune import model as fmodel

    cfg, state, tok_path = fmodel.load_encoder(run)
    tok = Tokenizer.from_file(tok_path)
    tok.enable_truncation(128)
    train, y_train = read_tsv(os.path.join(task_dir, "train.tsv"))
    dev, y_dev = read_tsv(os.path.join(task_dir, "dev.tsv"))
    out = {}
    for init, weights in (("pretrained", state), ("random init", None)):
        torch.manual_seed(1)
        net = fmodel.build(cfg, weights, "classification", 2, run).eval()
        (f_train, m_train), (f_dev, m_dev) = (_features(net.backbone, tok, x, cfg.pad_token_id) for x in (train, dev))
        out[init] = {"first token": _logistic(f_train, y_train, f_dev, y_dev),
                     "mean-pooled": _logistic(m_train, y_train, m_dev, y_dev)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("probe", choices=("swap", "linear"))
    p.add_argument("run")
    p.add_argument("data", help="swap: a dev TSV; linear: a directory with train.tsv and dev.tsv")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe == "swap":
        print(f"{args.run}: swap AUC (largest replaced-logit) {swap_probe(args.run, args.data):.3f}")
    else:
        for init, acc in linear_probe(args.run, args.data).items():
            print(f"{args.run}: {init}: dev accuracy of a linear probe on the first token {acc['first token']:.3f}, "
                  f"mean-pooled {acc['mean-pooled']:.3f}")


if __name__ == "__main__":
    main()
