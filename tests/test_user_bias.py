"""The per-user logit offset (``RankerConfig.user_bias_rows``, ``--user-bias-rows``)."""

import json

import pytest
import torch
from test_ranker import tiny_config
from test_train import TINY

from hashrec import PhoenixRanker
from hashrec.cli import main
from hashrec.models.losses import ranking_loss
from hashrec.nn.user_bias import UserBias, user_bias_rows
from hashrec.training import checkpoint as ckpt
from hashrec.training.resume import resume_conflicts

from conftest import SCHEMA_JSON, cli_error, make_batch


def test_rows_fold_every_hash_and_stay_in_range():
    h = torch.tensor([[5, 9], [5, 10], [5, 9], [123456, 7]])
    rows = user_bias_rows(h, 1000)
    assert rows[0] == (5 * 1_000_003 + 9) % 1000 == rows[2] != rows[1]
    assert rows[3] == (123456 * 1_000_003 + 7) % 1000
    many = user_bias_rows(torch.randint(1, 10**7, (5000, 3)), 97)
    assert many.min() >= 0 and many.max() < 97 and many.dtype == torch.long


def test_offsets_in_training_and_scoring():
    b = UserBias(50, columns=[2, 0], num_actions=4, gain=3.0, shrink=0.25)
    with torch.no_grad():
        b.weight.copy_(torch.arange(100.0).view(50, 2))
    h = torch.tensor([[7, 8], [1, 2]])
    rows = user_bias_rows(h, 50)
    want = torch.zeros(2, 4)
    want[:, 2], want[:, 0] = b.weight[rows, 0].detach() * 3, b.weight[rows, 1].detach() * 3
    assert torch.equal(b.train()(h), want)
    assert torch.allclose(b.eval()(h), want * 0.25)
    every = UserBias(50, columns=[0, 1, 2], num_actions=3)
    assert every.all_columns and every(h).shape == (2, 3) and not every(h).any()  # starts at 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_rows": 0}, "num_rows must be >= 1"),
        ({"columns": [3]}, r"columns must be distinct action indices in \[0, 3\)"),
        ({"columns": [1, 1]}, "columns must be distinct"),
        ({"columns": []}, "columns must be distinct"),
    ],
)
def test_bad_user_bias_module(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UserBias(**{"num_rows": 8, "columns": [0], "num_actions": 3, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"user_bias_rows": -1}, r"user_bias_rows must be an integer in \[0, 2\^31\), got -1"),
        ({"user_bias_rows": 8, "user_bias_actions": ("bogus",)}, "must be distinct actions of"),
        ({"user_bias_rows": 8, "user_bias_actions": ("click", "click")}, "must be distinct"),
        ({"user_bias_gain": 0.0}, "user_bias_gain must be a finite number > 0, got 0.0"),
        ({"user_bias_shrink": -0.5}, "user_bias_shrink must be a finite number >= 0"),
        ({"user_bias_rows": True}, r"user_bias_rows must be an integer in \[0, 2\^31\), got True"),
        ({"user_bias_rows": 64.0}, "user_bias_rows must be an integer"),
        ({"user_bias_rows": 2**31}, "user_bias_rows must be an integer"),
        ({"user_bias_rows": 8, "user_bias_actions": "click"}, "must be a list of action names"),
        ({"user_bias_actions": ("click",)}, r"user_bias_actions \['click'\] needs user_bias_rows"),
        ({"user_bias_shrink": float("inf")}, "user_bias_shrink must be a finite number"),
        ({"user_bias_gain": "5"}, "user_bias_gain must be a finite number > 0, got '5'"),
    ],
)
def test_bad_ranker_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def _pair(**kw):
    """The same ranker without and with the offset (every other weight equal)."""
    torch.manual_seed(0)
    plain = PhoenixRanker(tiny_config())
    biased = PhoenixRanker(tiny_config(user_bias_rows=31, **kw))
    missing = biased.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["user_bias.weight"]
    return plain, biased


@pytest.mark.parametrize("training", [True, False])
def test_ranker_adds_the_offset_to_the_named_actions_only(training):
    plain, biased = _pair(user_bias_actions=("favorite", "click"))
    batch = make_batch(tiny_config().hash, B=3, S=5, C=4, A=18, seed=2)
    plain.train(training), biased.train(training)
    torch.manual_seed(1)
    base = plain(batch).logits
    torch.manual_seed(1)  # same dropout masks
    assert torch.equal(biased(batch).logits, base)  # a fresh offset is 0
    with torch.no_grad():
        biased.user_bias.weight.normal_()
    torch.manual_seed(1)
    got = biased(batch).logits
    rows = user_bias_rows(batch.user_hashes, 31)
    scale = 5.0 if training else 5.0 * 0.5  # the config's default gain and shrink
    actions = tiny_config().actions
    want = base.clone()
    for j, name in enumerate(("favorite", "click")):
        want[..., actions.index(name)] += scale * biased.user_bias.weight[rows, j, None].detach()
    assert torch.allclose(got, want, atol=1e-6)


def test_gradient_reaches_only_the_batch_users_rows():
    _, model = _pair()
    batch = make_batch(tiny_config().hash, B=4, S=5, C=4, A=18, seed=3)
    out = model.train()(batch)
    ranking_loss(out, torch.ones_like(out.logits),
                 continuous_targets=torch.ones_like(out.continuous)).backward()  # fmt: skip
    g = model.user_bias.weight.grad
    touched = set(g.abs().sum(1).nonzero().flatten().tolist())
    assert touched == set(user_bias_rows(batch.user_hashes, 31).tolist())
    assert any(p is model.user_bias.weight for p in model.dense_parameters())


def test_an_older_checkpoint_resumes_only_without_the_offset():
    now = tiny_config().to_dict()
    old = {k: v for k, v in now.items() if not k.startswith("user_bias")}  # written before
    assert resume_conflicts({"model_config": old}, {"model_config": now}) == []
    with_offset = tiny_config(user_bias_rows=64).to_dict()
    assert resume_conflicts({"model_config": old}, {"model_config": with_offset}) == [
        "model_config.user_bias_rows: 0 in the checkpoint, 64 now"
    ]


def test_a_padding_user_gets_no_offset():
    b = UserBias(8, columns=[0, 1], num_actions=2)
    with torch.no_grad():
        b.weight.fill_(1.0)
    got = b(torch.tensor([[0, 0], [3, 4]]))  # a request without a user ID, then a user
    assert got[0].tolist() == [0.0, 0.0] and got[1].tolist() == [1.0, 1.0]


def test_cli_trains_saves_and_scores_the_offset(log_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", str(log_file), "--schema", SCHEMA_JSON, "--train-end",
            "2022-04-28", "--eval-start", "2022-04-29", "--out", str(out), *TINY,
            "--user-bias-rows", "64", "--user-bias-actions", "click,like", "--full-table"]  # fmt: skip
    assert main(argv) == 0
    assert "per-user offset 0.0 MiB" in capsys.readouterr().out  # 64 x 2 floats
    model, _ = ckpt.load_checkpoint(out / "checkpoint.safetensors")
    cfg = model.config
    assert (cfg.user_bias_rows, cfg.user_bias_actions) == (64, ("click", "like"))
    assert model.user_bias.weight.abs().sum() > 0  # it trained
    full, _ = ckpt.load_checkpoint(out / "full_table" / "checkpoint.safetensors")
    assert full.config.user_bias_rows == 64  # the collision-free reference: the same model
    resolved = json.loads((out / "config.json").read_text())
    assert (resolved["user_bias_rows"], resolved["user_bias_actions"]) == (64, ["click", "like"])
    metrics = json.loads((out / "metrics.json").read_text())["results"]
    hashed = next(k for k in metrics if k.startswith("hashed"))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "checkpoint.safetensors"), "--data",
                 str(log_file), "--schema", SCHEMA_JSON, "--eval-start", "2022-04-29",
                 "--out", str(tmp_path / "eval.json")]) == 0  # fmt: skip
    ev = json.loads((tmp_path / "eval.json").read_text())["results"][hashed]
    assert ev["auc"] == pytest.approx(metrics[hashed]["auc"], nan_ok=True)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--user-bias-rows", "64", "--user-bias-actions", "share"],
         "--user-bias-actions names ['share']"),
        (["--user-bias-actions", "click"], "--user-bias-actions needs --user-bias-rows > 0"),
        (["--user-bias-rows", "-3"], "--user-bias-rows: expected an integer >= 0, got -3"),
        (["--user-bias-rows", "8", "--user-bias-actions", "click,click"], "names an action twice"),
        (["--user-bias-rows", str(2**40)], "--user-bias-rows must be < 2^31"),
    ],
)  # fmt: skip
def test_cli_refuses_bad_offsets(log_file, tmp_path, capsys, extra, message):
    argv = ["train", "--data", str(log_file), "--schema", SCHEMA_JSON, "--train-end",
            "2022-04-28", "--eval-start", "2022-04-29", "--out", str(tmp_path / "r"), *TINY,
            *extra]  # fmt: skip
    assert message in cli_error(argv, capsys, 2)
    assert not (tmp_path / "r").exists()
