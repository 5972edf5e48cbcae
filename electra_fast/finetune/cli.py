"""``electra-fast finetune``: argument parsing (the shared one-line error handling is ``train.cli.guard``)."""
from __future__ import annotations

from .._console import show
from ..train.cli import Defaults
from .data import TASKS


def add_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pretrained discriminator on a classification, regression or "
                                        "token-classification task and evaluate it",
                       formatter_class=Defaults)
    p.add_argument("--model", required=True, metavar="PATH", help="an electra-fast checkpoint, run directory or "
                   "export, or a local transformers ELECTRA / DeBERTa-v2/v3 / BERT / RoBERTa directory")
    p.add_argument("--train", required=True, metavar="FILE", help=".csv / .tsv (header row) / .jsonl, or a datasets "
                   "save_to_disk folder")
    p.add_argument("--validation", required=True, metavar="FILE", help="same format; picks each seed's best epoch")
    p.add_argument("--test", metavar="FILE", help="same format, labels optional: predictions-test.tsv (and scores "
                   "when every row has a label)")
    p.add_argument("--out", required=True, help="a new or empty directory")
    p.add_argument("--task", choices=TASKS, default="classification")
    g = p.add_argument_group("columns", "names, or 0-based indices (all of them) for a file without a header")
    g.add_argument("--text-column", default=None, help="default: sentence, text, sentence1 or question")
    g.add_argument("--pair-column", default=None, help="the second sentence of a pair (default: sentence2 next to "
                                                       "sentence1)")
    g.add_argument("--label-column", default="label")
    g.add_argument("--tokens-column", default=None, help="token classification: the words (default: tokens)")
    g.add_argument("--tags-column", default=None, help="token classification: one tag per word (default: tags)")
    p.add_argument("--max-len", type=int, default=None, help="tokens per example, [CLS] and [SEP] included "
                   "(default: 128, or the model's maximum if smaller)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of the task head (ELECTRA: 3e-4 small, "
                   "1e-4 base, 5e-5 large)")
    p.add_argument("--layer-decay", type=float, default=0.8, help="layer-wise learning-rate decay (ELECTRA: 0.8 "
                   "small / base, 0.9 large)")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--sift", type=float, nargs="?", const=1.0, default=0.0, metavar="WEIGHT",
                   help="DeBERTa's scale-invariant fine-tuning: adversarial loss on the normalised embeddings, with "
                        "this weight (--sift alone: 1.0; 0: off)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="one run per seed; median and spread reported")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bf16 autocast where the CPU / GPU multiplies bf16 natively, else fp32")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--from-scratch", action="store_true", help="the same architecture and tokenizer, randomly "
                   "initialised: the baseline that shows what pretraining bought")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (same options) from each "
                   "seed's last evaluated epoch")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip rows that cannot be read (counted) instead "
                                                                 "of stopping at the first")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def run(args) -> int:
    from .trainer import finetune

    summary = finetune(args.model, args.train, args.validation, out=args.out, test=args.test, task=args.task,
                       text_column=args.text_column, pair_column=args.pair_column, label_column=args.label_column,
                       tokens_column=args.tokens_column, tags_column=args.tags_column, max_len=args.max_len,
                       epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                       lr=args.lr, layer_decay=args.layer_decay, warmup=args.warmup, weight_decay=args.weight_decay,
                       seeds=args.seeds, sift=args.sift, precision=args.precision, device=args.device,
                       threads=args.threads, skip_bad_lines=args.skip_bad_lines, from_scratch=args.from_scratch,
                       resume=args.resume, progress=not args.no_progress)
    if "exported" in summary:
        show(f"export: {summary['exported']['dir']} (seed {summary['exported']['seed']})")
    show(f"summary: {args.out}/summary.json")
    return 130 if summary["interrupted"] else 0
