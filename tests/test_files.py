"""The one atomic writer: all or nothing, and no debris, even after a kill."""

import os
import subprocess
import sys

import pytest

from hashrec.files import write_atomic, write_json_atomic, write_text_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"a": 1})

    def crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, crash)
    assert target.read_text() == '{\n  "a": 1\n}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_temporaries_of_killed_processes_are_swept(tmp_path):
    target = tmp_path / "metrics.md"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f".metrics.md.{int(dead.stdout)}.tmp"  # what a kill -9 mid-write leaves
    stale.write_text("half a table")
    alive = tmp_path / f".metrics.md.{os.getppid()}.tmp"  # a live writer's file is left alone
    alive.write_text("in progress")
    write_text_atomic(target, "| table |")
    assert target.read_text() == "| table |"
    assert not stale.exists() and alive.exists()


def test_a_folder_is_not_a_file_path(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_text_atomic(tmp_path, "x")
