"""Files in and out: model files (safetensors + JSON, never unpickled), atomic writes, image input.

``atomic``, ``images`` and ``tensors`` are torch-free (the ONNX runtime uses them); ``model_file`` needs torch and is
imported on first use.
"""

from .atomic import PathLike, atomic_write

_LAZY = {"FORMAT_VERSION", "ModelFileError", "read_model_file", "write_model_file"}

__all__ = ["FORMAT_VERSION", "ModelFileError", "PathLike", "atomic_write", "read_model_file", "write_model_file"]


def __getattr__(name: str):
    if name in _LAZY:
        from . import model_file

        return getattr(model_file, name)
    raise AttributeError(f"module 'crd_fast.io' has no attribute {name!r}")
