"""The exceptions the pretraining job raises for the user: the CLI prints their message on one line."""


class PretrainError(ValueError):
    """A user-facing problem (bad data, tokenizer, output directory, checkpoint): message only, no traceback."""


class InterruptedAgain(KeyboardInterrupt):
    """A second Ctrl-C before the first one's checkpoint was being written: the job stops without one."""
