"""Does a pretrained discriminator know anything a task needs? Two probes that fine-tune nothing (#18 diagnostics).

  swap    the RTD head zero-shot: each sentence scored by its largest per-token "replaced" logit; ROC AUC of that
          score for label-0 rows (two words swapped) against label-1 rows. 0.5 = the head does not see the swaps.
  linear  frozen encoder, logistic regression (L-BFGS, L2 chosen on dev from 1e-4 / 1e-3 / 1e-2) on the first
          token's and on the mean-pooled last hidden state, pretrained weights vs the same architecture randomly
          initialised (torch seed 1). Pretrained features no better than random ones = nothing to fine-tune from.
  mlm     the generator on held-out text: 15 % of the tokens (seeded) become [MASK]; accuracy and mean log-probability
          of the original token at those positions, with the context as written and with the unmasked tokens of each
          row shuffled (the masks stay in place), next to the unigram log-probability of the run's own training
          tokens. A generator that reads word order loses accuracy when its context is shuffled; one that matches the
          unigram baseline has not learned to use its context at all, so its samples carry no signal about order.

Usage (from any directory but the repository root):
    python tools/finetune_probes.py swap RUN DEV.tsv
    python tools/finetune_probes.py linear RUN TASK_DIR      (TASK_DIR holds the demo's train.tsv and dev.tsv)
    python tools/finetune_probes.py mlm RUN TEXT [--seq-len T]  (TEXT: one document per line, not trained on)
RUN: a pretraining run or checkpoint directory (linear also reads an ``electra-fast export`` or a fine-tuning run's
export/). The TSVs are the demo's (``sentence<TAB>label``, labels 0 / 1 or rotten / fresh, both classes present).
Prints one line per probe.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Tuple

import torch
import torch.nn.functional as F

LABELS = {"0": 0, "1": 1, "rotten": 0, "fresh": 1}  # the demo's two tasks; 1 / fresh is the positive class
DATA = {"swap": "a dev TSV", "linear": "a directory with train.tsv and dev.tsv", "mlm": "a text file"}


def _not_utf8(path: str, e: UnicodeDecodeError):
    from electra_fast.train import PretrainError
    return PretrainError(f"data: {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x}: {e.reason})")


def read_tsv(path: str) -> Tuple[List[str], torch.Tensor]:
    """(sentences, labels int [N]: 1 for label 1 / fresh) of a TSV the demo wrote."""
    from electra_fast.finetune.demo import read_split
    from electra_fast.train import PretrainError

    try:
        rows = read_split(path)
    except StopIteration:  # not even the header line
        raise PretrainError(f"{path}: empty; expected the demo's sentence<TAB>label TSV") from None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    bad = next((i for i, row in enumerate(rows, 2) if len(row) != 2), None)
    if bad is not None:
        raise PretrainError(f"{path}: line {bad} is not sentence<TAB>label")
    if not rows:
        raise PretrainError(f"{path}: no rows below the header")
    empty = next((i for i, (t, _) in enumerate(rows, 2) if not t.strip()), None)
    if empty is not None:  # [CLS] [SEP] alone: no token to probe (a max() over nothing was a traceback)
        raise PretrainError(f"{path}: line {empty}: the sentence is empty")
    # an unknown label read as class 0 made a pos / neg file one class: a trivially perfect probe
    bad = next(((i, y) for i, (_, y) in enumerate(rows, 2) if y not in LABELS), None)
    if bad is not None:
        raise PretrainError(f"{path}: line {bad[0]}: label {bad[1]!r}; expected 0 / 1 or rotten / fresh")
    labels = torch.tensor([LABELS[y] for _, y in rows])
    if labels.min() == labels.max():  # nothing to separate: accuracy is trivial and the AUC undefined
        raise PretrainError(f"{path}: every row has label {rows[0][1]!r}; expected rows of both classes")
    return [t for t, _ in rows], labels


def _load_run(run: str):
    """(checkpoint directory, config, ElectraPretrainingModel in eval mode, tokenizer) of a run or checkpoint."""
    from tokenizers import Tokenizer

    from electra_fast.models import ElectraPretrainingModel
    from electra_fast.train import checkpoint as ckpt

    src = ckpt.resolve(run, warn=lambda m: None)
    cfg = ckpt.load_config(src)
    model = ElectraPretrainingModel(cfg)
    ckpt.load_model_state(model, os.path.join(src, "model.safetensors"))
    return src, cfg, model.eval(), Tokenizer.from_file(os.path.join(src, "tokenizer.json"))


def swap_probe(run: str, dev: str) -> float:
    from electra_fast.train import PretrainError
    texts, labels = read_tsv(dev)  # before the model: bad data is said at once
    _, _, model, tok = _load_run(run)
    tok.enable_truncation(128)
    scores = []
    with torch.no_grad():
        for line, text in enumerate(texts, 2):
            ids = tok.encode(text).ids
            if len(ids) <= 2:  # the normaliser removed it all (a zero-width space): no token to score
                raise PretrainError(f"{dev}: line {line}: the sentence has no token the model reads")
            logits = model.discriminator(torch.tensor([ids]))[0]
            scores.append(float(logits[1:-1].max()))  # [CLS] and [SEP] are never replaced
    from electra_fast.train.metrics import roc_auc
    if not all(math.isfinite(x) for x in scores):  # roc_auc's ValueError on NaN was a traceback
        raise PretrainError(f"run: {run}'s discriminator gives logits that are not finite (NaN or inf): its weights "
                            "are not usable")
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
    from electra_fast.finetune import model as fmodel
    from electra_fast.train import PretrainError
    from electra_fast.train.tokenizer import load_tokenizer, with_special_tokens

    train, y_train = read_tsv(os.path.join(task_dir, "train.tsv"))
    dev, y_dev = read_tsv(os.path.join(task_dir, "dev.tsv"))
    cfg, state, tok_path = fmodel.load_encoder(run)
    try:  # as fine-tuning reads it: an export's tokenizer is a folder
        tok = with_special_tokens(load_tokenizer(tok_path))
    except PretrainError as e:  # the model's own tokenizer: there is no --tokenizer to name
        raise PretrainError(f"run: {str(e).removeprefix('--tokenizer: ')}") from None
    tok.enable_truncation(128)
    out = {}
    for init, weights in (("pretrained", state), ("random init", None)):
        torch.manual_seed(1)
        net = fmodel.build(cfg, weights, "classification", 2, run).eval()
        (f_train, m_train), (f_dev, m_dev) = (_features(net.backbone, tok, x, cfg.pad_token_id) for x in (train, dev))
        out[init] = {"first token": _logistic(f_train, y_train, f_dev, y_dev),
                     "mean-pooled": _logistic(m_train, y_train, m_dev, y_dev)}
    return out


def shuffle_context(ids: torch.Tensor, masked: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """ids int [B, T] with [CLS] first and [SEP] last; masked bool [B, T]. Each row's unmasked tokens between [CLS]
    and [SEP] permuted among their own positions; masked positions, [CLS] and [SEP] stay where they are."""
    out = ids.clone()
    for r in range(len(ids)):
        keep = (~masked[r]).nonzero().flatten()
        keep = keep[(keep > 0) & (keep < ids.shape[1] - 1)]
        out[r, keep] = ids[r, keep[torch.randperm(len(keep), generator=gen)]]
    return out


def _unigram_logp(src: str, targets: torch.Tensor, vocab: int) -> float:
    """Mean log-probability of ``targets`` under the unigram distribution of the run's token cache (add-1/2
    smoothing), or nan when the cache is not beside the checkpoint. A cache holding several tokenisations (the
    inputs changed between runs in one directory) is read through the one whose inputs run.json names."""
    import glob
    import json

    import numpy as np

    from electra_fast.train.data import ID_BITS

    def inputs(path):
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f).get("inputs")
        except (OSError, ValueError):
            return None

    for root in (src, os.path.dirname(os.path.dirname(src))):  # a run directory, or RUN/checkpoints/step-N
        found = sorted(glob.glob(os.path.join(root, "cache", "tokens-*.bin")))
        if len(found) > 1:
            run_inputs = inputs(os.path.join(root, "run.json"))
            found = [f for f in found if run_inputs is not None and inputs(f + ".json") == run_inputs]
        if len(found) == 1:
            ids = np.fromfile(found[0], dtype="<u4") & ID_BITS  # the high bit marks word starts
            counts = torch.from_numpy(np.bincount(ids, minlength=vocab)[:vocab].astype(np.float64)) + 0.5
            return float((counts / counts.sum()).log()[targets].mean())
    return float("nan")


def mlm_probe(run: str, text: str, seq_len: int = 128, rows: int = 64) -> dict:
    """{"original" | "shuffled": {"accuracy", "logp"}, "unigram logp", "masked"} of the generator on ``text``."""
    from electra_fast.train import PretrainError
    from electra_fast.train.options import check_seq_len, positive
    from electra_fast.train.tokenizer import encode_documents

    positive("seq-len", seq_len, 3)  # [CLS], [SEP] and a token to mask
    src, cfg, model, tok = _load_run(run)
    check_seq_len(seq_len, cfg)
    stream: List[int] = []
    try:
        with open(text, encoding="utf-8") as f:
            # as pretraining reads text (a spelled "[SEP]" is text, not the separator the rows add)
            for ids, _ in encode_documents(tok, (line.strip() for line in f if line.strip())):
                if len(stream) >= rows * seq_len:
                    break
                stream += ids
    except UnicodeDecodeError as e:
        raise _not_utf8(text, e) from None
    body = seq_len - 2
    n = min(rows, len(stream) // body)
    if n == 0:
        raise PretrainError(f"{text}: expected at least {body} tokens of text (--seq-len {seq_len}), got "
                            f"{len(stream)}")
    x = torch.tensor(stream[:n * body]).view(n, body)
    x = torch.cat([torch.full((n, 1), cfg.cls_token_id), x, torch.full((n, 1), cfg.sep_token_id)], 1)
    gen = torch.Generator().manual_seed(0)
    masked = torch.rand(x.shape, generator=gen) < 0.15
    masked[:, 0] = masked[:, -1] = False
    inp = x.masked_fill(masked, cfg.mask_token_id)
    targets = x[masked]
    out = {"masked": int(masked.sum()), "unigram logp": _unigram_logp(src, targets, cfg.vocab_size)}
    for kind, ids in (("original", inp), ("shuffled", shuffle_context(inp, masked, gen))):
        with torch.no_grad():
            logp = model.generator.logits(ids).float().log_softmax(-1)[masked]
        out[kind] = {"accuracy": float((logp.argmax(-1) == targets).float().mean()),
                     "logp": float(logp.gather(1, targets[:, None]).mean())}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("probe", choices=("swap", "linear", "mlm"))
    p.add_argument("run")
    p.add_argument("data", help="; ".join(f"{k}: {v}" for k, v in DATA.items()))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128, help="mlm: tokens per row, [CLS] and [SEP] included")
    args = p.parse_args()
    from electra_fast.train import PretrainError
    from electra_fast.train.options import positive

    try:
        positive("threads", args.threads)
        # the data before the model: a wrong path is said at once, not after loading a checkpoint
        files = [os.path.join(args.data, f) for f in ("train.tsv", "dev.tsv")] if args.probe == "linear" else [args.data]
        for f in files:
            if not os.path.isfile(f):
                raise PretrainError(f"data: no such file: {f} ({args.probe} reads {DATA[args.probe]})")
        torch.set_num_threads(args.threads)
        run(args)
    except (PretrainError, OSError, UnicodeError) as e:  # bad input (FinetuneError is one): one line, no traceback
        print(f"finetune_probes: error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args) -> None:
    if args.probe == "swap":
        print(f"{args.run}: swap AUC (largest replaced-logit) {swap_probe(args.run, args.data):.3f}")
    elif args.probe == "mlm":
        r = mlm_probe(args.run, args.data, args.seq_len)
        print(f"{args.run}: generator at {r['masked']} [MASK] positions: accuracy {r['original']['accuracy']:.3f}, "
              f"logp {r['original']['logp']:.3f}; context shuffled: {r['shuffled']['accuracy']:.3f}, "
              f"{r['shuffled']['logp']:.3f}; unigram logp {r['unigram logp']:.3f}")
    else:
        for init, acc in linear_probe(args.run, args.data).items():
            print(f"{args.run}: {init}: dev accuracy of a linear probe on the first token {acc['first token']:.3f}, "
                  f"mean-pooled {acc['mean-pooled']:.3f}")


if __name__ == "__main__":
    main()
