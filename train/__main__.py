"""``python -m train --config FILE [--set key=value ...]``; launched by torchrun for several processes."""

from __future__ import annotations

import sys

from .config import ConfigError, load_config, parse_cli
from .loop import NonFiniteLoss, run


def main(argv: list[str] | None = None) -> int:
    try:
        path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
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
