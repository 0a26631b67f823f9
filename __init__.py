"""ComfyUI-MUMU: ComfyUI loads this file from ComfyUI/custom_nodes/<this folder>/.

It only hands ComfyUI the V3 extension defined in nodes/extension.py.
"""

import os
import sys

try:
    import comfy_api.latest  # noqa: F401  (the V3 node API, ComfyUI >= 0.3.4x)
except ImportError as e:
    raise ImportError(
        "ComfyUI-MUMU needs ComfyUI's V3 node API (comfy_api.latest), which this ComfyUI lacks: update ComfyUI "
        "to 0.3.64 or newer (git pull, or the Manager's 'Update ComfyUI')."
    ) from e

# mumu_core sits next to this file and is imported by absolute name (it is also a standalone library).
# Appended, not prepended, so that nothing here can shadow ComfyUI's own top-level modules.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

from .nodes.extension import comfy_entrypoint  # noqa: E402

__all__ = ["comfy_entrypoint"]
