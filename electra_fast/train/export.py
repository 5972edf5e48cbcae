"""``electra-fast export CHECKPOINT OUT_DIR``: transformers-format ``generator/`` and ``discriminator/``
directories (weights, config, tokenizer) that ``AutoModelForMaskedLM`` / ``AutoModelForPreTraining`` and
``AutoTokenizer`` load. Written whole or not at all (:func:`electra_fast._files.write_directory`): never over
existing files; a killed export's leftovers go at the next one."""
from __future__ import annotations

import os

from .. import _files
from . import checkpoint as ckpt
from . import rundir
from .errors import PretrainError
from .tokenizer import load_tokenizer, save_for_transformers

INNER = ".export.tmp"  # the temporary inside an empty OUT_DIR that a new folder cannot replace (a link, a mount)


def export(checkpoint: str, out_dir: str, warn=print) -> str:
    """``checkpoint``: a checkpoint directory or a run's ``--out`` (its newest complete checkpoint)."""
    from ..models import ElectraPretrainingModel, interop
    src = ckpt.resolve(checkpoint, warn)
    _clean_run(src)
    out_dir = os.fspath(out_dir)
    if not out_dir.strip():
        raise PretrainError("export: OUT_DIR is empty; name a new or empty directory")
    # "a/" names a as a directory: lexists("file/") is False, and basename("a/") is "" (the temporary's name)
    out_dir = out_dir.rstrip(os.sep + (os.altsep or "")) or out_dir
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        what = "is a file" if os.path.isfile(out_dir) else "exists and is not a directory"
        raise PretrainError(f"export: {out_dir} {what}; choose a new directory")
    _files.remove_dead_writes(out_dir, INNER)  # a killed export's, beside a new OUT_DIR or inside an empty one
    if os.path.isdir(out_dir) and not rundir.is_vacant(out_dir):
        raise PretrainError(f"export: {out_dir} already exists and is not empty; choose another directory")
    problem = _files.creatable_dir(out_dir)
    if problem:
        raise PretrainError(f"export: cannot create {out_dir}: {problem}")
    inside = ckpt.inside_checkpoint(out_dir)
    if inside:
        raise PretrainError(f"export: {inside}")
    cfg = ckpt.load_config(src)
    if cfg.enhanced_mask_decoder:
        warn("export: note: the generator uses DeBERTa's Enhanced Mask Decoder, which transformers' "
             "DebertaV2ForMaskedLM does not have: loaded there, its MLM logits differ from electra_fast's (the "
             "discriminator's are the same); ElectraPretrainingModel.from_pretrained reads it back with its EMD")
    model = ElectraPretrainingModel(cfg)
    ckpt.load_model_state(model, os.path.join(src, "model.safetensors"))
    tok = load_tokenizer(os.path.join(src, "tokenizer.json"))

    def write(tmp: str) -> None:
        interop.write_pretrained(model, tmp)
        for role in ("generator", "discriminator"):
            save_for_transformers(tok, os.path.join(tmp, role), cfg.max_position_embeddings)

    _files.write_directory(out_dir, write, inner=INNER)
    return out_dir


def _clean_run(src: str) -> None:
    """The temporaries a killed job left in the run that checkpoint ``src`` is in (:func:`rundir.clean_if_idle`):
    export is often the last command a finished run sees."""
    up = os.path.dirname(os.path.abspath(src))
    run = os.path.dirname(up)
    if os.path.basename(up) == "checkpoints" and any(os.path.isfile(os.path.join(run, n)) for n in ckpt.RUN_FILES):
        rundir.clean_if_idle(run)
