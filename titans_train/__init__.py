"""titans-train: pretraining Titans language models at scale."""

import importlib.util
import os
import sys

__version__ = "0.1.0"


def _unshadow_checkout_root() -> None:
    """Takes a source checkout's root off sys.path (`python -m`, `-c` and pytest put the working
    directory there).

    The checkout's top-level `kernels/`, `data/` and `parallel/` folders are installed as
    `titans_train.*` (DESIGN section 2), but from the root they also import as top-level packages:
    `kernels/` then shadows the Hugging Face `kernels` package that transformers imports, and
    `titans_train.hf` fails with "cannot import name 'CUDAProperties' from 'kernels'". Nothing is
    meant to be imported from the root itself: `titans_train` is already imported, and its
    subpackages are found through the install's mapping, not through sys.path.
    """
    spec = importlib.util.find_spec("titans_train.kernels")
    if spec is None or spec.origin is None:
        return
    checkout_root = os.path.dirname(os.path.dirname(os.path.realpath(spec.origin)))
    if os.path.dirname(os.path.realpath(__file__)) != os.path.join(checkout_root, "titans_train"):
        return  # installed, not editable: kernels/ sits inside titans_train/ and shadows nothing
    sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != checkout_root]


_unshadow_checkout_root()
