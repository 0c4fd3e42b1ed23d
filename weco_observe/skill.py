"""The agent skill: ``weco observe setup claude-code|cursor|codex`` writes a SKILL.md.

A skill is a folder holding a ``SKILL.md`` (YAML front matter with ``name`` and
``description``, then Markdown instructions) that a coding agent loads when a
task matches its description (the open Agent Skills format, read by Claude
Code, Cursor and Codex alike). Ours teaches the agent the loop: ``init`` once,
``log`` after every experiment (``--parent-step`` when it reverts), and read
``show --json`` / ``diff`` to decide what to try next.

Where it goes (``--project`` uses the same folder under the current directory
instead of the home directory):

=============  ===========================================
claude-code    ``~/.claude/skills/weco-observe/SKILL.md``
cursor         ``~/.cursor/skills/weco-observe/SKILL.md``
codex          ``~/.agents/skills/weco-observe/SKILL.md``
=============  ===========================================

Installing is idempotent: the same text is not rewritten, an older version of
ours is replaced, and a SKILL.md that someone else wrote there is left alone
unless ``force`` is given. The marker line below tells ours apart.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidInput

AGENTS = {
    "claude-code": ".claude/skills",
    "cursor": ".cursor/skills",
    "codex": ".agents/skills",
}
SKILL_NAME = "weco-observe"
MARKER = "<!-- written by `weco observe setup`; rerun it to update this file -->"

_AGENT_NAMES = {"claude-code": "Claude Code", "cursor": "Cursor", "codex": "Codex"}

_TEMPLATE = """---
name: weco-observe
description: Track code-optimization experiments with weco-observe (a local-first `weco observe`). Use when iterating on code to improve a metric (speed, loss, accuracy, score) - e.g. autoresearch or "monitor the experiments" - to journal each attempt, its metrics and its code, and to review the tree of attempts, the best step and code diffs before choosing the next experiment.
---
{marker}

# Tracking experiments with weco observe

Every command below writes to a local journal in milliseconds and works
offline; results sync to the Weco dashboard later by themselves. Never wait
for the network and never retry a `log` because of connectivity.

## 1. Start a run once

Before the first experiment, record the baseline code (it becomes step 0) and
keep the printed run id for the whole session:

```bash
WECO_RUN_ID=$(weco observe init --name "<short goal>" --metric <metric_name> \\
  --goal <min|max> --sources <file1> <file2>)
```

- `--metric` is the one number that decides what is better (e.g. `val_bpb`);
  `--goal min` when lower is better, `--goal max` when higher is better.
- Track every file you will edit (`--source FILE` or `--sources A B ...`).
- If the user gave you a run id, reuse it instead of calling `init`.

## 2. Log every experiment, good or bad

Measure the baseline first and log it as step 0, then number experiments
1, 2, 3, ... in the order you run them:

```bash
weco observe log --run-id "$WECO_RUN_ID" --step 0 --description "baseline" \\
  --metrics '{{"<metric_name>": 2.366}}' --sources <file1> <file2>

weco observe log --run-id "$WECO_RUN_ID" --step 1 --status completed \\
  --description "<what you changed and why>" \\
  --metrics '{{"<metric_name>": 2.261, "memory_gb": 11.2}}' --sources <file1> <file2>
```

- Log right after each evaluation, including failures (`--status failed`,
  e.g. a crash, OOM, or a result you discard). Put the reason in the description.
- Always pass `--sources` so the code of each step is snapshotted and diffable.
- `--metrics` is a JSON object of numbers; include the primary metric and any
  secondary ones (memory, time, size).
- Re-logging the same `--step` updates it (safe to repeat).

## 3. Branch correctly when you revert

A step's parent defaults to the last step that did not fail. When you discard
an experiment and go back to an earlier version, say which step you are
building on:

```bash
weco observe log --run-id "$WECO_RUN_ID" --step 4 --parent-step 2 \\
  --description "tried Y instead of X" --metrics '{{"<metric_name>": 2.1}}' --sources <file1>
```

Only use a parent whose code you actually restored.

## 4. Decide what to try next from the record

```bash
weco observe show "$WECO_RUN_ID" --json   # every step: parent, status, metrics, is_best, sync
weco observe diff "$WECO_RUN_ID" <step>   # code change of a step against its parent
weco observe diff "$WECO_RUN_ID" <step> --against <other>
weco observe runs --json                  # all runs with best value and step
```

- Start new ideas from the best step (`"is_best": true`); restore its code
  before editing, and log the next step with `--parent-step <best>`.
- Read the diffs of steps that improved the metric to see which changes paid
  off; do not repeat an idea that already failed.
- Report progress to the user as "best <metric> <value> at step N, X% better
  than the baseline", which `weco observe show` prints.

## Sharing results

`weco observe report "$WECO_RUN_ID" -o report.html` writes a self-contained
page (tree, metric chart, diffs) that opens offline; `weco observe ui` serves
all runs on http://127.0.0.1:8421. `weco observe sync` pushes pending steps to
Weco now; `weco observe status` shows what is still pending.
"""


def _check_agent(agent: str) -> str:
    if agent not in AGENTS:
        raise InvalidInput(f"unknown agent {agent!r}: use one of {', '.join(AGENTS)}")
    return agent


def skill_text(agent: str) -> str:
    """The SKILL.md for ``agent`` (the text is the same for every agent; the folder differs)."""
    _check_agent(agent)
    return _TEMPLATE.format(marker=MARKER)


def skill_path(agent: str, project: bool = False, base: Path | None = None) -> Path:
    """Where ``agent`` looks for our skill: under the home directory, or under ``base``/cwd with ``project``."""
    root = (base or Path.cwd()) if project else Path(os.path.expanduser("~"))
    return root / AGENTS[_check_agent(agent)] / SKILL_NAME / "SKILL.md"


def install(agent: str, project: bool = False, force: bool = False, base: Path | None = None) -> tuple[Path, str]:
    """Write the skill; return ``(path, outcome)``, outcome one of ``installed``, ``updated``, ``unchanged``.

    >>> path, outcome = install("claude-code", project=True, base=tmp)
    >>> path.relative_to(tmp).as_posix(), outcome
    ('.claude/skills/weco-observe/SKILL.md', 'installed')
    >>> install("claude-code", project=True, base=tmp)[1]
    'unchanged'
    """
    text = skill_text(agent)
    path = skill_path(agent, project, base)
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = None
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None
    if old == text:
        return path, "unchanged"
    if old is not None and MARKER not in old and not force:
        raise InvalidInput(
            f"{path} exists and was not written by weco observe: move it away or pass --force to replace it"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise InvalidInput(f"cannot write {path}: {exc}") from None
    return path, "installed" if old is None else "updated"
