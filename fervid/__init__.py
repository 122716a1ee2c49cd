"""fervid: batch video emotion analytics.

The subpackages `fervid.model`, `fervid.worker` and `fervid.training` live in the checkout's top-level folders
`model/`, `worker/` and `training/` (pyproject.toml maps them in a wheel or an editable install). Run from a
source checkout that was never installed (a GPU machine given only the tree), they are found beside this folder.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).resolve().parent / "model").is_dir() and (_checkout / "model" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821 - the package's own search path
