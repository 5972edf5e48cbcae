"""electra_fast.kernels: the Triton kernels, one module per op (the ``kernels/`` room of DESIGN.md).

This folder sits at the top of the repository but is installed as ``electra_fast.kernels`` (pyproject.toml's
``package-dir``); it is never a top-level package. Python puts the working directory on ``sys.path`` for
``python -m ...``, ``python -c`` and notebooks, so from a checkout's root ``import kernels`` would find this folder
and shadow the PyPI package ``kernels`` (Hugging Face's kernel hub, which transformers imports). Loaded under that
name, this file therefore hands the import over to the real distribution - or, where none is installed, fails the
way a missing package does - and the project never imports ``kernels`` itself.
"""
if __name__ == "kernels":  # imported as a top-level module: only ever by accident, from a checkout's root
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or ".") != _here]
    _spec = _machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        del _sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (the checkout's kernels/ folder is "
                                  "electra_fast.kernels, not the PyPI package)", name="kernels")
    _real = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _real  # the import system returns what sys.modules holds after this file ran
    _spec.loader.exec_module(_real)
