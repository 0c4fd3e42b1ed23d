"""Decompression bombs and other resource attacks on `import` (issue 10 item 6).

Each bomb is a real one (``zipbombs.py``: well-formed zip and zlib streams with
correct CRCs, which ``unzip`` would inflate in full), built from a real bundle
with every other member intact. Each is imported in a fresh process, so that
its peak memory can be measured: a wrapper process runs the import and reads
``resource.getrusage(RUSAGE_CHILDREN)``, which then covers that one import and
nothing else. Every bomb must be refused with a one-line BundleInvalid in well
under a second and under 100 MB, and leave the journal as it was.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import run_with_steps
from zipbombs import Deflated, Member, deflate, deflate_repeat, store, write_zip

from weco_observe import bundle, codestore
from weco_observe.errors import InvalidInput
from weco_observe.journal import Journal

GiB, MiB = 1 << 30, 1 << 20
#: what "refused in well under a second and 100 MB" means here (the process alone takes ~40 MB)
MAX_SECONDS, MAX_RSS_MB = 0.5, 100

#: imports one bundle into a fresh journal; prints how long the import took (wall and CPU: the
#: limit is on CPU, which the other test runs sharing the box do not inflate), what it raised
#: and whether any table changed (every row of every table, before and after)
CHILD = r"""
import json, sqlite3, sys, time
from weco_observe import bundle, codestore
from weco_observe.errors import InvalidInput
from weco_observe.journal import Journal

def rows(path):
    conn = sqlite3.connect(path)
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    out = {t: sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"'))) for t in tables}
    conn.close()
    return out

with Journal(sys.argv[2]) as journal:
    before = rows(journal.path)
    start, cpu = time.perf_counter(), time.process_time()
    try:
        bundle.import_bundle(journal, sys.argv[1])
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu": cpu, "error": error, "unchanged": rows(journal.path) == before}))
"""

#: runs CHILD and reports its peak RSS: RUSAGE_CHILDREN of this wrapper covers that one child only
WRAPPER = r"""
import json, resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"stdout": done.stdout, "stderr": done.stderr,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def import_in_a_fresh_process(path: Path, journal: Path) -> dict:
    wrapped = subprocess.run(
        [sys.executable, "-c", WRAPPER, sys.executable, "-c", CHILD, str(path), str(journal)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    outer = json.loads(wrapped.stdout)
    assert outer["stdout"], outer["stderr"]
    return {**json.loads(outer["stdout"]), "maxrss_mb": outer["maxrss_mb"]}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[dict[str, bytes], dict]:
    """The members and manifest of a real bundle: a run with code changes over a few steps."""
    root = tmp_path_factory.mktemp("good")
    with Journal(root / "a" / "journal.db") as a:
        run_with_steps(
            a, 5, name="exp", source={"train.py": "lr = 0.1\n" * 40},
            code=lambda i: {"train.py": f"lr = {i}\n" + "lr = 0.2\n" * 40},
        )  # fmt: skip
        bundle.write_bundle(a, root / "a.weco")
    with zipfile.ZipFile(root / "a.weco") as zf:
        members = {n: zf.read(n) for n in bundle.MEMBERS}
        return members, json.loads(zf.read(bundle.MANIFEST))


def assemble(
    path: Path,
    good: tuple[dict[str, bytes], dict],
    replace: dict[str, Member | bytes],
    *,
    described: dict[str, dict] | None = None,
    extra: list[Member] = (),
) -> Path:
    """A bundle of ``good``'s members with some replaced. The manifest describes every member as a
    forger would: the true sha256, size and line count where they are cheap to compute, else
    ``described[name]`` (the size its header declares); its own checksum is always recomputed."""
    members, manifest = good
    manifest = json.loads(json.dumps(manifest))
    zipped = []
    for name in bundle.MEMBERS:
        new = replace.get(name, members[name])
        if isinstance(new, bytes):
            manifest["members"][name] = {
                "sha256": hashlib.sha256(new).hexdigest(),
                "bytes": len(new),
                "lines": new.count(b"\n"),
            }
            zipped.append(Member(name, deflate(new)))
        else:
            manifest["members"][name] = described[name]
            zipped.append(new)
    manifest["checksum"] = bundle._manifest_checksum(manifest)
    zipped.append(replace.get(bundle.MANIFEST) or Member(bundle.MANIFEST, deflate(json.dumps(manifest).encode())))
    write_zip(path, zipped + list(extra))
    return path


def claims(size: int, lines: int = 1) -> dict:
    """A manifest's description of a member too big to hash here (the check that stops it runs first)."""
    return {"sha256": "0" * 64, "bytes": size, "lines": lines}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def two_gib_of_spaces(head: bytes, tail: bytes = b"") -> Deflated:
    return deflate_repeat(head, b" " * (16 * MiB), 128, tail)


def manifest_bomb(path: Path, good) -> Path:
    return assemble(path, good, {bundle.MANIFEST: Member(bundle.MANIFEST, two_gib_of_spaces(b'{"pad": "', b'"}'))})


def manifest_bomb_lying(path: Path, good) -> Path:
    body = two_gib_of_spaces(b'{"pad": "', b'"}')
    return assemble(path, good, {bundle.MANIFEST: Member(bundle.MANIFEST, body, declared=1024)})


def member_bomb(path: Path, good) -> Path:
    line = good[0]["events.jsonl"].splitlines(keepends=True)[0]
    body = deflate_repeat(b"", line * (MiB // len(line)), 2048)
    events = Member("events.jsonl", body)
    return assemble(path, good, {"events.jsonl": events}, described={"events.jsonl": claims(body.size, 2 * GiB)})


def member_header_lies(path: Path, good, ratio: int) -> Path:
    """events.jsonl inflates to 2 GiB (one line) while its headers, and the manifest, claim ``ratio`` times
    its compressed size: just under the inflation cap, or (ratio 0) a mere KiB."""
    body = two_gib_of_spaces(b'{"id": "')
    declared = ratio * len(body.data) or 1024
    events = Member("events.jsonl", body, declared=declared)
    return assemble(path, good, {"events.jsonl": events}, described={"events.jsonl": claims(declared)})


def enormous_line(path: Path, good) -> Path:
    """One 200 MiB line that compresses only ~40 times: no inflation cap can tell it from data."""
    unit = b64(os.urandom(48)).encode() + b" " * 2500
    body = deflate_repeat(b'{"id": "', unit, 200 * MiB // len(unit), b'"}\n')
    assert 20 < body.size / len(body.data) < 100  # bundle.MAX_RATIO
    events = Member("events.jsonl", body)
    return assemble(path, good, {"events.jsonl": events}, described={"events.jsonl": claims(body.size)})


def nested_member(path: Path, good) -> Path:
    return assemble(path, good, {"events.jsonl": b"[" * 1_000_000 + b"\n"})


def nested_manifest(path: Path, good) -> Path:
    return assemble(path, good, {bundle.MANIFEST: Member(bundle.MANIFEST, deflate(b"[" * 1_000_000))})


def many_members(path: Path, good) -> Path:
    junk = [Member(f"junk/{i:05d}", deflate(b"x")) for i in range(20_000)]
    return assemble(path, good, {}, extra=junk)


def _blob_bomb(good, declare_size: bool) -> tuple[Member, dict]:
    """blobs.jsonl whose first blob's zlib data inflates to 2 GiB; its declared size is its real text's
    (small), or (``declare_size``) the 2 GiB it inflates to."""
    lines = good[0]["blobs.jsonl"].splitlines(keepends=True)
    doc = json.loads(lines[0])
    bomb = deflate_repeat(b"", b"\n" * (16 * MiB), 128)
    doc.update(data=b64(bomb.zlib()), base=None, depth=0, prefix=0, suffix=0)
    if declare_size:
        doc["size"] = bomb.size
    blobs = json.dumps(doc).encode() + b"\n" + b"".join(lines[1:])
    # Stored, not deflated: a deflated bomb is itself repetitive enough that blobs.jsonl's own
    # inflation cap would stop it before the blob check this is for.
    return Member("blobs.jsonl", store(blobs), method=0), {
        "sha256": hashlib.sha256(blobs).hexdigest(),
        "bytes": len(blobs),
        "lines": len(lines),
    }


def blob_bomb(path: Path, good, declare_size: bool) -> Path:
    member, described = _blob_bomb(good, declare_size)
    return assemble(path, good, {"blobs.jsonl": member}, described={"blobs.jsonl": described})


BOMBS: dict[str, Callable[[Path, tuple], Path]] = {
    "manifest.json inflates to 2 GiB": manifest_bomb,
    "manifest.json inflates to 2 GiB, its header says 1 KiB": manifest_bomb_lying,
    "events.jsonl inflates to 2 GiB": member_bomb,
    "events.jsonl inflates to 2 GiB, its header says just under the cap": lambda p, g: member_header_lies(
        p,
        g,
        99,  # bundle.MAX_RATIO is 100
    ),
    "events.jsonl inflates to 2 GiB, its header says 1 KiB": lambda p, g: member_header_lies(p, g, 0),
    "a single 200 MiB line": enormous_line,
    "JSON nested a million deep": nested_member,
    "a manifest nested a million deep": nested_manifest,
    "20,000 members": many_members,
    "a blob inflates to 2 GiB past its declared size": lambda p, g: blob_bomb(p, g, declare_size=False),
    "a blob declares the 2 GiB it inflates to": lambda p, g: blob_bomb(p, g, declare_size=True),
}


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_a_bomb_is_refused_fast_in_little_memory(tmp_path, good, bomb):
    path = BOMBS[bomb](tmp_path / "bomb.weco", good)
    assert path.stat().st_size < 16 * MiB
    got = import_in_a_fresh_process(path, tmp_path / "b" / "journal.db")
    print(
        f"{bomb}: {got['seconds']:.3f} s ({got['cpu']:.3f} s CPU), {got['maxrss_mb']:.0f} MB peak RSS: {got['error']}"
    )
    assert (
        got["error"]
        and got["error"].startswith("BundleInvalid: bundle ")
        and "refused, nothing imported" in got["error"]
    )
    assert "\n" not in got["error"] and len(got["error"]) < 1000
    assert got["unchanged"]
    assert got["cpu"] < MAX_SECONDS, got
    assert got["maxrss_mb"] < MAX_RSS_MB, got


def test_the_cli_refuses_a_bomb_in_one_line(tmp_path, good, cli):
    path = manifest_bomb(tmp_path / "bomb.weco", good)
    result = cli("observe", "import", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: bundle {path} refused, nothing imported: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_good_bundle_these_bombs_are_made_from_imports(tmp_path, good):
    """The bombs differ from a bundle that imports only in what makes them bombs."""
    path = assemble(tmp_path / "same.weco", good, {})
    got = import_in_a_fresh_process(path, tmp_path / "b" / "journal.db")
    assert got["error"] is None and not got["unchanged"]


def _delta(base: bytes, middle: bytes) -> tuple[bytes, dict]:
    """A delta appending ``middle`` to ``base``: its text, and its row without hash/depth/base."""
    text = base + middle
    return text, {"size": len(text), "prefix": len(base), "suffix": 0, "data": b64(zlib.compress(middle))}


def delta_tree(root_text: bytes, levels: int) -> list[dict]:
    """blobs.jsonl rows: a full copy, then ``levels`` deltas each on the last, every one with a
    sibling leaf listed first (so a depth-first check keeps each level's base alive for it)."""
    root = {"hash": hashlib.sha256(root_text).hexdigest(), "size": len(root_text), "base": None, "depth": 0}
    rows = [{**root, "prefix": 0, "suffix": 0, "data": b64(zlib.compress(root_text))}]
    base, base_row = root_text, rows[0]
    for depth in range(1, levels + 1):
        for middle in (f"leaf {depth}\n".encode(), f"level {depth}\n".encode()):
            text, row = _delta(base, middle)
            rows.append({**row, "hash": hashlib.sha256(text).hexdigest(), "base": base_row["hash"], "depth": depth})
        base, base_row = text, rows[-1]
    return rows


def with_blobs(path: Path, good, rows: list[dict]) -> Path:
    members, manifest = good
    blobs = good[0]["blobs.jsonl"] + b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    manifest = {**manifest, "counts": {**manifest["counts"], "blobs": manifest["counts"]["blobs"] + len(rows)}}
    return assemble(path, (members, manifest), {"blobs.jsonl": blobs})


def test_a_deep_bushy_tree_of_deltas_over_one_large_text_is_checked_in_bounded_memory(tmp_path, good):
    """Valid, and shaped like a bomb: 63 versions of an 8 MiB text, as deltas 31 deep. Checking
    each text holds it as slices of its chain, so the large text is in memory once, not 32 times."""
    rows = delta_tree(b"x = 1\n" * (8 * MiB // 6), levels=31)
    path = with_blobs(tmp_path / "tree.weco", good, rows)
    assert path.stat().st_size < MiB
    got = import_in_a_fresh_process(path, tmp_path / "b" / "journal.db")
    assert got["error"] is None
    assert got["maxrss_mb"] < MAX_RSS_MB, got


def test_a_delta_chain_deeper_than_a_journal_makes_is_refused(tmp_path, good):
    rows = delta_tree(b"x = 1\n", levels=codestore.MAX_DEPTH + 1)
    path = with_blobs(tmp_path / "deep.weco", good, rows)
    with Journal(tmp_path / "b" / "journal.db") as b:
        with pytest.raises(bundle.BundleInvalid, match="delta depth that does not fit"):
            bundle.import_bundle(b, path)
        assert b.query("SELECT count(*) FROM blobs")[0][0] == 0


@pytest.mark.parametrize("kind", ["a FIFO", "a character device", "a directory"])
def test_a_file_that_is_not_a_regular_file_is_refused_without_reading(tmp_path, cli, kind):
    target = tmp_path / "bundle.weco"
    if kind == "a FIFO":
        os.mkfifo(target)  # nothing ever writes to it: opening it for reading would wait forever
    elif kind == "a directory":
        target.mkdir()
    else:
        target = Path("/dev/zero")
    result = cli("observe", "import", str(target), timeout=30)
    assert result.returncode == 2, result.stderr
    if kind == "a directory":
        assert result.stderr == f"error: {target} is a directory, not a bundle file\n"
    else:
        assert result.stderr == f"error: bundle {target} refused, nothing imported: it is not a regular file\n"


def test_a_bundle_with_other_data_around_it_is_refused_before_it_is_copied(tmp_path, good, cli):
    """A zip may sit at the end of any file (a self-extracting archive): import would copy all of it."""
    path = assemble(tmp_path / "good.weco", good, {})
    padded = tmp_path / "padded.weco"
    padded.write_bytes(os.urandom(4 * MiB) + path.read_bytes())
    assert zipfile.ZipFile(padded).testzip() is None  # still a zip, to zipfile
    result = cli("observe", "import", str(padded))
    assert result.returncode == 2 and "belong to no member" in result.stderr, result.stderr
    assert not list((tmp_path / "weco-data").glob(".import-*"))


def test_a_member_compressed_with_another_method_is_refused(tmp_path, good):
    """LZMA's decoder allocates the dictionary size its header asks for (up to 1.5 GiB): only deflate is read."""
    members, manifest = good
    path = tmp_path / "lzma.weco"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_LZMA) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(bundle.MANIFEST, json.dumps(manifest))
    with pytest.raises(bundle.BundleInvalid, match="compressed with method 14, not deflate"):
        bundle.verify(path)


def test_the_writer_refuses_a_line_import_would_refuse(tmp_path, monkeypatch):
    """Refused before the air gap, with no file left behind, rather than on the far side of it."""
    with Journal(tmp_path / "a" / "journal.db") as a:
        a.create_run(source_code={"big.py": "x = 1\n" * 400}, metric="loss")
        bundle.write_bundle(a, tmp_path / "fits.weco")
        monkeypatch.setattr(bundle, "MAX_LINE", 300)
        with pytest.raises(bundle.BundleInvalid, match="line 1 is over"):
            bundle.verify(tmp_path / "fits.weco")
        with pytest.raises(InvalidInput, match=r"cannot bundle: a row of \w+\.jsonl is 0 MiB, over the 0 MiB"):
            bundle.write_bundle(a, tmp_path / "too-long.weco", everything=True)
    assert not list(tmp_path.glob("*too-long.weco*"))


def test_the_writer_refuses_a_code_file_that_inflates_like_a_bomb(tmp_path):
    """A 17 MiB file of blank lines compresses a thousand times: import would take it for a bomb."""
    with Journal(tmp_path / "a" / "journal.db") as a:
        a.create_run(source_code={"blank.txt": "\n" * (17 * MiB)}, metric="loss")
        with pytest.raises(InvalidInput, match="cannot bundle code blob .* would inflate 1\\d\\d\\d times"):
            bundle.write_bundle(a, tmp_path / "a.weco")
    assert not list(tmp_path.glob("*.weco")) and not list(tmp_path.glob(".*.tmp"))
