"""Signed bundles: `bundle --sign KEYFILE`, `import --verify-key KEYFILE`, `sync --bundle FILE
--verify-key KEYFILE` and WECO_OBSERVE_BUNDLE_KEY, through the real CLI (issue 10 item 7).

The checksums catch damage, not a forger who recomputes them; a shared key does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from bundle_helpers import journal_rows, read_members, write_members
from emulator_fixtures import emulator  # noqa: F401
from test_bundle import Box, boxes, offline_work  # noqa: F401

from weco_observe import bundle
from weco_observe.errors import InvalidInput
from weco_observe.journal import Journal


def make_key(path: Path) -> Path:
    """A key file as docs/bundles.md says to make one: ``(umask 077; openssl rand -hex 32 > KEY)``."""
    if shutil.which("openssl"):
        subprocess.run(f"umask 077; openssl rand -hex 32 > '{path}'", shell=True, check=True)
    else:  # the documented alternative
        subprocess.run(
            f"umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > '{path}'", shell=True, check=True
        )
    return path


@pytest.fixture
def signed(boxes, tmp_path):  # noqa: F811
    """Box A's work, a key file, and a bundle signed with it."""
    a = boxes("a")
    offline_work(a)
    key = make_key(tmp_path / "site.key")
    out = a.ok("observe", "bundle", "--sign", str(key), "-o", str(tmp_path / "signed.weco"))
    assert "signed with key" in out.stdout
    return {"a": a, "key": key, "bundle": tmp_path / "signed.weco"}


def refused(result, why: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: bundle ") and "refused, nothing imported" in result.stderr, result.stderr
    assert why in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_signed_bundle_imports_with_its_key(signed, boxes):  # noqa: F811
    b = boxes("b")
    out = b.ok("observe", "import", "--verify-key", str(signed["key"]), str(signed["bundle"])).stdout
    assert "signature verified: key " in out
    assert b.state() == signed["a"].state()
    summary = json.loads(boxes("c").ok("observe", "import", str(signed["bundle"]), "--json").stdout)
    assert summary["signature"]["verified"] is False  # no key asked for: imported, not checked


def test_a_signed_bundle_is_still_format_1_with_its_five_members(signed):
    """The signature is in the zip's comment: a receiver that predates signing imports it unchecked."""
    with zipfile.ZipFile(signed["bundle"]) as zf:
        assert sorted(zf.namelist()) == sorted((*bundle.MEMBERS, bundle.MANIFEST))
        assert json.loads(zf.read(bundle.MANIFEST))["version"] == 1
        signature = json.loads(zf.comment)
    key_text = signed["key"].read_text().strip()
    assert signature["algorithm"] == "hmac-sha256" and len(signature["hmac"]) == 64
    assert key_text not in zf.comment.decode() and key_text not in signed["bundle"].read_bytes().hex()


def test_verify_key_refuses_an_unsigned_bundle_and_imports_nothing(signed, boxes, tmp_path):  # noqa: F811
    signed["a"].ok("observe", "bundle", "--all", "-o", str(tmp_path / "plain.weco"))
    b = boxes("b")
    b.ok("observe", "status")
    before = journal_rows(b.journal)
    refused(b("observe", "import", "--verify-key", str(signed["key"]), str(tmp_path / "plain.weco")), "is not signed")
    assert journal_rows(b.journal) == before


def test_verify_key_refuses_a_bundle_signed_with_another_key(signed, boxes, tmp_path):  # noqa: F811
    other = make_key(tmp_path / "other.key")
    refused(boxes("b")("observe", "import", "--verify-key", str(other), str(signed["bundle"])), "is signed with key")


def test_verify_key_refuses_a_signed_bundle_edited_with_its_checksums_recomputed(signed, boxes, tmp_path):  # noqa: F811
    """What the checksums cannot catch: a forger changes a step and recomputes every sha256; the
    signature, over the manifest that lists them, no longer matches."""
    members, manifest = read_members(signed["bundle"])
    for row in members["steps.jsonl"] + [e["payload"] for e in members["events.jsonl"]]:
        if row.get("metrics"):
            row["metrics"] = {"loss": 0.001}
    forged = tmp_path / "forged.weco"
    write_members(forged, members, manifest)
    with zipfile.ZipFile(signed["bundle"]) as src, zipfile.ZipFile(forged, "a") as dst:
        dst.comment = src.comment  # the original signature, carried over
    assert bundle.verify(forged)["counts"]  # without a key, the forgery passes every check
    b = boxes("b")
    refused(b("observe", "import", "--verify-key", str(signed["key"]), str(forged)), "signature does not match")
    assert not b.journal.exists() or journal_rows(b.journal)["events"] == []


@pytest.mark.parametrize(
    "problem, why",
    [
        ("readable by others", "has mode 0644, so others may read or change it: chmod 600"),
        ("group-writable", "has mode 0620"),
        ("owned by another user", "belongs to another user"),
        ("too short", "is not a bundle key: it must hold at least 64 hex digits"),
        ("not hex", "is not a bundle key"),
        ("missing", "no key file"),
        ("a directory", "is not a regular file"),
    ],
)
def test_a_key_file_others_could_read_or_that_is_no_key_is_refused(signed, boxes, tmp_path, problem, why):  # noqa: F811
    key = tmp_path / "bad.key"
    key.write_text(signed["key"].read_text())
    key.chmod(0o600)
    if problem == "readable by others":
        key.chmod(0o644)
    elif problem == "group-writable":
        key.chmod(0o620)
    elif problem == "owned by another user":
        if os.getuid() != 0:
            pytest.skip("only root can give a file away")
        os.chown(key, 1, 1)
    elif problem == "too short":
        key.write_text("ab" * 16 + "\n")
    elif problem == "not hex":
        key.write_text("z" * 64 + "\n")
    elif problem == "missing":
        key.unlink()
    else:
        key.unlink()
        key.mkdir()
    for result in (
        boxes("b")("observe", "import", "--verify-key", str(key), str(signed["bundle"])),
        signed["a"]("observe", "bundle", "--all", "--sign", str(key), "-o", str(tmp_path / "x.weco")),
    ):
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and why in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.weco").exists()


def test_a_site_can_insist_on_signatures_with_an_environment_variable(signed, boxes, tmp_path):  # noqa: F811
    signed["a"].ok("observe", "bundle", "--all", "-o", str(tmp_path / "plain.weco"))
    b = boxes("b")
    b.env["WECO_OBSERVE_BUNDLE_KEY"] = str(signed["key"])
    refused(b("observe", "import", str(tmp_path / "plain.weco")), "is not signed")
    assert "signature verified" in b.ok("observe", "import", str(signed["bundle"])).stdout


def test_sync_bundle_verify_key(signed, boxes, tmp_path, emulator):  # noqa: F811
    signed["a"].ok("observe", "bundle", "--all", "-o", str(tmp_path / "plain.weco"))
    b = boxes("b")
    env = {**b.env, **emulator.env()}
    key = str(signed["key"])
    refused(
        b.cli("observe", "sync", "--bundle", str(tmp_path / "plain.weco"), "--verify-key", key, env=env), "not signed"
    )
    assert emulator.stats().get("requests", 0) == 0
    done = b.cli("observe", "sync", "--bundle", str(signed["bundle"]), "--verify-key", key, env=env)
    assert done.returncode == 0, done.stderr
    assert "signature verified" in done.stderr and emulator.stats()["created_runs"] == 1
    alone = b.cli("observe", "sync", "--verify-key", key, env=env)
    assert alone.returncode == 2 and "--verify-key checks --bundle files" in alone.stderr


def test_the_library_signs_and_verifies(tmp_path):
    key = make_key(tmp_path / "k")
    with Journal(tmp_path / "a" / "journal.db") as a:
        a.create_run(source_code={"m.py": "y = 1\n"}, metric="acc")
        assert bundle.write_bundle(a, tmp_path / "s.weco", sign=key)["signed_by"] == bundle.load_key(key).id
    assert bundle.verify(tmp_path / "s.weco", verify_key=key)["counts"]["runs"] == 1
    with Journal(tmp_path / "b" / "journal.db") as b:
        assert bundle.import_bundle(b, tmp_path / "s.weco", verify_key=key)["signature"]["verified"]
    with pytest.raises(InvalidInput, match="no key file"):
        bundle.load_key(tmp_path / "nope")
