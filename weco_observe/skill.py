"""The agent skill: ``weco setup claude-code|cursor|codex`` (or ``weco observe setup``) writes a SKILL.md.

A skill is a folder holding a ``SKILL.md`` (YAML front matter with ``name`` and
``description``, then Markdown instructions) that a coding agent loads when a
task matches its name and description (the open Agent Skills format, read by
Claude Code, Cursor and Codex alike; the name must match the folder's). Ours
teaches the agent the loop: ``init`` once, ``log`` after every experiment
(``--parent-step`` when it reverts), and read ``show --json`` / ``diff`` to
decide what to try next.

**Its name.** The official guide's one instruction is "Use the weco skill to
monitor the experiments", so ours is named ``weco`` and its description says
what that sentence asks for (monitor the experiments) in those words. Where it
goes (``--project``: the same folder under the current directory):

=============  ===========================================
claude-code    ``~/.claude/skills/weco/SKILL.md``
cursor         ``~/.cursor/skills/weco/SKILL.md``
codex          ``~/.agents/skills/weco/SKILL.md``
=============  ===========================================

**Beside the official Weco skill.** ``weco setup`` of the official client
installs Weco's own skill in that same ``weco`` folder (Claude Code, Cursor).
It is never overwritten, not even with ``force``: it is recognised by its front
matter (``name: weco`` and a description that names Weco) without our marker
line. Ours then goes beside it as ``weco-observe`` (folder and name), and the
result says so. The guide's sentence then picks the official skill, which
teaches the same ``weco observe init``/``log`` commands that this tool runs.

Installing is idempotent: the same text is not rewritten, an older version of
ours is replaced (and a copy of ours left in the other folder by an earlier
install is removed, so an agent never sees two), and a SKILL.md that someone
else wrote is left alone unless ``force`` is given. The marker line below tells
ours apart.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput

AGENTS = {
    "claude-code": ".claude/skills",
    "cursor": ".cursor/skills",
    "codex": ".agents/skills",
}
#: what the guide calls it ("Use the weco skill to monitor the experiments"): our folder and name
SKILL_NAME = "weco"
#: our folder and name beside an official Weco skill, which holds ``SKILL_NAME``
BESIDE_NAME = "weco-observe"
MARKER = "<!-- written by `weco observe setup`; rerun it to update this file -->"

_AGENT_NAMES = {"claude-code": "Claude Code", "cursor": "Cursor", "codex": "Codex"}

#: One line each, and no ": " in them: the front matter is YAML, where a plain value cannot hold one.
_DESCRIPTIONS = {
    SKILL_NAME: (
        "The weco skill to monitor the experiments of a code-optimization loop with `weco observe`"
        " (here weco-observe, a local-first drop-in that works offline). Use it when told to use the weco"
        " skill to monitor the experiments, or to track, log or monitor experiments that try to improve a"
        " metric (loss, speed, accuracy, score), e.g. autoresearch. It journals each attempt's metrics and"
        " code, and reviews the tree of attempts, the best step and code diffs before choosing the next"
        " experiment."
    ),
    BESIDE_NAME: (
        "Monitor the experiments of a code-optimization loop with weco-observe, a local-first `weco observe`"
        " that works offline (installed beside the official weco skill, which uses the same commands). Use"
        " it to track, log or monitor experiments that try to improve a metric (loss, speed, accuracy,"
        " score). It journals each attempt's metrics and code, and reviews the tree of attempts, the best"
        " step and code diffs before choosing the next experiment."
    ),
}

_TEMPLATE = """---
name: {name}
description: {description}
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


def skill_text(agent: str, name: str = SKILL_NAME) -> str:
    """The SKILL.md for ``agent`` (the same for every agent; the folder differs), named ``name``:
    ``weco``, or ``weco-observe`` beside an official Weco skill."""
    _check_agent(agent)
    return _TEMPLATE.format(name=name, description=_DESCRIPTIONS[name], marker=MARKER)


def skill_path(agent: str, project: bool = False, base: Path | None = None, name: str = SKILL_NAME) -> Path:
    """Where ``agent`` looks for the skill ``name``: under the home directory, or under ``base``/cwd with ``project``."""
    root = (base or Path.cwd()) if project else Path(os.path.expanduser("~"))
    return root / AGENTS[_check_agent(agent)] / name / "SKILL.md"


def front_matter(text: str) -> dict[str, str]:
    """The ``key: value`` pairs of a SKILL.md's YAML front matter (a folded ``>-`` or ``|`` value joined
    into one line); empty when there is none.

    >>> front_matter("---\\nname: weco\\ndescription: >-\\n  Use Weco for\\n  any task.\\n---\\n# Weco\\n")
    {'name': 'weco', 'description': 'Use Weco for any task.'}
    """
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 3)
    out: dict[str, str] = {}
    key = None
    for line in text[4 : end if end >= 0 else len(text)].splitlines():
        match = re.match(r"^([A-Za-z][\w-]*):\s*(.*)$", line)
        if match:
            key, value = match.group(1), match.group(2).strip()
            out[key] = "" if value in (">", ">-", "|", "|-") else value.strip("'\"")
        elif key is not None and line[:1] in (" ", "\t") and line.strip():
            out[key] = f"{out[key]} {line.strip()}".strip()
    return out


def is_official_weco_skill(text: str) -> bool:
    """True for the official Weco skill (``weco setup`` of the official client): named ``weco``, a
    description that names Weco, and not ours."""
    meta = front_matter(text)
    return MARKER not in text and meta.get("name") == SKILL_NAME and "weco" in meta.get("description", "").lower()


@dataclass(frozen=True)
class Installed:
    """What ``install`` did: ``outcome`` is ``installed``, ``updated`` or ``unchanged``; ``notes`` say
    what else it did or left alone, one line each."""

    path: Path
    outcome: str
    notes: tuple[str, ...] = ()


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None


def _write(path: Path, text: str, force: bool) -> str:
    old = _read(path)
    if old == text:
        return "unchanged"
    if old is not None and MARKER not in old:
        if is_official_weco_skill(old):  # never, --force or not
            raise InvalidInput(f"{path} is the official Weco skill: it is never overwritten")
        if not force:
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
    return "installed" if old is None else "updated"


def install(agent: str, project: bool = False, force: bool = False, base: Path | None = None) -> Installed:
    """Write the skill: as ``weco``, or as ``weco-observe`` beside an official Weco skill, which is never
    overwritten (``force`` only replaces a SKILL.md that is neither ours nor Weco's).

    >>> done = install("claude-code", project=True, base=tmp)
    >>> done.path.relative_to(tmp).as_posix(), done.outcome
    ('.claude/skills/weco/SKILL.md', 'installed')
    >>> install("claude-code", project=True, base=tmp).outcome
    'unchanged'
    """
    main = skill_path(agent, project, base)
    beside = skill_path(agent, project, base, BESIDE_NAME)
    official = _read(main)
    if official is not None and is_official_weco_skill(official):
        outcome = _write(beside, skill_text(agent, BESIDE_NAME), force)
        note = (
            f"the official Weco skill is installed at {main}: left as it is; ours is beside it as"
            f" {BESIDE_NAME!r}. The guide's 'Use the weco skill' picks the official one, which runs the same"
            " `weco observe` commands"
        )
        return Installed(beside, outcome, (note,))
    outcome = _write(main, skill_text(agent), force)
    notes: tuple[str, ...] = ()
    stale = _read(beside)
    if stale is not None and MARKER in stale:  # ours from before the rename: an agent should see one copy
        try:
            beside.unlink()
            beside.parent.rmdir()
        except OSError:
            pass
        notes = (f"removed our older copy at {beside}",)
    return Installed(main, outcome, notes)
