"""The journal's folder, the files the views write, and the UI's Host check (issue 10, item 10).

The multi-user cases use real Unix users: the victim is ``second_user`` (made with
``useradd`` for the test, removed after it) running the real CLI; the attacker is the
system's ``nobody``, who plants folders and symlinks in the shared folder first with
``runuser``. The victim runs the ``weco_observe`` this test process imports (a
world-readable copy of it goes first on their PYTHONPATH), so the same test runs
against an older release.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_fixtures import OtherUser, second_user  # noqa: F401
from test_ui import UI

import weco_observe

ATTACKER = "nobody"


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def as_attacker(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", ATTACKER, "--", *argv], capture_output=True, text=True, timeout=30)


@pytest.fixture
def world() -> Iterator[Path]:
    """A world-traversable scratch folder under /tmp (the test's tmp_path is root's alone)."""
    if shutil.which("runuser") is None or os.geteuid() != 0:
        pytest.skip("needs root and runuser")
    root = Path(tempfile.mkdtemp(prefix="wo-folder-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def victim(second_user: OtherUser, world: Path) -> OtherUser:  # noqa: F811
    """The second user, running the weco_observe this process imported."""
    code = world / "pylib"
    shutil.copytree(Path(weco_observe.__file__).parent, code / "weco_observe")
    for p in [code, *code.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    second_user.libs = Path(f"{code}:{second_user.libs}")  # used verbatim as PYTHONPATH
    (second_user.home / "train.py").write_text("lr = 0.1\n")
    os.chown(second_user.home / "train.py", second_user.uid, second_user.gid)
    return second_user


def init(user: OtherUser, folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return user.cli("observe", "init", "--metric", "loss", "--source", "train.py", *extra, env=_env(folder))


def _env(folder: Path) -> dict[str, str]:
    return {"WECO_OBSERVE_DIR": str(folder)}


def subfolder(user: OtherUser, folder: Path) -> Path:
    return folder / f"weco-observe-{user.name}"


def _shared(world: Path, owner: OtherUser | None = None) -> Path:
    shared = world / "shared"
    shared.mkdir()
    if owner is not None:
        os.chown(shared, owner.uid, owner.gid)
    shared.chmod(0o1777)
    return shared


@pytest.mark.parametrize("whose", ["root's", "the victim's own"])
def test_a_shared_folder_keeps_its_mode_and_the_journal_goes_in_a_private_subfolder(victim, world, whose):
    shared = _shared(world, victim if whose == "the victim's own" else None)
    owner = os.stat(shared).st_uid
    made = init(victim, shared)
    assert made.returncode == 0, made.stderr
    run_id = made.stdout.strip()
    assert _mode(shared) == 0o1777 and os.stat(shared).st_uid == owner, "the shared folder's mode was changed"

    private = subfolder(victim, shared)
    st = os.lstat(private)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == victim.uid and _mode(private) == 0o700
    journal = private / "journal.db"
    assert os.stat(journal).st_uid == victim.uid and _mode(journal) == 0o600
    assert not (shared / "journal.db").exists()

    logged = victim.cli("observe", "log", "--run-id", run_id, "--step", "1", env=_env(shared))
    assert logged.returncode == 0, logged.stderr
    status = json.loads(victim.cli("observe", "status", "--json", env=_env(shared)).stdout)
    assert status["journal"] == str(journal) and status["steps"] == 2
    # Another user sees nothing of it.
    assert as_attacker("ls", str(private)).returncode != 0
    assert as_attacker("cat", str(journal)).returncode != 0

    doctor = victim.cli("observe", "doctor", "--repair", env=_env(shared))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert _mode(shared) == 0o1777 and os.stat(shared).st_uid == owner


def _plant_folder(shared: Path, name: str) -> Path:
    trap = shared / name
    assert as_attacker("mkdir", "-m", "777", str(trap)).returncode == 0
    return trap


def _plant_symlink(shared: Path, name: str, world: Path) -> Path:
    target = world / "attackers-folder"
    target.mkdir(mode=0o777)
    target.chmod(0o777)
    os.chown(target, *_ids(ATTACKER))
    assert as_attacker("ln", "-s", str(target), str(shared / name)).returncode == 0
    return target


def _ids(name: str) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


@pytest.mark.parametrize("trap", ["a folder of the attacker's", "a symlink to the attacker's folder"])
def test_a_private_subfolder_planted_by_another_user_is_refused(victim, world, trap):
    shared = _shared(world)
    name = subfolder(victim, shared).name
    caught = _plant_folder(shared, name) if trap.startswith("a folder") else _plant_symlink(shared, name, world)

    strict = init(victim, shared, "--strict")
    assert strict.returncode == 3, strict.stdout + strict.stderr
    assert "refusing to keep the journal in" in strict.stderr and "Traceback" not in strict.stderr
    assert "symlink" in strict.stderr if trap.startswith("a symlink") else "another user" in strict.stderr

    # Without --strict the run is not lost: it waits in the victim's own spill folder (their TMPDIR).
    spilled = init(victim, shared)
    assert spilled.returncode == 0 and spilled.stdout.strip().startswith("local-"), spilled.stderr
    assert "WARNING" in spilled.stderr and "saved to" in spilled.stderr
    assert str(victim.tmp) in spilled.stderr
    logged = victim.cli("observe", "log", "--run-id", spilled.stdout.strip(), "--step", "1", env=_env(shared))
    assert logged.returncode == 0 and "WARNING" in logged.stderr

    assert list(caught.iterdir()) == [], "the victim wrote into the attacker's folder"
    assert not (shared / "journal.db").exists()


def test_a_journal_file_planted_in_the_shared_folder_is_never_used(victim, world):
    shared = _shared(world)
    planted = shared / "journal.db"
    assert as_attacker("sh", "-c", f"umask 0; : > {planted}").returncode == 0
    made = init(victim, shared)
    assert made.returncode == 0, made.stderr
    assert planted.stat().st_size == 0 and planted.stat().st_uid == _ids(ATTACKER)[0]
    assert (subfolder(victim, shared) / "journal.db").stat().st_size > 0


def test_a_folder_of_the_users_own_is_used_as_it_is_and_repair_leaves_its_mode(victim, world):
    mine = world / "mine"
    mine.mkdir()
    os.chown(mine, victim.uid, victim.gid)
    mine.chmod(0o755)  # theirs, readable by others: their choice
    assert init(victim, mine).returncode == 0
    assert (mine / "journal.db").exists() and not subfolder(victim, mine).exists()
    checked = victim.cli("observe", "doctor", env=_env(mine))
    assert checked.returncode == 0 and "0755 (want 0700)" in checked.stdout
    repaired = victim.cli("observe", "doctor", "--repair", env=_env(mine))
    assert repaired.returncode == 0, repaired.stderr
    assert _mode(mine) == 0o755 and f"chmod 700 {mine}" in repaired.stdout


def test_repair_tightens_the_private_subfolder_it_made(victim, world):
    shared = _shared(world)
    assert init(victim, shared).returncode == 0
    private = subfolder(victim, shared)
    private.chmod(0o755)
    repaired = victim.cli("observe", "doctor", "--repair", env=_env(shared))
    assert repaired.returncode == 0, repaired.stderr
    assert _mode(private) == 0o700 and _mode(shared) == 0o1777


# -- files the views write -------------------------------------------------------------------


@pytest.fixture
def a_run(cli, tmp_path) -> str:
    (tmp_path / "train.py").write_text("secret = 'code'\n")
    run_id = cli.ok("observe", "init", "--metric", "loss", "--source", "train.py").stdout.strip()
    cli.ok("observe", "log", "--run-id", run_id, "--step", "1", "--metrics", '{"loss": 1}')
    return run_id


OUTPUTS = {
    "report": lambda run, out: ["observe", "report", run, "-o", str(out)],
    "export --code": lambda run, out: ["observe", "export", run, "--code", "-o", str(out)],
    "export csv": lambda run, out: ["observe", "export", run, "-f", "csv", "-o", str(out)],
}


@pytest.mark.parametrize("what", list(OUTPUTS))
def test_reports_and_exports_are_written_0600_or_keep_the_mode_of_the_file_they_replace(cli, tmp_path, a_run, what):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out.file"
        cli.ok(*OUTPUTS[what](a_run, out))
        assert _mode(out) == 0o600
        out.chmod(0o644)  # the user shares it on purpose: later runs keep that
        cli.ok(*OUTPUTS[what](a_run, out))
        assert _mode(out) == 0o644 and out.stat().st_size > 0

        target = tmp_path / "elsewhere"
        target.write_text("untouched\n")
        link = tmp_path / "link.file"
        link.symlink_to(target)
        cli.ok(*OUTPUTS[what](a_run, link))
        assert target.read_text() == "untouched\n" and not link.is_symlink() and _mode(link) == 0o600
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    finally:
        os.umask(old)


def test_a_failed_export_leaves_no_file(cli, tmp_path, a_run):
    out = tmp_path / "x.json"
    failed = cli("observe", "export", "no-such-run", "-o", str(out))
    assert failed.returncode == 2 and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- the UI's Host check on every loopback address ------------------------------------------


class Server(UI):
    """``weco observe ui --host HOST``, asked with any ``Host`` header."""

    def __init__(self, cwd: Path, host: str):
        super().__init__(cwd, "--host", host)

    def get(self, path: str, host_header: str) -> int:
        return self.request(path, headers={"Host": host_header})[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "127.5.6.7", "::1"])
def test_every_loopback_address_refuses_a_foreign_host_header(tmp_path, a_run, host):
    try:
        server = Server(tmp_path, host)
    except AssertionError:
        if host == "::1":
            pytest.skip("no IPv6 loopback here")
        raise
    try:
        assert "WARNING" not in server.banner
        for foreign in (f"rebind.example:{server.port}", "rebind.example", f"10.0.0.5:{server.port}"):
            assert server.get("/api/runs", foreign) == 403, foreign
        shown = f"[{host}]" if ":" in host else host
        for own in (f"{shown}:{server.port}", f"localhost:{server.port}", "127.0.0.1"):
            assert server.get("/api/runs", own) == 200, own
    finally:
        server.stop()


@pytest.mark.browser
def test_a_page_whose_name_resolves_to_127_0_0_2_cannot_read_the_runs(tmp_path, a_run):
    """DNS rebinding in a real browser: Chromium resolves rebind.example to 127.0.0.2."""
    from test_report_browser import CHROMIUM_FLAGS, _browser_paths

    paths = _browser_paths()
    if paths is None:
        if os.environ.get("WECO_OBSERVE_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromedriver are not installed")
        pytest.skip("chromium and chromedriver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    server = Server(tmp_path, "127.0.0.2")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    options.add_argument("--host-resolver-rules=MAP rebind.example 127.0.0.2")
    driver = webdriver.Chrome(options=options, service=Service(paths[1]))
    driver.set_page_load_timeout(30)
    try:
        driver.get(f"http://rebind.example:{server.port}/api/runs")
        body = driver.find_element("tag name", "body").text
        assert "unexpected Host header" in body and a_run not in body
        driver.get(f"http://127.0.0.2:{server.port}/api/runs")
        assert a_run in driver.find_element("tag name", "body").text
    finally:
        driver.quit()
        server.stop()


# -- issue 9, item 5: another user plants spill files in the shared temp dir -----------------------


def test_another_user_cannot_inject_runs_through_the_fallback_spill_folder(victim: OtherUser, world: Path):
    """The attack from issue 9, as another local user would make it: in a shared temp dir (1777) the
    attacker pre-creates the victim's fallback spill folder ``weco-observe-spill-<uid>``, mode 0777, and
    drops a spill file there naming the victim's journal. Replaying it would put a run of the
    attacker's in the victim's journal, queued to sync with the victim's key. It is refused, with a
    warning, and left in place; the victim's own call is journaled as usual."""
    from weco_observe import ids

    shared_tmp = world / "tmp"
    shared_tmp.mkdir()
    shared_tmp.chmod(0o1777)
    planted = shared_tmp / f"weco-observe-spill-{victim.uid}"
    assert as_attacker("mkdir", "-m", "0777", str(planted)).returncode == 0
    journal = victim.home / "weco-data" / "journal.db"
    forged = {
        "op": "create_run",
        "journal": os.path.realpath(journal),
        "kwargs": {
            "source_code": {"evil.py": "import os  # the attacker's code\n"},
            "metric": "loss",
            "maximize": False,
            "name": "injected",
            "run_id": ids.new_run_id(),
            "event_id": ids.ulid(),
        },
    }
    (world / "forged.json").write_text(json.dumps(forged))
    (world / "forged.json").chmod(0o644)
    copied = as_attacker("cp", str(world / "forged.json"), str(planted / f"{ids.ulid()}.json"))
    assert copied.returncode == 0, copied.stderr
    env = {"TMPDIR": str(shared_tmp)}
    first = victim.cli("observe", "init", "--metric", "loss", "--source", "train.py", env=env)
    assert first.returncode == 0, first.stderr
    again = victim.cli("observe", "log", "--run-id", first.stdout.strip(), "--step", "1", env=env)
    assert again.returncode == 0, again.stderr
    runs = json.loads(victim.cli("observe", "runs", "--json", env=env).stdout)
    assert [r["name"] for r in runs] == [None] and "injected" not in json.dumps(runs)
    assert "spill" in first.stderr and str(planted) in first.stderr  # refused, with a warning naming it
    assert len(list(planted.glob("*.json"))) == 1  # left in place, not applied, not deleted
