"""Every CLI's --help (and each sub-command's) is plain text, and ``python -m mumu_core.mini --help``
lists every mini module that has a CLI of its own."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import mumu_core

CLIS = ["mumu_core.__main__", "mumu_core.mini.__main__", "mumu_core.data.__main__", "mumu_core.eval.cli"]


def help_text(module: str, args: list[str], capsys) -> str:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def sub_commands(text: str) -> list[str]:
    m = re.search(r"\{([a-z0-9,_-]+)\}", text)
    return m.group(1).split(",") if m else []


@pytest.mark.parametrize("module", CLIS)
def test_help_is_plain_text(module, capsys):
    top = help_text(module, [], capsys)
    assert "``" not in top
    for cmd in sub_commands(top):
        text = help_text(module, [cmd], capsys)
        assert "``" not in text, f"{module} {cmd} --help shows RST markup"
        assert "usage:" in text


def test_mini_help_lists_every_sub_command_module(capsys):
    listed = set(sub_commands(help_text("mumu_core.mini.__main__", [], capsys)))
    assert {"demo", "evaluate", "probe", "analyser"} <= listed
    mini = Path(mumu_core.__file__).parent / "mini"
    with_cli = {
        p.stem.replace("_", "-")
        for p in mini.glob("*.py")
        if p.stem != "__main__" and re.search(r"^def main\(", p.read_text(), re.M)
    }
    assert with_cli <= listed, f"mini modules with a CLI missing from --help: {with_cli - listed}"
