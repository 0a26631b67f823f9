"""Shared start of the check scripts that run under a real ComfyUI's python (comfy_*_check.py).

Imported from those scripts (their folder is sys.path[0]); never imported by pytest itself.
"""

from __future__ import annotations

import logging
import os
import sys


def boot_comfyui(comfy_dir: str, models_dir: str, work: str) -> list[str]:
    """Start ComfyUI in-process on the CPU as a user's would be: args parsed, MODELS_DIR registered
    through a generated extra_model_paths.yaml, exports kept under WORK. Returns the live log list
    (every log message from now on is appended to it)."""
    os.makedirs(work, exist_ok=True)
    os.chdir(comfy_dir)
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu", "--output-directory", os.path.join(work, "output")]
    import comfy.options

    comfy.options.enable_args_parsing()
    logs: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            logs.append(record.getMessage())

    logging.getLogger().addHandler(Collect())
    logging.getLogger().setLevel(logging.INFO)

    import folder_paths
    import utils.extra_config

    yaml = os.path.join(work, "extra_model_paths.yaml")
    subs = sorted(d for d in os.listdir(models_dir) if os.path.isdir(os.path.join(models_dir, d)))
    with open(yaml, "w") as f:
        f.write(f"test:\n  base_path: {models_dir}\n" + "".join(f"  {d}: {d}/\n" for d in subs))
    utils.extra_config.load_extra_path_config(yaml)
    # Exports go to the first loras folder; keep them out of the ComfyUI checkout.
    folder_paths.add_model_folder_path("loras", os.path.join(work, "loras"), is_default=True)
    return logs
