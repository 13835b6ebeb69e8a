"""jaxemb: embedding-research systems in JAX/Flax, trained through one sharded training core."""
import importlib.util as _util
import os as _os
import sys as _sys

__version__ = "0.1.0"

# The Pallas kernels live in the top-level folder kernels/ of the repository and are installed as
# jaxemb.kernels (pyproject's package-dir), so the distribution takes no generic top-level name. In a source
# checkout (tests, `python -m experiments.<study>` from the repository root) this finder, consulted only
# after the normal ones, maps jaxemb.kernels to that folder.
_KERNELS = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")


class _SourceKernels:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "jaxemb.kernels" or not _os.path.isfile(_os.path.join(_KERNELS, "__init__.py")):
            return None
        return _util.spec_from_file_location(name, _os.path.join(_KERNELS, "__init__.py"),
                                             submodule_search_locations=[_KERNELS])


if not any(f is _SourceKernels or type(f).__name__ == "_SourceKernels" for f in _sys.meta_path):
    _sys.meta_path.append(_SourceKernels)
