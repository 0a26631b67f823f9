"""``python -m train --config FILE [--set key=value ...]``; launched by torchrun for several processes."""

from __future__ import annotations

import sys

from .config import ConfigError, load_config, parse_cli
from .loop import NonFiniteLoss, run

EXPORT_HELP = """usage: python -m train export RUN_DIR [--step N] [--dest DIR]

Re-export a training checkpoint (the newest, or step N) of RUN_DIR (a run's out_dir) as the MUMU bundle,
kohya UNet LoRA and full-weight folders; default destination RUN_DIR/export/step_N."""


def export_main(argv: list[str]) -> int:
    from pathlib import Path

    from .export import export_checkpoint

    if not argv or argv[0] in ("-h", "--help"):
        print(EXPORT_HELP)
        return 0 if argv else 2
    run_dir, step, dest = Path(argv[0]), None, None
    rest = argv[1:]
    while rest:
        if rest[0] == "--step" and len(rest) > 1:
            step, rest = int(rest[1]), rest[2:]
        elif rest[0] == "--dest" and len(rest) > 1:
            dest, rest = Path(rest[1]), rest[2:]
        else:
            print(f"error: unexpected argument {rest[0]!r}\n{EXPORT_HELP}", file=sys.stderr)
            return 2
    try:
        out = export_checkpoint(run_dir, step, dest)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "export":
        return export_main(argv[1:])
    try:
        path, overrides = parse_cli(argv)
        cfg = load_config(path, overrides)
        cfg.validate()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 130 if summary.get("stopped") == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
