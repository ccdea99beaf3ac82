"""Run a script with the model-conversion packages made unimportable, as in the worker image.

python tests/deploy/run_without_convert_deps.py manage.py worker ...
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys

BLOCKED = {"torch", "transformers", "optimum", "onnx", "gguf", "accelerate"}


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is a conversion dependency; the worker image does not have it")
        return None


sys.meta_path.insert(0, _Blocker())
script, *args = sys.argv[1:]
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
