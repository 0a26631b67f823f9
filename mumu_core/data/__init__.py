"""Dataset bootstrapping: ground caption phrases in images, apply the paper's crop rules, render
control images and write webdataset shards (see docs/DATA.md; CLI: ``python -m mumu_core.data``).

Never imports ComfyUI, train/ or nodes/.
"""

from importlib import import_module
from typing import TYPE_CHECKING

# Lazy (PEP 562): importing one submodule, e.g. ``mumu_core.data.detect`` for ``mumu_core.segment`` inside
# ComfyUI, must not import the whole pipeline (opencv, webdataset, ray), which ComfyUI's venv may lack.
_EXPORTS = {
    "config": ["BootstrapConfig"],
    "controls": ["DepthEstimator", "canny", "xdog_sketch"],
    "detect": ["GroundingDinoDetector", "assign_boxes", "detector_text", "token_phrase_map"],
    "phrases": ["Phrase", "extract_phrases", "is_person_phrase", "phrases_from_strings"],
    "pipeline": ["Models", "bootstrap", "bootstrap_batch", "process_part"],
    "rules": ["Candidate", "apply_rules", "build_prompt"],
    "shards": ["Sample", "iter_samples", "read_shard", "write_shard"],
    "sources": [
        "FolderSource",
        "KnownBoxesSource",
        "ParquetSource",
        "Source",
        "SourceItem",
        "WebDatasetSource",
    ],
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    from .config import BootstrapConfig
    from .controls import DepthEstimator, canny, xdog_sketch
    from .detect import GroundingDinoDetector, assign_boxes, detector_text, token_phrase_map
    from .phrases import Phrase, extract_phrases, is_person_phrase, phrases_from_strings
    from .pipeline import Models, bootstrap, bootstrap_batch, process_part
    from .rules import Candidate, apply_rules, build_prompt
    from .shards import Sample, iter_samples, read_shard, write_shard
    from .sources import FolderSource, KnownBoxesSource, ParquetSource, Source, SourceItem, WebDatasetSource

__all__ = [
    "BootstrapConfig",
    "Candidate",
    "DepthEstimator",
    "FolderSource",
    "GroundingDinoDetector",
    "KnownBoxesSource",
    "Models",
    "ParquetSource",
    "Phrase",
    "Sample",
    "Source",
    "SourceItem",
    "WebDatasetSource",
    "apply_rules",
    "assign_boxes",
    "bootstrap",
    "bootstrap_batch",
    "build_prompt",
    "canny",
    "detector_text",
    "extract_phrases",
    "is_person_phrase",
    "iter_samples",
    "phrases_from_strings",
    "process_part",
    "read_shard",
    "token_phrase_map",
    "write_shard",
    "xdog_sketch",
]
