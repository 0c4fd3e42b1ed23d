"""Generate the README's CLI reference from the commands themselves (what ``--help`` shows).

``python tests/cli_reference.py --write`` rewrites the block between the
``<!-- cli-reference:start -->`` and ``<!-- cli-reference:end -->`` markers in
README.md; ``tests/test_readme.py`` fails when the README is out of date or a
command is missing from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

START = "<!-- cli-reference:start -->"
END = "<!-- cli-reference:end -->"
README = Path(__file__).resolve().parent.parent / "README.md"


def _is_group(command) -> bool:
    return hasattr(command, "list_commands")


def _subcommands(command) -> dict:
    """A group's commands by name, asked for as click does (the CLI's groups build them on demand)."""
    ctx = typer.Context(command)
    return {name: command.get_command(ctx, name) for name in command.list_commands(ctx)}


def _walk(command, path):
    yield path, command
    if _is_group(command):
        subs = _subcommands(command)
        for name in sorted(subs):
            yield from _walk(subs[name], [*path, name])


def commands():
    """Every (path, click command) of the full ``weco`` app, groups included."""
    from weco_observe.cli import app

    root = typer.main.get_command(app)
    return list(_walk(root, ["weco"]))


def _option_row(param) -> str:
    flags = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    if param.param_type_name == "argument":
        flags = f"`{param.human_readable_name}`"
    help_text = (getattr(param, "help", None) or "").replace("|", "\\|").replace("\n", " ")
    bits = []
    if param.required:
        bits.append("required")
    default = param.default
    if not param.required and default not in (None, False, (), []) and not callable(default):
        bits.append(f"default: `{default}`")
    if getattr(param, "multiple", False):
        bits.append("repeatable")
    extra = f" ({'; '.join(bits)})" if bits else ""
    return f"| {flags} | {help_text}{extra} |"


def render() -> str:
    out = [START, ""]
    for path, command in commands():
        name = " ".join(path)
        out.append(f"### `{name}`")
        out.append("")
        doc = (command.help or "").strip()
        if doc:
            out.append(doc.replace("\n\n", "\n\n").strip())
            out.append("")
        params = [p for p in command.params if p.name != "help"]
        if _is_group(command):
            subs = ", ".join(f"`{name} {s}`" for s in sorted(_subcommands(command)))
            out.append(f"Commands: {subs}.")
            out.append("")
        else:
            args = [p for p in params if p.param_type_name == "argument"]
            usage = (
                name
                + "".join(f" {a.human_readable_name}" for a in args)
                + (" [OPTIONS]" if len(params) > len(args) else "")
            )
            out.append(f"Usage: `{usage}`")
            out.append("")
        if params:
            out.append("| option | description |")
            out.append("|---|---|")
            out.extend(_option_row(p) for p in params)
            out.append("")
    out.append(END)
    return "\n".join(out)


def current_block(text: str) -> str:
    start, end = text.index(START), text.index(END) + len(END)
    return text[start:end]


def write(readme: Path = README) -> bool:
    text = readme.read_text(encoding="utf-8")
    new = text.replace(current_block(text), render())
    if new != text:
        readme.write_text(new, encoding="utf-8")
        return True
    return False


if __name__ == "__main__":
    if "--write" in sys.argv:
        print("README.md updated" if write() else "README.md already current")
    else:
        print(render())
