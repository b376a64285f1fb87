"""Command-line options generated from the config dataclasses, so a flag and its field cannot drift."""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping
from dataclasses import fields
from typing import Any

METAVARS = {
    "data": "FORMAT:PATH", "out": "DIR", "train_split": "SPLIT", "val_split": "SPLIT", "cache": "DIR",
    "device": "DEVICE", "init_from": "CHECKPOINT", "encoder": "NAME", "encoder_weights": "FILE",
    "base": "CHECKPOINT", "db": "URL", "data_dir": "DIR", "from_export": "DIR", "name": "NAME",
    "since": "DATE", "replay_data": "FORMAT:PATH", "replay_split": "SPLIT", "val_data": "FORMAT:PATH",
}
DEVICE_HELP = "auto, cpu or cuda"
VAL_LIMIT_HELP = "validate on the first N images only (0 = all)"


def comma_list(text: str) -> list[str]:
    """A comma-separated option (``--splits train,val``, ``--distill-from A,B``) as its non-empty items."""
    return [item.strip() for item in text.split(",") if item.strip()]


def add_dataclass_options(parser: Any, cls: Any, helps: Mapping[str, str], skip: Collection[str] = ()) -> None:
    """One ``--flag`` per field of ``cls`` (defaults from the dataclass), in the order of ``helps``.

    Every field not in ``skip`` must have a help text: an undocumented option is a bug, caught here.
    """
    defaults = cls()
    names = [f.name for f in fields(cls) if f.name not in skip]
    undocumented = [name for name in names if name not in helps]
    if undocumented:
        raise ValueError(f"{cls.__name__}: no help text for {', '.join(undocumented)}")
    for name in sorted(names, key=list(helps).index):
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helps[name])
        else:
            kind = type(default) if default is not None else str
            metavar = METAVARS.get(name, "N" if kind is int else "X" if kind is float else "VALUE")
            parser.add_argument(flag, type=kind, default=default, help=helps[name], metavar=metavar)


def config_from_args(cls: Any, values: Mapping[str, Any]) -> Any:
    """An instance of the dataclass ``cls`` from parsed arguments (other keys are ignored)."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except empty ones (None, "", off switches); description and epilog as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        empty = action.default in (None, "") or (action.default is False and action.nargs == 0
                                                   and not isinstance(action, argparse.BooleanOptionalAction))
        if "%(default)" in text or "default:" in text or empty or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)
