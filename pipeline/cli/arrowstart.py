"""pyarrow without pandas at start-up.

At its first array (from a list or a numpy array alike) pyarrow asks once per
process whether pandas can be imported, by importing all of it: 0.45 s of CPU
at the start of every run, shard and scheduler task, for a library the
pipeline never uses (it gives pyarrow lists and numpy arrays). The CLI lets
that one question find no pandas; pyarrow keeps the answer, and a later
`import pandas` or `to_pandas()` works as usual.
"""
from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


class _NoPandas(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname.split(".")[0] == "pandas":
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def skip_pandas_probe() -> None:
    if "pandas" in sys.modules:
        return  # already imported: pyarrow's question costs nothing
    import pyarrow as pa

    finder = _NoPandas()
    sys.meta_path.insert(0, finder)
    try:
        pa.array([0])  # the first array asks the question
    finally:
        sys.meta_path.remove(finder)
