"""Fine-tuning and downstream evaluation (``electra-fast finetune``): tasks, data, metrics, the ELECTRA recipe.
Light to import (the command line registers its parser from here): torch loads with :func:`finetune`."""


def __getattr__(name):
    if name == "finetune":
        from .trainer import finetune
        return finetune
    if name == "FinetuneError":
        from .errors import FinetuneError
        return FinetuneError
    raise AttributeError(f"module 'electra_fast.finetune' has no attribute {name!r}")


__all__ = ["FinetuneError", "finetune"]


def __dir__():
    # the names __getattr__ loads on first use, for tab completion and dir()
    return sorted(set(globals()) | set(__all__))
