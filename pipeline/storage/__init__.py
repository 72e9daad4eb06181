"""The output behind one interface (local or object store), its locks, and filesystems by URI.

`open_output` picks the implementation by the path's scheme; everything else
calls `output.Output`'s methods and never asks which kind of store it has.
"""
from __future__ import annotations

from ..config.job import StorageConfig
from .fs import is_remote
from .local import LocalOutput
from .objectstore import ObjectOutput
from .output import Output


def open_output(path: str, options: StorageConfig) -> Output:
    if not is_remote(path):
        return LocalOutput(path.removeprefix("file://"))
    return ObjectOutput(path, options)
