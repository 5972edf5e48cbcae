"""The one exception type the pretraining job raises for bad input: the CLI prints its message on one line."""


class PretrainError(ValueError):
    """A user-facing problem (bad data, tokenizer, output directory, checkpoint): message only, no traceback."""
