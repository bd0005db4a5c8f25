"""Command-line flags derived from `Settings`: one flag per setting, with its type, choices, default and help.

Flags default to None, so a flag that is not given leaves the `STEP1X_*` variable (or the default) in charge;
`settings_from_args` lays the given ones over the environment. Light on purpose (argparse + pydantic only): the
`step1x-edit` parser must build without importing torch.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from .settings import Settings


def _base_type(annotation: Any) -> Any:
    """`X | None` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _int_list(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None


def add_settings_arguments(parser: argparse.ArgumentParser, groups: tuple[str, ...] | None = None) -> None:
    """`--<setting-name>` for every setting of `groups` (all when None) that has a flag, grouped in the help."""
    sections: dict[str, argparse._ArgumentGroup] = {}
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra or {}
        group = extra.get("group", "other")
        if not extra.get("cli", True) or (groups is not None and group not in groups):
            continue
        section = sections.get(group) or sections.setdefault(
            group, parser.add_argument_group(f"{group} settings (environment: STEP1X_<NAME>)"))
        flags = ["--" + name.replace("_", "-")] + ([extra["alias_flag"]] if extra.get("alias_flag") else [])
        kind = _base_type(field.annotation)
        default = field.default
        shown = "" if default is None or default == "" else f" (default {default})"
        kw: dict[str, Any] = {"dest": name, "default": None, "help": (field.description or "") + shown}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            kw["choices"] = list(typing.get_args(kind))
        elif typing.get_origin(kind) is list:
            kw.update(type=_int_list, metavar="N,N")
        else:
            kw.update(type=kind if kind in (int, float, Path) else str, metavar=name.upper())
        section.add_argument(*flags, **kw)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the environment with every given flag on top (raises pydantic's ValidationError)."""
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)


def settings_table() -> str:
    """The README's settings table, from the same declarations (tests/test_readme.py keeps the README in step:
    `.venv/bin/python -m step1x_edit.cli_args` prints it)."""
    rows = ["| group | `STEP1X_…` | default | meaning |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra or {}
        default = "" if field.default is None else f"`{field.default}`"
        flag = "" if extra.get("cli", True) else " (no flag: environment only)"
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| {extra.get('group', '')} | `{name.upper()}` | {default} | {text}{flag} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_table())
