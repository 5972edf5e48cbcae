"""``electra-fast export CHECKPOINT OUT_DIR``: transformers-format ``generator/`` and ``discriminator/``
directories (weights, config, tokenizer) that ``AutoModelForMaskedLM`` / ``AutoModelForPreTraining`` and
``AutoTokenizer`` load. Written to a temporary sibling directory, then renamed: never over existing files."""
from __future__ import annotations

import os
import re

from .. import _files
from . import checkpoint as ckpt
from . import rundir
from .errors import PretrainError
from .temporaries import remove_dead_temporaries
from .tokenizer import load_tokenizer, save_for_transformers


EXPORT_TEMPORARY = re.compile(r"^\.export\.tmp-(\d+)$")  # what an export writes inside an empty OUT_DIR


def export(checkpoint: str, out_dir: str, warn=print) -> str:
    """``checkpoint``: a checkpoint directory or a run's ``--out`` (its newest complete checkpoint)."""
    from ..models import ElectraPretrainingModel, interop
    src = ckpt.resolve(checkpoint, warn)
    out_dir = os.fspath(out_dir)
    if not out_dir.strip():
        raise PretrainError("export: OUT_DIR is empty; name a new or empty directory")
    # "a/" names a as a directory: lexists("file/") is False, and basename("a/") is "" (the temporary's name)
    out_dir = out_dir.rstrip(os.sep + (os.altsep or "")) or out_dir
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        what = "is a file" if os.path.isfile(out_dir) else "exists and is not a directory"
        raise PretrainError(f"export: {out_dir} {what}; choose a new directory")
    remove_dead_temporaries(out_dir, EXPORT_TEMPORARY)  # a killed export's, inside an empty OUT_DIR
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

    # inside an empty OUT_DIR a kill leaves .export.tmp-PID, which the next export removes
    _files.write_directory(out_dir, write, inner=".export.tmp")
    return out_dir

