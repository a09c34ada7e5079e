"""The provenance record of bench and soak results, on a throw-away git repository."""

from __future__ import annotations

import subprocess
from pathlib import Path

from nseh.provenance import Provenance


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def make_repo(path: Path) -> Path:
    git(path, "init", "-q")
    (path / "code.py").write_text("print('v1')\n")
    git(path, "add", "code.py")
    git(path, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "v1")
    return path


def test_a_clean_tree_is_recorded_with_its_commit(tmp_path: Path):
    repo = make_repo(tmp_path)
    record = Provenance.start(repo, ["nseh", "bench", "--quick"])
    assert record.commit == git(repo, "rev-parse", "HEAD")
    assert record.dirty is False and record.dirty_paths == []
    assert record.command == ["nseh", "bench", "--quick"]
    assert record.ended_utc is None
    assert record.machine["cores"] >= 1 and record.machine["kernel"]
    record.finish(accel="tcg")
    assert record.ended_utc >= record.started_utc and record.machine["accel"] == "tcg"
    lines = "\n".join(record.markdown())
    assert f"commit `{record.commit[:12]}`, clean tree" in lines
    assert "`nseh bench --quick`" in lines and "guest accel tcg" in lines


def test_changed_and_new_files_make_the_tree_dirty(tmp_path: Path):
    repo = make_repo(tmp_path)
    (repo / "code.py").write_text("print('v2')\n")
    (repo / "new.py").write_text("")
    record = Provenance.start(repo, ["nseh", "soak"])
    assert record.dirty is True and sorted(record.dirty_paths) == ["code.py", "new.py"]
    assert "**dirty tree** (" in "\n".join(record.finish().markdown())


def test_outside_a_git_checkout_the_commit_is_unknown(tmp_path: Path):
    record = Provenance.start(tmp_path, ["nseh", "soak"])
    assert record.commit is None and record.dirty is None
    assert "not a git checkout" in record.markdown()[0]
