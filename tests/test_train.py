import json

import numpy as np
import pytest
import torch

from hashrec import HashConfig, PhoenixRanker, RankerConfig, TransformerConfig
from hashrec.cli import main
from hashrec.data import ExampleConfig, LogSchema, load_log
from hashrec.training.checkpoint import load_checkpoint, save_checkpoint
from hashrec.training.trainer import TrainConfig

from conftest import SCHEMA_JSON, cli_error
from dist_worker import tiny_trainer

TINY = [
    "--dim",
    "8",
    "--layers",
    "1",
    "--heads",
    "2",
    "--kv-heads",
    "1",
    "--history-len",
    "6",
    "--max-candidates",
    "4",
    "--batch-size",
    "16",
    "--epochs",
    "2",
    "--seeds",
    "1",
]


def _setup(log_file, tmp_path, max_steps=None, **train):
    return tiny_trainer(log_file, tmp_path, max_steps=max_steps, checkpoint_every=3, **train)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_continues_exactly(log_file, tmp_path, schedule):
    log, hashes, req, straight = _setup(log_file, tmp_path / "a", lr_schedule=schedule)
    straight.fit(log, hashes, req)
    total = straight.state.global_step
    assert total > 6
    _, _, _, first = _setup(log_file, tmp_path / "b", max_steps=5, lr_schedule=schedule)
    first.fit(log, hashes, req)  # killed after 5 steps
    assert first.state.global_step == 5 and not first.state.done
    _, _, _, second = _setup(log_file, tmp_path / "b", lr_schedule=schedule)
    assert second.resume()
    second.fit(log, hashes, req)
    assert second.state.global_step == total and second.state.done
    for (name, a), b in zip(
        straight.model.state_dict().items(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert straight.state.losses == second.state.losses


def test_a_decaying_schedule_resumes_only_with_its_epochs(log_file, tmp_path):
    log, hashes, req, tr = _setup(log_file, tmp_path, lr_schedule="cosine")
    tr.fit(log, hashes, req)
    _, _, _, more = _setup(log_file, tmp_path, lr_schedule="cosine", epochs=3)
    with pytest.raises(ValueError, match="decays over the planned epochs"):
        more.resume()
    _, _, _, same = _setup(log_file, tmp_path, lr_schedule="cosine")
    assert same.resume() and same.state.done


def test_lr_schedule_sets_the_dense_rate_at_every_step(log_file, tmp_path, capsys):
    """Linear decay: step t of T runs the dense optimizer at (1 - t / T) times its configured
    rate; the table's Adagrad keeps its own."""
    from hashrec.training.loop import LR_SCHEDULES, lr_factor

    log, hashes, req, tr = _setup(log_file, tmp_path, lr_schedule="linear", lr=0.01,
                                  table_lr=0.2)  # fmt: skip
    seen = []
    step = tr.step

    def recording(*args, **kwargs):
        seen.append((tr.dense.param_groups[0]["lr"], tr.table.param_groups[0]["lr"]))
        return step(*args, **kwargs)

    tr.step = recording
    tr.fit(log, hashes, req)
    total = tr.state.global_step
    assert len(seen) == total > 6
    for t, (dense, table) in enumerate(seen):
        assert dense == pytest.approx(0.01 * (1 - t / total))
        assert table == 0.2
    assert lr_factor("constant", 3, 10) == 1.0 and lr_factor("cosine", 10, 10) == 0.0
    assert set(LR_SCHEDULES) == {"constant", "linear", "cosine"}  # the CLI's choices
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="step")
    err = cli_error(["train", "--data", str(log_file), "--schema", SCHEMA_JSON, *TINY,
                     "--lr-schedule", "warm", "--out", str(tmp_path / "x")], capsys, 2)  # fmt: skip
    assert "--lr-schedule" in err and "cosine" in err


def test_time_order_visits_requests_oldest_first(log_file, tmp_path, capsys):
    """``order="time"``: every epoch the requests by the time of their first impression; the
    batches of a step are what the trainer takes from that order."""
    from hashrec.training.trainer import ORDERS

    log, hashes, req, tr = _setup(log_file, tmp_path, order="time")
    taken = []
    step = tr.step

    def recording(loss_fn, indices, *args, **kwargs):
        taken.append(np.asarray(indices).copy())
        return step(loss_fn, indices, *args, **kwargs)

    tr.step = recording
    tr.fit(log, hashes, req)
    times = log.time[req.candidates[:, 0]]
    per_epoch = len(taken) // 2
    for epoch in (taken[:per_epoch], taken[per_epoch:]):
        order = np.concatenate(epoch)
        assert sorted(order.tolist()) == list(range(len(req)))  # each request once
        assert (np.diff(times[order]) >= 0).all() and len(set(times.tolist())) > 1
    default = _setup(log_file, tmp_path / "s")[3]
    default._request_times = times
    assert (np.diff(times[default.epoch_order(0, len(req))]) < 0).any()  # the default shuffles
    assert set(ORDERS) == {"shuffled", "time"}  # the CLI's choices
    with pytest.raises(ValueError, match="order must be one of"):
        TrainConfig(order="random")
    with pytest.raises(ValueError, match="--pairwise-weight"):
        TrainConfig(order="time", pairwise_weight=0.1)
    from hashrec.training.retrieval import RetrievalTrainConfig

    with pytest.raises(ValueError, match="shuffled epochs only"):
        RetrievalTrainConfig(positive_actions=["click"], order="time")
    err = cli_error(["train", "--data", str(log_file), "--schema", SCHEMA_JSON, *TINY,
                     "--order", "newest", "--out", str(tmp_path / "x")], capsys, 2)  # fmt: skip
    assert "--order" in err and "time" in err


def test_the_cli_averages_by_default_and_ema_decay_0_is_off(log_file, tmp_path, capsys):
    """``--ema-decay`` reaches the run (default on; 0 off) and its checkpoint carries the
    average; 1 is refused (``hashrec.training.average``, tests/test_average.py)."""
    from hashrec.cli.common import DEFAULT_EMA_DECAY
    from hashrec.training.checkpoint import read_checkpoint_metadata

    split = ["--train-end", "2022-04-28", "--eval-start", "2022-04-29"]
    for decay, out in ((None, "on"), ("0", "off")):
        extra = [] if decay is None else ["--ema-decay", decay]
        main(["train", "--data", str(log_file), "--schema", SCHEMA_JSON, *TINY, *split, *extra,
              "--out", str(tmp_path / out)])  # fmt: skip
    on = read_checkpoint_metadata(next((tmp_path / "on").rglob("checkpoint.safetensors")))
    off = read_checkpoint_metadata(next((tmp_path / "off").rglob("checkpoint.safetensors")))
    assert on["extra"]["train"]["ema_decay"] == DEFAULT_EMA_DECAY > 0
    assert "average" in on["optimizer_groups"] and off["extra"]["train"]["ema_decay"] == 0
    assert "average" not in off["optimizer_groups"]
    err = cli_error(["train", "--data", str(log_file), "--schema", SCHEMA_JSON, *TINY,
                     "--ema-decay", "1", "--out", str(tmp_path / "x")], capsys, 2)  # fmt: skip
    assert "--ema-decay" in err and "< 1" in err


def test_failed_save_keeps_the_previous_checkpoint(log_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    log, hashes, req, tr = _setup(log_file, run, max_steps=2)
    tr.fit(log, hashes, req)
    before = tr.checkpoint_path.read_bytes()

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a checkpoi")
        raise OSError("disk full")

    monkeypatch.setattr("hashrec.training.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        tr.save()
    assert tr.checkpoint_path.read_bytes() == before
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors"]  # no debris
    model, info = load_checkpoint(tr.checkpoint_path)
    assert info.train_state.global_step == 2


def test_checkpoint_roundtrip_and_corrupt_file(log_file, tmp_path):
    _, _, _, tr = _setup(log_file, tmp_path)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, tr.model)
    model, info = load_checkpoint(path)
    assert model.config == tr.model.config and info.train_state is None
    for (n, a), b in zip(tr.model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.safetensors")


def _train_cli(log_file, out, *extra):
    return main(
        [
            "train",
            "--data",
            str(log_file),
            "--schema",
            SCHEMA_JSON,
            "--train-end",
            "2022-04-28",
            "--eval-start",
            "2022-04-29",
            "--out",
            str(out),
            *TINY,
            *extra,
        ]
    )


def test_cli_train_resume_evaluate(log_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train_cli(log_file, out, "--full-table") == 0
    printed = capsys.readouterr().out
    assert "| logistic regression |" in printed and "| full table |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    hashed = next(k for k in metrics["results"] if k.startswith("hashed"))
    from hashrec.evaluation.baselines import gbdt_available

    gbdt = {"LightGBM"} if gbdt_available() else set()
    assert (
        set(metrics["results"])
        == {"popularity", "logistic regression", hashed, "full table"} | gbdt
    )
    assert all(set(m["auc"]) == {"click", "like", "hate"} for m in metrics["results"].values())
    assert (out / "results.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 2
    # resuming a finished run trains nothing more and gives the same numbers
    assert _train_cli(log_file, out, "--resume") == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["results"][hashed] == metrics["results"][hashed]
    capsys.readouterr()
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(out / "checkpoint.safetensors"),
            "--data",
            str(log_file),
            "--schema",
            SCHEMA_JSON,
            "--eval-start",
            "2022-04-29",
            "--out",
            str(tmp_path / "eval.json"),
        ]
    )
    assert rc == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["results"][hashed]["auc"] == pytest.approx(
        metrics["results"][hashed]["auc"], nan_ok=True
    )


def test_evaluate_several_checkpoints_and_their_ensemble(log_file, tmp_path, capsys):
    """The seeds of one run scored together: each as in training, and their ensemble as the
    run's own ensemble row; checkpoints that score other impressions are refused by name."""
    out = tmp_path / "run"
    assert _train_cli(log_file, out, "--seeds", "2") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    hashed = next(k for k in metrics["results"] if k.startswith("hashed"))
    ckpts = [str(out / "checkpoint.safetensors"), str(out / "seed_1" / "checkpoint.safetensors")]
    common = ["--data", str(log_file), "--schema", SCHEMA_JSON, "--eval-start", "2022-04-29"]
    capsys.readouterr()
    assert (
        main(["evaluate", "--checkpoint", *ckpts, *common, "--out", str(tmp_path / "e.json")]) == 0
    )
    assert "| ensemble of the 2 checkpoints |" in capsys.readouterr().out
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["checkpoints"] == ckpts and "checkpoint" not in ev
    for i, seed_metrics in enumerate(metrics["per_seed"][hashed]):
        got = ev["results"][f"{hashed}, checkpoint {i + 1}"]["auc"]
        assert got == pytest.approx(seed_metrics["auc"], nan_ok=True)
    want = metrics["results"][f"{hashed}, ensemble of 2 seeds"]
    got = ev["results"]["ensemble of the 2 checkpoints"]
    assert got["auc"] == pytest.approx(want["auc"], nan_ok=True)
    assert got["gauc"] == pytest.approx(want["gauc"], nan_ok=True)
    other = tmp_path / "other"
    assert _train_cli(log_file, other, "--max-candidates", "1", "--epochs", "1") == 0
    err = cli_error(["evaluate", "--checkpoint", ckpts[0], str(other / "checkpoint.safetensors"),
                     *common, "--out", str(tmp_path / "f.json")], capsys, 1)  # fmt: skip
    assert "scores other impressions than --checkpoint" in err and "expected " in err
    assert not (tmp_path / "f.json").exists()
    err = cli_error(["evaluate", "--checkpoint", ckpts[0], ckpts[0], *common], capsys, 2)
    assert f"--checkpoint {ckpts[0]} is given more than once" in err


def test_evaluate_checkpoints_of_different_training_days(log_file, tmp_path, capsys):
    """Checkpoints trained to different days need --train-end, and none may be scored on a day
    it trained on."""
    runs = {}
    for end in ("2022-04-27", "2022-04-28"):
        runs[end] = tmp_path / end
        assert _train_cli(log_file, runs[end], "--train-end", end, "--epochs", "1") == 0
    ckpts = [str(r / "checkpoint.safetensors") for r in runs.values()]
    argv = ["evaluate", "--checkpoint", *ckpts, "--data", str(log_file), "--schema", SCHEMA_JSON,
            "--eval-start", "2022-04-29", "--out", str(tmp_path / "e.json")]  # fmt: skip
    err = cli_error(argv, capsys, 2)
    assert "record different last training days [20220427, 20220428]: give --train-end" in err
    err = cli_error([*argv, "--train-end", "2022-04-27"], capsys, 2)
    assert f"last training day 20220428 (--checkpoint {ckpts[1]})" in err
    assert not (tmp_path / "e.json").exists()
    assert main([*argv, "--train-end", "2022-04-28"]) == 0
    assert len(json.loads((tmp_path / "e.json").read_text())["checkpoints"]) == 2


def test_same_seed_same_metrics(log_file, tmp_path):
    for name in ("a", "b"):
        assert _train_cli(log_file, tmp_path / name) == 0
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text())["results"] for n in "ab")
    assert a == b


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--data", "nope.csv", "--schema", SCHEMA_JSON], "no such file"),
        (["--eval-start", "2022-04-20"], "must come after train_end"),
        (["--eval-start", "2022-13-45x"], None),
        (["--table-fraction", "0"], "argument --table-fraction: expected a finite number > 0"),
        (["--eval-start", "2023-01-01"], "no rows on the evaluation days"),
    ],
)
def test_cli_bad_inputs(log_file, tmp_path, argv, message, capsys):
    base = [
        "train",
        "--data",
        str(log_file),
        "--schema",
        SCHEMA_JSON,
        "--out",
        str(tmp_path / "r"),
        "--train-end",
        "2022-04-28",
        *TINY,
    ]
    if "--eval-start" not in argv:
        base += ["--eval-start", "2022-04-29"]
    with pytest.raises(SystemExit) as e:
        main([*base, *argv])
    text = str(e.value.code) + capsys.readouterr().err
    assert e.value.code != 0
    if message:
        assert message in text
    err = cli_error(["train", "--data", str(log_file), "--out", str(tmp_path / "r")], capsys, 2)
    assert "give --schema" in err


def _planted_log(path, n_users=80, n_posts=60, days=8, seed=1) -> None:
    """Clicks follow a per-post appeal plus a per-user propensity (strong, known signal)."""
    rng = np.random.default_rng(seed)
    appeal, propensity = rng.normal(0, 1.5, n_posts + 1), rng.normal(0, 1.0, n_users + 1)
    t0, rows = 1_650_844_800, []
    for u in range(1, n_users + 1):
        for t in np.sort(rng.integers(t0, t0 + days * 86400, rng.integers(15, 30))):
            p = int(rng.integers(1, n_posts + 1))
            click = int(rng.random() < 1 / (1 + np.exp(-(appeal[p] + propensity[u]))))
            rows.append(f"{u},{p},{p % 7 + 1},0,{t},{click},0,0,0\n")
    path.write_text("uid,item,creator,tab,ts,clicked,liked,hated,watch_ms\n" + "".join(rows))


def test_model_learns_a_planted_signal(tmp_path):
    """A trained ranker separates clicks of a known signal far better than chance on later
    days, and far better than the same model barely trained."""
    import hashrec.evaluation.experiment as ex
    from hashrec.evaluation.metrics import auc

    path = tmp_path / "log.csv"
    _planted_log(path)
    log = load_log(str(path), LogSchema.from_dict(json.loads(SCHEMA_JSON)))
    split = ex.Split(train_end=20220430, eval_start=20220501)
    spec = ex.collision_free_spec(
        log, TransformerConfig(dim=16, num_layers=1, num_q_heads=2, num_kv_heads=1)
    )
    click = log.actions.index("click")

    def eval_auc(max_steps: int) -> float:
        cfg = TrainConfig(epochs=6, batch_size=16, lr=1e-2, table_lr=0.1, max_steps=max_steps)
        out = tmp_path / f"s{max_steps}"
        run = ex.run_model(log, split, spec, ExampleConfig(8, 4), cfg, out, progress=False)
        p = run.predictions
        return auc(log.labels[p.rows, click], p.probs[:, click])

    trained = eval_auc(10_000)
    assert trained > 0.7, trained
    assert trained > eval_auc(1) + 0.05


def test_torchrun_variables_without_a_process_group_fail_clearly(log_file, tmp_path, monkeypatch):
    """WORLD_SIZE > 1 means data-parallel training (tests/test_distributed.py); when the group
    cannot be joined the trainer stops, it never trains a copy of its own."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="rank 1 of 2: could not join the process group"):
        _setup(log_file, tmp_path)


def _tiny_ranker():
    from hashrec import TransformerConfig

    cfg = RankerConfig(
        hash=HashConfig.uniform(num_buckets=50),
        transformer=TransformerConfig(dim=8, num_layers=1, num_q_heads=2, num_kv_heads=1),
        actions=("click", "like"),
        continuous_actions=(),
    )
    return PhoenixRanker(cfg)


def test_checkpoint_streaming_load_refuses_bad_weights(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = _tiny_ranker()
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model)
    back, _ = load_checkpoint(path)
    for (n, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    # tied weights stay tied (one tensor, read once per name)
    hr, cr = back.history_reduce, back.candidate_reduce
    assert hr.product_surface_embedding_table is cr.product_surface_embedding_table

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def rewrite(name, **edit):
        p = tmp_path / name
        save_file({**tensors, **edit}, str(p), metadata=meta)
        return p

    nan = tensors["model.unembeddings"].clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight unembeddings holds NaN or infinite values"):
        load_checkpoint(rewrite("nan.safetensors", **{"model.unembeddings": nan}))
    wide = torch.zeros(8, 3)
    with pytest.raises(
        ValueError, match="unembeddings: stored as F32 \\[8, 3\\], expected \\[8, 2\\]"
    ):
        load_checkpoint(rewrite("wide.safetensors", **{"model.unembeddings": wide}))
    with pytest.raises(
        ValueError, match=r"do not fit the stored config \(missing \[.*unembeddings"
    ):
        p = tmp_path / "missing.safetensors"
        save_file(
            {k: v for k, v in tensors.items() if k != "model.unembeddings"}, str(p), metadata=meta
        )
        load_checkpoint(p)
    edited = {**meta, "extra": json.dumps({"model": "edited"})}
    p = tmp_path / "edited.safetensors"
    save_file(tensors, str(p), metadata=edited)
    with pytest.raises(ValueError, match="does not match the digest"):
        load_checkpoint(p)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 64])
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "cut.safetensors")


def test_a_resumed_run_steps_with_the_fused_kernel(log_file, tmp_path):
    """A checkpoint written before the fused AdamW (its param groups say fused=None) resumes
    onto this torch's fused kernel: loading the state would otherwise restore the slow path."""
    from hashrec.training.loop import _fused_adamw

    log, hashes, req, first = _setup(log_file, tmp_path, max_steps=2)
    cfg = first.config
    first.dense = torch.optim.AdamW(first.model.dense_parameters(), lr=cfg.lr,
                                    weight_decay=cfg.weight_decay)  # fmt: skip
    first.fit(log, hashes, req)
    _, _, _, second = _setup(log_file, tmp_path)
    assert second.resume()
    assert first.dense.param_groups[0]["fused"] is None
    assert second.dense.param_groups[0]["fused"] is (_fused_adamw(second.device) or None)
    second.fit(log, hashes, req)
    assert second.state.done


def test_the_cli_attention_option_reaches_the_model_and_resumes_under_another(
    log_file, tmp_path, capsys
):
    """``--attention full`` trains with the full mask (its checkpoint says so); the run resumes
    under ``auto`` (a speed choice: the kernels agree); an unknown kernel is refused."""
    split = ["--train-end", "2022-04-28", "--eval-start", "2022-04-29"]
    base = ["train", "--data", str(log_file), "--schema", SCHEMA_JSON, *TINY, *split,
            "--out", str(tmp_path / "r")]  # fmt: skip
    main([*base, "--attention", "full"])
    model, _ = load_checkpoint(tmp_path / "r" / "checkpoint.safetensors")
    assert model.config.transformer.attention == "full"
    capsys.readouterr()
    main([*base, "--resume", "--epochs", "2"])  # default --attention auto: no refusal
    assert "cannot resume" not in capsys.readouterr().err
    err = cli_error([*base, "--attention", "flash"], capsys, 2)
    assert "--attention" in err and "isolated" in err
