"""The exception fine-tuning raises for the user (bad file, column, label, model directory): the CLI prints its
message on one line. A :class:`PretrainError`, so the commands share one way of reporting."""
from ..train.errors import PretrainError


class FinetuneError(PretrainError):
    """A user-facing fine-tuning problem: message only, no traceback."""
