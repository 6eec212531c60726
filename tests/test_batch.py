import dataclasses

import numpy as np
import pytest
import torch

from hashrec import RecsysBatch, RecsysEmbeddings

from conftest import make_batch, without_candidates


def _replace(batch, **kw):
    d = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    d.update(kw)
    return RecsysBatch(**d)


def test_valid_batch_and_properties(small_config):
    b = make_batch(small_config, B=3, S=5, C=4)
    assert (b.batch_size, b.history_len, b.num_candidates) == (3, 5, 4)
    assert b.validate(small_config, num_actions=19, num_surfaces=16) is b


def test_numpy_fields_become_tensors(small_config):
    b = make_batch(small_config)
    b2 = _replace(b, user_hashes=b.user_hashes.numpy())
    assert isinstance(b2.user_hashes, torch.Tensor)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "user_hashes",
            torch.ones(3, dtype=torch.long),
            r"user_hashes has shape \[3\], expected \[\?, \?\]",
        ),
        (
            "history_post_hashes",
            torch.ones(3, 5, dtype=torch.long),
            r"history_post_hashes has shape \[3, 5\], expected \[3, \?, \?\]",
        ),
        (
            "history_author_hashes",
            torch.ones(3, 6, 2, dtype=torch.long),
            r"history_author_hashes has shape \[3, 6, 2\], expected \[3, 5, \?\]",
        ),
        (
            "history_actions",
            torch.zeros(2, 5, 19),
            r"history_actions has shape \[2, 5, 19\], expected \[3, 5, \?\]",
        ),
        (
            "history_product_surface",
            torch.zeros(3, 4, dtype=torch.long),
            r"history_product_surface has shape \[3, 4\], expected \[3, 5\]",
        ),
        (
            "candidate_post_hashes",
            torch.ones(3, 4, 3, dtype=torch.long),
            r"candidate_post_hashes has shape \[3, 4, 3\], expected \[3, \?, 2\]",
        ),
        (
            "candidate_author_hashes",
            torch.ones(3, 5, 2, dtype=torch.long),
            r"candidate_author_hashes has shape \[3, 5, 2\], expected \[3, 4, 2\]",
        ),
        (
            "candidate_product_surface",
            torch.zeros(3, dtype=torch.long),
            r"candidate_product_surface has shape \[3\], expected \[3, 4\]",
        ),
        (
            "user_hashes",
            torch.ones(3, 2),
            r"user_hashes has dtype torch.float32, expected torch.int32 or torch.int64",
        ),
        (
            "history_actions",
            torch.full((3, 5, 19), 2.0),
            r"history_actions holds values in \[.*2.0\], expected multi-hot in \[0, 1\]",
        ),
        (
            "candidate_product_surface",
            -torch.ones(3, 4, dtype=torch.long),
            r"candidate_product_surface holds -1, expected indices >= 0",
        ),
        ("user_hashes", "abc", r"user_hashes must be a tensor or array, got str"),
    ],
)
def test_structure_errors_name_field_expected_and_actual(small_config, field, value, message):
    b = make_batch(small_config)
    with pytest.raises(ValueError, match=message):
        _replace(b, **{field: value})


def test_validate_against_config(small_config):
    b = make_batch(small_config)
    with pytest.raises(ValueError, match="history_actions has 19 actions, config expects 8"):
        b.validate(num_actions=8)
    with pytest.raises(
        ValueError, match=r"history_product_surface holds \d+, expected 0..3 surfaces"
    ):
        b.validate(num_surfaces=4)
    bad = b.candidate_post_hashes.clone()
    bad[0, 0, 1] = small_config.offset("author") + 3  # an author row in a post field
    with pytest.raises(
        ValueError,
        match=r"candidate_post_hashes holds \d+, expected 0 \(padding\) or \d+..\d+ \(rows of the post block\)",
    ):
        _replace(b, candidate_post_hashes=bad).validate(small_config)
    three = torch.ones(3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="user_hashes has 3 hashes per user, config expects 2"):
        _replace(b, user_hashes=three).validate(small_config)


def test_to_moves_every_field(small_config):
    b = make_batch(small_config)
    B, S, C = b.batch_size, b.history_len, b.num_candidates
    b = _replace(
        b,
        history_dwell=torch.rand(B, S),
        candidate_impression_ts=torch.full((B, C), 7200),
        candidate_creation_ts=torch.full((B, C), 3600),
    ).to("meta")
    assert all(getattr(b, f.name).device.type == "meta" for f in dataclasses.fields(b))
    assert make_batch(small_config).to("meta").history_dwell is None


def test_optional_phoenix_inputs_are_checked(small_config):
    b = make_batch(small_config)
    B, S, C = b.batch_size, b.history_len, b.num_candidates
    with pytest.raises(ValueError, match=r"history_dwell has shape \[\d+, 1\], expected"):
        _replace(b, history_dwell=torch.rand(B, 1))
    with pytest.raises(ValueError, match="history_dwell has dtype torch.int64"):
        _replace(b, history_dwell=torch.ones(B, S, dtype=torch.long))
    with pytest.raises(ValueError, match="must be given together"):
        _replace(b, candidate_impression_ts=torch.ones(B, C, dtype=torch.long))


def test_embeddings_validation():
    ok = dict(
        user_embeddings=torch.zeros(2, 2, 4),
        history_post_embeddings=torch.zeros(2, 3, 2, 4),
        candidate_post_embeddings=torch.zeros(2, 5, 2, 4),
        history_author_embeddings=torch.zeros(2, 3, 1, 4),
        candidate_author_embeddings=torch.zeros(2, 5, 1, 4),
    )
    e = RecsysEmbeddings(**ok)
    assert e.to("meta").user_embeddings.device.type == "meta"
    with pytest.raises(
        ValueError,
        match=r"candidate_author_embeddings has shape \[2, 5, 2, 4\], expected \[2, 5, 1, 4\]",
    ):
        RecsysEmbeddings(**{**ok, "candidate_author_embeddings": torch.zeros(2, 5, 2, 4)})
    with pytest.raises(
        ValueError, match="history_post_embeddings has dtype torch.int64, expected a floating dtype"
    ):
        RecsysEmbeddings(
            **{**ok, "history_post_embeddings": torch.zeros(2, 3, 2, 4, dtype=torch.long)}
        )
    with pytest.raises(
        ValueError,
        match=r"history_post_embeddings has shape \[2, 3, 2, 8\], expected \[2, \?, \?, 4\]",
    ):
        RecsysEmbeddings(**{**ok, "history_post_embeddings": np.zeros((2, 3, 2, 8), np.float32)})


def test_batch_without_candidates_is_valid_and_looks_up(small_config):
    from hashrec import FusedEmbeddingTable

    b = make_batch(small_config, B=2, S=3, C=4)
    user_only = without_candidates(b)
    assert not user_only.has_candidates and user_only.num_candidates == 0
    user_only.validate(small_config, num_actions=19, num_surfaces=16)
    emb = FusedEmbeddingTable.from_config(small_config, dim=8).lookup(user_only)
    assert emb.candidate_post_embeddings is None and emb.candidate_author_embeddings is None
    assert emb.history_post_embeddings.shape == (2, 3, 2, 8)
    with pytest.raises(ValueError, match=r"\['candidate_product_surface'\] are None"):
        _replace(b, candidate_product_surface=None)


def test_nan_history_actions_are_refused(small_config):
    b = make_batch(small_config)
    actions = b.history_actions.clone()
    actions[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="history_actions holds NaN"):
        _replace(b, history_actions=actions)


def test_validate_reads_no_tensor_values(small_config):
    """Checks against a config use the values recorded at construction: a batch whose tensors
    cannot be read at all (meta device) still validates, and still fails where it should."""
    b = make_batch(small_config).to("meta")
    assert b.validate(small_config, num_actions=19, num_surfaces=16) is b
    with pytest.raises(ValueError, match="expected 0..3 surfaces"):
        b.validate(num_surfaces=4)


def test_lookup_fields_come_from_the_one_schema(small_config):
    from hashrec import FusedEmbeddingTable
    from hashrec.nn.batch import BATCH_FIELDS, HASH_FIELDS

    assert [f.name for f in BATCH_FIELDS] == [f.name for f in dataclasses.fields(RecsysBatch)]
    assert {f.embedding for f in HASH_FIELDS} == {
        f.name for f in dataclasses.fields(RecsysEmbeddings)
    }
    table = FusedEmbeddingTable.from_config(small_config, dim=4)
    b = make_batch(small_config)
    emb = table.lookup(b)
    for f in HASH_FIELDS:  # each embedding is exactly its hash field's rows
        torch.testing.assert_close(getattr(emb, f.embedding), table.weight[getattr(b, f.name)])
