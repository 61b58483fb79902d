"""Model files: safetensors tensors plus JSON metadata, written atomically, never unpickled."""

from .model_file import FORMAT_VERSION, ModelFileError, atomic_write, read_model_file, write_model_file

__all__ = ["FORMAT_VERSION", "ModelFileError", "atomic_write", "read_model_file", "write_model_file"]
