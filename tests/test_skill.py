"""``weco observe setup claude-code|cursor|codex``: the agent skill, through the real CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from weco_observe import skill


@pytest.mark.parametrize(
    "agent, folder",
    [("claude-code", ".claude/skills"), ("cursor", ".cursor/skills"), ("codex", ".agents/skills")],
)
def test_setup_writes_the_skill_once(cli, tmp_path, agent, folder):
    home = tmp_path / "home"
    path = home / folder / "weco" / "SKILL.md"
    result = cli.ok("observe", "setup", agent)
    assert result.stderr.strip() == f"installed {path}"
    text = path.read_text()
    assert text.startswith("---\nname: weco\ndescription: ")
    assert cli.ok("observe", "setup", agent).stderr.strip() == f"unchanged {path}"
    assert path.read_text() == text


def test_the_skill_teaches_the_loop(cli):
    text = cli.ok("observe", "setup", "claude-code", "--print").stdout
    front, body = text.split("---\n")[1], text.split("---\n", 2)[2]
    assert "name: weco\n" in front and "description:" in front
    for needle in (
        "weco observe init",
        "weco observe log",
        "--parent-step",
        "--status failed",
        'weco observe show "$WECO_RUN_ID" --json',
        "weco observe diff",
        "is_best",
        "--sources",
    ):
        assert needle in body, needle
    assert not (Path.home() / ".claude").exists()  # --print writes nothing


def test_setup_updates_its_own_older_file_but_not_someone_elses(cli, tmp_path):
    path = tmp_path / "home" / ".claude" / "skills" / "weco" / "SKILL.md"
    path.parent.mkdir(parents=True)
    path.write_text(f"---\nname: weco\n---\n{skill.MARKER}\nold version\n")
    assert cli.ok("observe", "setup", "claude-code").stderr.startswith("updated ")
    assert "old version" not in path.read_text()

    path.write_text("my own notes\n")
    result = cli("observe", "setup", "claude-code")
    assert result.returncode == 2 and "was not written by weco observe" in result.stderr
    assert path.read_text() == "my own notes\n"
    assert cli.ok("observe", "setup", "claude-code", "--force").stderr.startswith("updated ")
    assert skill.MARKER in path.read_text()


def test_setup_into_the_project_and_unknown_agents(cli, tmp_path):
    result = cli.ok("observe", "setup", "cursor", "--project")
    assert (tmp_path / ".cursor" / "skills" / "weco" / "SKILL.md").is_file()
    assert str(tmp_path) in result.stderr
    result = cli("observe", "setup", "vim")
    assert result.returncode == 2
    assert result.stderr == "error: unknown agent 'vim': use one of claude-code, cursor, codex\n"
