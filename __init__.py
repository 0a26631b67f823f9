"""ComfyUI-MUMU: ComfyUI loads this file from ComfyUI/custom_nodes/<this folder>/.

It only hands ComfyUI the V3 extension defined in nodes/extension.py. Imported outside ComfyUI (pytest
treats this folder as a package, since it has this file), it defines nothing: there is no ComfyUI to
register with.
"""

import importlib.util
import os
import sys

# ComfyUI imports folder_paths and comfy before it loads custom nodes.
_IN_COMFYUI = "folder_paths" in sys.modules and "comfy" in sys.modules

if _IN_COMFYUI:
    try:
        import comfy_api.latest  # noqa: F401  (the V3 node API)
    except ImportError as e:
        raise ImportError(
            "ComfyUI-MUMU needs ComfyUI's V3 node API (comfy_api.latest), which this ComfyUI lacks: update "
            "ComfyUI to 0.3.64 or newer (git pull, or the Manager's 'Update ComfyUI')."
        ) from e

    # mumu_core sits next to this file and is imported by absolute name (it is also a standalone
    # library). It alone is registered, rather than putting this folder on sys.path, which would also
    # expose train/, tests/ and bench/ as top-level names to every other pack.
    if "mumu_core" not in sys.modules:
        _core = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mumu_core")
        _spec = importlib.util.spec_from_file_location(
            "mumu_core", os.path.join(_core, "__init__.py"), submodule_search_locations=[_core]
        )
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["mumu_core"] = _module
        _spec.loader.exec_module(_module)

    from .nodes.extension import comfy_entrypoint  # noqa: F401

    __all__ = ["comfy_entrypoint"]
