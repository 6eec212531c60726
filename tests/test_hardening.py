"""Misuse of the CLI and the training loop: every case refused with a clear error, nothing lost."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_train import TINY, _setup

from hashrec.cli import main
from hashrec.training import checkpoint as ckpt
from hashrec.training.runlock import LOCK_NAME, RunLock, RunLockedError

from conftest import SCHEMA_JSON, cli_error


def _train_argv(log_file, out, *extra, schema=SCHEMA_JSON):
    return ["train", "--data", str(log_file), "--schema", schema, "--train-end", "2022-04-28",
            "--eval-start", "2022-04-29", "--out", str(out), *TINY, *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--table-lr", "nan"),
        ("--table-lr", "-1"), ("--table-fraction", "inf"), ("--table-fraction", "nan"),
        ("--slate-window", "-5"), ("--slate-window", "nan"), ("--seed", "-1"),
        ("--heads", "0"), ("--kv-heads", "0"), ("--dim", "0"), ("--epochs", "0"),
        ("--batch-size", "0"), ("--history-len", "-1"), ("--negatives", "-2"),
    ],
)  # fmt: skip
def test_bad_flags_are_usage_errors_before_anything_is_written(log_file, tmp_path, capsys, flag,
                                                                value):  # fmt: skip
    out = tmp_path / "run"
    err = cli_error(_train_argv(log_file, out, flag, value), capsys, 2)
    assert f"argument {flag}: expected" in err and not out.exists()


@pytest.mark.parametrize(
    ("schema", "code", "message"),
    [
        ("null", 2, "--schema: expected a JSON object mapping columns, got NoneType"),
        ("[1,2]", 2, "--schema: expected a JSON object mapping columns, got list"),
        ('{"user": "uid",', 2, "--schema: not valid JSON"),
        (SCHEMA_JSON[:-1] + ', "id_offset": "a"}', 2, "--schema: id_offset must be an integer"),
        ("missing.json", 1, "--schema missing.json: no such file"),
    ],
)
def test_schema_option(log_file, tmp_path, capsys, monkeypatch, schema, code, message):
    monkeypatch.chdir(tmp_path)
    err = cli_error(_train_argv(log_file, tmp_path / "r", schema=schema), capsys, code)
    assert message in err and not (tmp_path / "r").exists()


def test_schema_file_errors_name_the_file(log_file, tmp_path, capsys):
    bad = tmp_path / "schema.json"
    bad.write_text('{"user": ')
    err = cli_error(_train_argv(log_file, tmp_path / "r", schema=str(bad)), capsys, 2)
    assert f"--schema {bad}: not valid JSON" in err


def test_data_problems_have_clear_messages(log_file, tmp_path, capsys):
    err = cli_error(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")],
                    capsys, 1)  # fmt: skip
    assert "--data " + str(tmp_path / "nope") + ": no such file or folder" in err
    ms = SCHEMA_JSON.replace('"time_unit": "s"', '"time_unit": "ms"')
    seconds = SCHEMA_JSON
    text = log_file.read_text().splitlines()  # times in seconds; make them milliseconds
    rows = [r.split(",") for r in text[1:]]
    for r in rows:
        r[4] = str(int(r[4]) * 1000)
    log_file.write_text("\n".join([text[0], *(",".join(r) for r in rows)]) + "\n")
    err = cli_error(_train_argv(log_file, tmp_path / "r", schema=seconds), capsys, 1)
    assert "is after the year 2100; is the column in 'ms'" in err
    rows[5][3] = "16"  # a surface the ranker has no embedding for
    log_file.write_text("\n".join([text[0], *(",".join(r) for r in rows)]) + "\n")
    err = cli_error(_train_argv(log_file, tmp_path / "r", schema=ms), capsys, 1)
    assert "surface column holds 16" in err and "16 product surfaces" in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_out_paths(log_file, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("precious")
    err = cli_error(_train_argv(log_file, a_file), capsys, 2)
    assert f"--out {a_file} is a file, expected a folder" in err
    err = cli_error(["collisions", "--sequential", "10", "--out", str(a_file)], capsys, 2)
    assert "is a file, expected a folder" in err
    assert a_file.read_text() == "precious"
    err = cli_error(["evaluate", "--checkpoint", "x.safetensors", "--out", str(tmp_path)],
                    capsys, 2)  # fmt: skip
    assert f"--out {tmp_path} is a folder, expected a file path" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sequential", "-5"], "argument --sequential: expected an integer >= 0, got -5"),
        (["--random", "-1"], "argument --random: expected an integer >= 0"),
        (["--sequential", "10", "--hashes", "3", "--schemes", "phoenix"], "Phoenix has 2 hashes"),
        (["--sequential", "10", "--buckets", "1"], "every N must be >= 2"),
        (["--sequential", "10", "--hashes", "0"], "every k must be >= 1"),
    ],
)
def test_collisions_refuses_before_writing(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    err = cli_error(["collisions", *argv, "--out", str(out)], capsys, 2)
    assert message in err and not out.exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(log_file, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    from hashrec.training import trainer as trainer_module
    from hashrec.training.trainer import NonFiniteError

    log, hashes, req, tr = _setup(log_file, tmp_path)  # checkpoint every 3 steps
    real, calls = trainer_module.loss_terms, []

    def loss_goes_nan(*args, **kw):
        calls.append(1)
        out = real(*args, **kw)
        nan = out.bce_sum * float("nan")
        return dataclasses.replace(out, bce_sum=nan) if len(calls) == 5 else out

    monkeypatch.setattr(trainer_module, "loss_terms", loss_goes_nan)
    with pytest.raises(NonFiniteError, match=r"step 5: the loss is nan .* checkpoint \(step 3\)"):
        tr.fit(log, hashes, req)
    model, info = ckpt.load_checkpoint(tr.checkpoint_path)  # finite, loadable
    assert info.train_state.global_step == 3
    # weights that went non-finite are never checkpointed either
    with torch.no_grad():
        next(tr.model.parameters()).fill_(float("inf"))
    before = tr.checkpoint_path.read_bytes()
    with pytest.raises(NonFiniteError, match="holds NaN or infinite values"):
        tr.save()
    assert tr.checkpoint_path.read_bytes() == before


def test_evaluate_refuses_a_non_finite_checkpoint(log_file, tmp_path, capsys):
    _, _, _, tr = _setup(log_file, tmp_path)
    with torch.no_grad():
        next(tr.model.parameters())[0] = float("nan")
    ckpt.save_checkpoint(tmp_path / "nan.safetensors", tr.model)
    argv = ["evaluate", "--checkpoint", str(tmp_path / "nan.safetensors"), "--data",
            str(log_file), "--schema", SCHEMA_JSON, "--train-end", "2022-04-28", "--out",
            str(tmp_path / "e.json")]  # fmt: skip
    assert "holds NaN or infinite values" in cli_error(argv, capsys, 1)
    assert not (tmp_path / "e.json").exists()


def test_resume_refuses_settings_that_change_training(log_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_argv(log_file, out)) == 0
    config = (out / "config.json").read_bytes()
    weights = (out / "checkpoint.safetensors").read_bytes()
    for flag, value, key in [
        ("--batch-size", "8", "train.batch_size: 16 in the checkpoint, 8 now"),
        ("--lr", "0.01", "train.lr: 0.002 in the checkpoint, 0.01 now"),
        ("--history-len", "4", "examples.history_len: 6 in the checkpoint, 4 now"),
        ("--dim", "16", "model_config.transformer.dim: 8 in the checkpoint, 16 now"),
        ("--train-end", "2022-04-27", "split.train_end: 20220428 in the checkpoint, 20220427"),
        ("--epochs", "1", "train.epochs: 1 now, but the checkpoint has started epoch 2"),
    ]:
        err = cli_error(_train_argv(log_file, out, "--resume", flag, value), capsys, 1)
        assert "cannot resume with settings that change training" in err and key in err, err
        assert (out / "config.json").read_bytes() == config  # decided before any write
        assert (out / "checkpoint.safetensors").read_bytes() == weights
    # the data changed: its fingerprint differs
    text = log_file.read_text().splitlines()
    log_file.write_text("\n".join([text[0], *text[2:]]) + "\n")
    err = cli_error(_train_argv(log_file, out, "--resume"), capsys, 1)
    assert "data: " in err
    log_file.write_text("\n".join(text) + "\n")
    # settings that may change: more epochs continue the finished run; evaluation days
    assert main(_train_argv(log_file, out, "--resume", "--epochs", "3", "--eval-end",
                            "2022-04-30")) == 0  # fmt: skip
    state = ckpt.read_checkpoint_metadata(out / "checkpoint.safetensors")["train_state"]
    assert state["epoch"] == 3 and state["done"]
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 3


def test_resume_without_a_checkpoint_says_so(log_file, tmp_path, capsys):
    assert main(_train_argv(log_file, tmp_path / "fresh", "--resume")) == 0
    assert "holds no checkpoint yet; training from the start" in capsys.readouterr().out


def test_run_folder_lock(log_file, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hashrec.training.runlock import RunLock;"
         f"RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        err = cli_error(_train_argv(log_file, out), capsys, 1)
        assert f"is in use by process {holder.pid}" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing else written
    finally:
        holder.kill()
        holder.wait()
    # the killed holder left its lock file: the next run takes it over with a notice
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)
    assert main(_train_argv(log_file, out)) == 0
    printed = capsys.readouterr().out
    assert f"was left by process {holder.pid}, which no longer holds it; taking it over" in printed
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_run_lock_in_process(tmp_path):
    heard = []
    with RunLock(tmp_path, say=heard.append):
        with pytest.raises(RunLockedError, match=f"in use by process {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert heard == [] and not (tmp_path / LOCK_NAME).exists()


def test_evaluate_refuses_train_end_before_the_checkpoints(log_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_argv(log_file, out, "--epochs", "1")) == 0
    argv = ["evaluate", "--checkpoint", str(out / "checkpoint.safetensors"), "--data",
            str(log_file), "--schema", SCHEMA_JSON, "--eval-start", "2022-04-29", "--out",
            str(tmp_path / "e.json")]  # fmt: skip
    err = cli_error([*argv, "--train-end", "2022-04-27"], capsys, 2)
    assert "--train-end 20220427 is before the checkpoint's last training day 20220428" in err
    assert not (tmp_path / "e.json").exists()


def test_evaluate_creates_its_out_folder_and_refuses_a_retriever(log_file, tmp_path, capsys,
                                                                monkeypatch):  # fmt: skip
    """The default --out (runs/evaluate/metrics.json) lands in a folder that does not exist yet;
    a checkpoint of another model class is named as such, before any work."""
    out = tmp_path / "run"
    assert main(_train_argv(log_file, out, "--epochs", "1")) == 0
    monkeypatch.chdir(tmp_path)
    argv = ["evaluate", "--checkpoint", str(out / "checkpoint.safetensors"), "--data",
            str(log_file), "--schema", SCHEMA_JSON, "--eval-start", "2022-04-29"]  # fmt: skip
    assert main(argv) == 0
    assert "results" in json.loads((tmp_path / "runs/evaluate/metrics.json").read_text())
    tt = tmp_path / "tt"
    assert main(["train-retrieval", "--data", str(log_file), "--schema", SCHEMA_JSON, "--dim",
                 "8", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--history-len", "4",
                 "--batch-size", "16", "--epochs", "1", "--train-end", "2022-04-28",
                 "--eval-start", "2022-04-29",
                 "--out", str(tt)]) == 0  # fmt: skip
    argv[2] = str(tt / "checkpoint.safetensors")
    err = cli_error([*argv, "--out", str(tmp_path / "e.json")], capsys, 1)
    assert "holds a TwoTowerRetriever, expected a PhoenixRanker" in err
    assert not (tmp_path / "e.json").exists()


def test_val_days_beyond_the_training_days_names_the_option(log_file, tmp_path, capsys):
    err = cli_error(_train_argv(log_file, tmp_path / "run", "--val-days", "100"), capsys, 1)
    assert "val_days (--val-days) 100 leaves no training day" in err and "at most" in err
    assert not (tmp_path / "run").exists()  # refused before anything is written
    err = cli_error(_train_argv(log_file, tmp_path / "dev", "--device", "foo"), capsys, 1)
    assert "device must be cpu or cuda[:N], got 'foo'" in err


# ---- checkpoint metadata edits -----------------------------------------------------------------


def _edit(path, tmp_path, edit, redigest=True):
    """Copy of the checkpoint with ``edit(meta)`` applied (and the digest recomputed)."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    edit(meta)
    if redigest:
        tensors[ckpt._DIGEST] = ckpt._digest(meta)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, str(out), metadata=meta)
    return out


def _set(key, *path_value):
    def edit(meta):
        d = json.loads(meta[key])
        *path, value = path_value
        node = d
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        meta[key] = json.dumps(d)

    return edit


@pytest.mark.parametrize(
    ("edit", "redigest", "message"),
    [
        (_set("model_config", "hash", "entities", 0, "seed", 7), False, "does not match the dig"),
        (_set("extra", "train", "lr", 0.5), False, "does not match the digest"),
        (_set("model_config", "transformer", "dim", 16), True, "weights do not fit the stored"),
        (_set("model_config", "hash", "entities", 1, "num_buckets", 64), True, "do not fit"),
        (_set("model_config", "transformer", "num_layers", 2), True, "do not fit the stored"),
        (lambda meta: meta.pop("train_state"), False, "metadata lacks ['train_state']"),
        (_set("model_config", "transformer", "num_q_heads", 0), True, "num_q_heads must be >= 1"),
    ],
)
def test_edited_checkpoint_metadata_is_refused(log_file, tmp_path, edit, redigest, message):
    _, _, _, tr = _setup(log_file, tmp_path)
    tr.save()
    edited = _edit(tr.checkpoint_path, tmp_path, edit, redigest)
    with pytest.raises(ValueError, match=re.escape(message)):
        ckpt.load_checkpoint(edited)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr", float("nan"), "lr must be a finite number > 0, got nan"),
        ("table_lr", float("inf"), "table_lr must be a finite number > 0, got inf"),
        ("weight_decay", -0.1, "weight_decay must be a finite number >= 0"),
        ("seed", -1, "need seed >= 0"),
    ],
)
def test_train_config_refuses_bad_values(field, value, message):
    from hashrec.training.trainer import TrainConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("command", ["train", "train-retrieval"])
@pytest.mark.parametrize("device", ["foo", "cuda"])
def test_a_device_the_machine_lacks_fails_before_the_run_folder_is_made(
    log_file, tmp_path, capsys, command, device
):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    argv = [command, "--data", str(log_file), "--schema", SCHEMA_JSON, "--train-end",
            "2022-04-28", "--eval-start", "2022-04-29", "--out", str(out), "--device", device]  # fmt: skip
    err = cli_error(argv, capsys, 1)
    assert ("cpu or cuda[:N], got 'foo'" if device == "foo" else "CUDA is not available") in err
    assert not out.exists()
