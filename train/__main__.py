"""``python -m train --config FILE [--set key=value ...]``; launched by torchrun for several processes.

Exit codes: 0 done, 130 stopped by Ctrl-C / SIGTERM (after saving), 2 bad input (config, data, model
folders, bundle, out_dir, a checkpoint that cannot be resumed or exported, too much bad data: one
``error: ...`` line that says what to do, printed by every process), 3 a non-finite loss.
``--debug`` or ``MUMU_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys

from .config import ConfigError, load_config, parse_cli

EXPORT_HELP = """usage: python -m train export RUN_DIR [--step N] [--dest DIR]

Re-export a training checkpoint (the newest, or step N) of RUN_DIR (a run's out_dir) as the MUMU bundle,
kohya UNet LoRA and full-weight folders; default destination RUN_DIR/export/step_N."""

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "fix the input": shown as one line, exit 2."""
    from mumu_core.bundle import BundleError
    from mumu_core.encoder import EncoderLoadError
    from mumu_core.prompt import PromptError
    from mumu_core.sdxl import SDXLLoadError

    from .checkpoint import CheckpointError
    from .data import DataError
    from .loop import TrainInputError

    return (ConfigError, DataError, CheckpointError, TrainInputError, BundleError, EncoderLoadError,
            SDXLLoadError, PromptError)  # fmt: skip


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    on = os.environ.get("MUMU_DEBUG", "") not in ("", "0")
    return on or "--debug" in argv, [a for a in argv if a != "--debug"]


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""


def error(msg: object) -> None:
    text = " ".join(str(msg).split()) if "\n  - " not in str(msg) else str(msg)
    # One write per line: with print(), the text and its newline are two writes, and two ranks sharing
    # torchrun's stderr pipe then glue their lines together ("...traceback)[rank 1] error: ...").
    sys.stderr.write(f"{_rank_prefix()}error: {text}\n")
    sys.stderr.flush()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun kills the other ranks as soon as one exits non-zero; every rank fails on the same checked
        # input at the same step, so a moment's wait lets each one print its own line before that happens.
        import time

        time.sleep(3)


def export_main(argv: list[str]) -> int:
    from pathlib import Path

    from .export import export_checkpoint

    if not argv or argv[0] in ("-h", "--help"):
        print(EXPORT_HELP)
        return 0 if argv else EXIT_BAD_INPUT
    run_dir, step, dest = Path(argv[0]), None, None
    rest = argv[1:]
    while rest:
        if rest[0] == "--step" and len(rest) > 1:
            try:
                step = int(rest[1])
            except ValueError:
                error(f"--step {rest[1]!r} must be a step number, e.g. --step 500")
                return EXIT_BAD_INPUT
            rest = rest[2:]
        elif rest[0] == "--dest" and len(rest) > 1:
            dest, rest = Path(rest[1]), rest[2:]
        else:
            error(f"unexpected argument {rest[0]!r}\n{EXPORT_HELP}")
            return EXIT_BAD_INPUT
    try:
        out = export_checkpoint(run_dir, step, dest)
    except FileNotFoundError as e:  # a folder without checkpoints
        error(e)
        return EXIT_BAD_INPUT
    print(f"exported to {out}")
    return 0


def _main(argv: list[str]) -> int:
    from .loop import NonFiniteLoss, run

    if argv and argv[0] == "export":
        return export_main(argv[1:])
    path, overrides = parse_cli(argv)
    cfg = load_config(path, overrides)
    cfg.validate()
    try:
        summary = run(cfg)
    except NonFiniteLoss as e:
        error(e)
        return EXIT_NONFINITE
    return 130 if summary.get("stopped") == "interrupted" else 0


def main(argv: list[str] | None = None) -> int:
    debug, argv = debug_requested(sys.argv[1:] if argv is None else list(argv))
    if debug:
        return _main(argv)
    try:
        return _main(argv)
    except ConfigError as e:
        error(e)
        return EXIT_BAD_INPUT
    except _user_errors() as e:
        error(f"{e} (--debug or MUMU_DEBUG=1 shows the traceback)")
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
