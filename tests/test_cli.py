import json

import pytest

from hashrec.cli import main

from conftest import cli_error


def test_collisions_cli_writes_table_json_and_plot(tmp_path, capsys):
    csv = tmp_path / "videos.csv"
    csv.write_text("video_id,author_id\n" + "".join(f"{i},{1000 + i % 37}\n" for i in range(400)))
    out = tmp_path / "out"
    rc = main(
        [
            "collisions",
            "--csv",
            str(csv),
            "--column",
            "video_id:post",
            "--column",
            "author_id:author",
            "--buckets",
            "100,1000",
            "--hashes",
            "1,2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| video_id | phoenix-post | 399 |" in printed  # id 0 is padding: dropped
    assert "| author_id | phoenix-author | 37 |" in printed
    rows = json.loads((out / "collisions.json").read_text())
    assert len(rows) == 2 * 2 * 2 * 2
    assert (out / "collisions.png").stat().st_size > 1000
    assert not list(out.glob("*.tmp"))


@pytest.mark.parametrize(
    ("argv", "message", "code"),
    [
        (["collisions", "--csv", "missing.csv", "--column", "a"], "no such file", 1),
        (["collisions", "--column", "a"], "--column needs --csv", 2),
        (["collisions", "--sequential", "10", "--schemes", "md5"], "unknown scheme 'md5'", 2),
    ],
)
def test_collisions_cli_errors(argv, message, code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    err = cli_error(argv, capsys, code)
    assert err.startswith("hashrec collisions: error:") and message in err


def test_collisions_defaults_to_the_shipped_sample(tmp_path, capsys):
    rc = main(["collisions", "--buckets", "1000", "--hashes", "2", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| video_id | phoenix-post |" in out and "| author_id | phoenix-author |" in out


def test_unknown_option_and_bad_list(capsys):
    with pytest.raises(SystemExit) as e:
        main(["collisions", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["collisions", "--buckets", "a,b"])
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_missing_column_is_a_clear_error(tmp_path, capsys):
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n1,2\n")
    assert "nope" in cli_error(["collisions", "--csv", str(csv), "--column", "nope"], capsys, 1)
    csv.write_text("a\nx\ny\n")
    err = cli_error(["collisions", "--csv", str(csv), "--column", "a"], capsys, 1)
    assert "expected integers" in err


def test_threads_option_sets_torch_threads_and_rejects_zero(tmp_path, capsys, monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        args = ["evaluate", "--checkpoint", str(tmp_path / "none.safetensors"), "--threads"]
        err = cli_error([*args, "1"], capsys, 1)  # threads applied, then the missing file
        assert "no such checkpoint" in err and torch.get_num_threads() == 1
        assert "--threads must be >= 1" in cli_error([*args, "0"], capsys, 2)
    finally:
        torch.set_num_threads(before)
