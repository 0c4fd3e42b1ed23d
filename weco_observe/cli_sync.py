"""CLI commands for the sync work; registered on the `observe` group by `cli.py`.

Only typer is imported at load time (this module loads on the `log` hot path).
"""

from __future__ import annotations

import typer


def register(observe: typer.Typer) -> None:
    """Add this module's commands to `observe`."""
