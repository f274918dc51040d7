"""storm-vlm: STORM (Spatiotemporal TOken Reduction for Multimodal LLMs).

`import storm_vlm` is cheap (no torch): the public names below load on first use, so the
`storm-vlm` command starts at once. The transformers Auto classes learn the STORM classes
(`register_auto_classes`) as soon as transformers is imported — before or after this package —
so `AutoModelForImageTextToText.from_pretrained(dir)` works after `import storm_vlm`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "StormConfig": "storm_vlm.model.configuration",
    "StormForConditionalGeneration": "storm_vlm.model.modeling",
    "StormProcessor": "storm_vlm.model.processing",
    "VisualTokenLayout": "storm_vlm.model.compression",
    "load_video": "storm_vlm.video",
    "VideoDecodeError": "storm_vlm.video",
    "load_model": "storm_vlm.inference",
    "StormError": "storm_vlm.errors",
}

__all__ = ["__version__", "register_auto_classes", *_LAZY]


def register_auto_classes() -> None:
    """Register STORM with AutoConfig, AutoModelForImageTextToText and AutoProcessor (idempotent).

    Importing `storm_vlm.model` does it; while that import is under way this returns at once.
    """
    importlib.import_module("storm_vlm.model")


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'storm_vlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Runs `register_auto_classes` right after `transformers` finishes importing.

    Importing transformers costs seconds (it imports torch), so this package does not do it
    itself; the finder wraps transformers' own loader once and removes itself.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            register_auto_classes()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    register_auto_classes()
else:
    sys.meta_path.insert(0, _RegisterAfterTransformers())
