"""The test suite. The repository's ``kernels/`` directory (installed as ``megavlm.kernels``)
would shadow the ``kernels`` package transformers imports whenever the repository root is on
``sys.path`` (pytest puts it there; the torchrun workers too): the installed one is imported
first, so ``import kernels`` always finds it."""
import importlib
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _import_installed_kernels() -> None:
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]
    try:
        importlib.import_module("kernels")
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


if "kernels" not in sys.modules:
    _import_installed_kernels()
