"""The table profiler reads the three lookup formats and reproduces known statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from neuroshard.indices import generate_batch
from neuroshard.profile import profile_tables
from neuroshard.types import DLRM_REUSE_HIST, TableSpec, TableSpecError

# Two tables over 6 bags:
#   "user": bags [3, 3, 5], [], [7], [3], [1200, 3], []   -> 8 lookups, max id 1200
#   "item": bags [1], [2], [1], [2], [1], [50]            -> 6 lookups, max id 50
USER_IDS = [3, 3, 5, 7, 3, 1200, 3]
USER_LENGTHS = [3, 0, 1, 1, 2, 0]
ITEM_IDS = [1, 2, 1, 2, 1, 50]
ITEM_LENGTHS = [1, 1, 1, 1, 1, 1]


def _offsets(lengths):
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64)


def _check_known(specs: list[TableSpec]) -> None:
    by_name = {s.name: s for s in specs}
    assert set(by_name) == {"user", "item"}
    user, item = by_name["user"], by_name["item"]
    assert user.rows == 1201 and item.rows == 100  # max id + 1, at least 100
    assert user.pooling_factor == pytest.approx(7 / 6)
    assert item.pooling_factor == pytest.approx(1.0)
    assert user.dim == 128
    # user: id 3 x4 -> bin 2; ids 5, 7, 1200 once -> bin 0
    assert user.reuse_hist[0] == pytest.approx(0.75) and user.reuse_hist[2] == pytest.approx(0.25)
    # item: 1 x3 -> bin 2, 2 x2 -> bin 1, 50 x1 -> bin 0
    assert np.allclose(item.reuse_hist[:3], [1 / 3, 1 / 3, 1 / 3])
    assert sum(user.reuse_hist) == pytest.approx(1.0)


def test_dict_format(tmp_path):
    path = tmp_path / "lookups.pt"
    torch.save(
        {
            "user": {"indices": torch.tensor(USER_IDS), "offsets": _offsets(USER_LENGTHS)},
            "item": {"indices": torch.tensor(ITEM_IDS), "lengths": torch.tensor(ITEM_LENGTHS)},
        },
        path,
    )
    _check_known(profile_tables(path))


def test_keyed_jagged_tensor_format(tmp_path):
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "item"],
        values=torch.tensor(USER_IDS + ITEM_IDS),
        lengths=torch.tensor(USER_LENGTHS + ITEM_LENGTHS),
    )
    path = tmp_path / "kjt.pt"
    torch.save(kjt, path)
    _check_known(profile_tables(path))


def test_parquet_format(tmp_path):
    rows = []
    for table, ids, lengths in (("user", USER_IDS, USER_LENGTHS), ("item", ITEM_IDS, ITEM_LENGTHS)):
        samples = np.repeat(np.arange(len(lengths)), lengths)
        rows += [(table, int(s), int(i)) for s, i in zip(samples, ids)]
    frame = pd.DataFrame(rows, columns=["table", "sample", "id"]).sample(frac=1, random_state=0)
    path = tmp_path / "lookups.parquet"
    frame.to_parquet(path)
    _check_known(profile_tables(path))


def test_dims_rows_and_batching(tmp_path):
    path = tmp_path / "lookups.pt"
    torch.save(
        {"user": {"indices": torch.tensor(USER_IDS), "offsets": _offsets(USER_LENGTHS)}}, path
    )
    (spec,) = profile_tables(path, dims={"user": 32}, rows={"user": 5000})
    assert spec.dim == 32 and spec.rows == 5000
    # batches of 3 bags: [3,3,5],[],[7] | [3],[1200,3],[] -> id 3 twice in each batch;
    # 5 distinct (batch, id) pairs: 3, 3 twice each (bin 1); 5, 7, 1200 once (bin 0)
    (batched,) = profile_tables(path, batch_size=3)
    assert batched.reuse_hist[1] == pytest.approx(2 / 5)
    assert batched.reuse_hist[0] == pytest.approx(3 / 5)
    with pytest.raises(TableSpecError, match="rows"):
        profile_tables(path, rows={"user": 1000})


def test_recovers_a_synthetic_table(tmp_path):
    spec = TableSpec("t", rows=2_000_000, dim=64, pooling_factor=12.5)
    indices, offsets = generate_batch(spec, 65_536, rng=0)
    path = tmp_path / "synthetic.pt"
    torch.save(
        {"t": {"indices": torch.from_numpy(indices), "offsets": torch.from_numpy(offsets)}}, path
    )
    (got,) = profile_tables(path, dims=64)
    assert got.pooling_factor == pytest.approx(12.5, rel=0.02)
    assert np.abs(np.asarray(got.reuse_hist) - np.asarray(DLRM_REUSE_HIST)).sum() < 0.05
    assert got.rows <= spec.rows


@pytest.mark.parametrize(
    "payload,match",
    [
        ({"t": {"indices": torch.tensor([1, 2]), "offsets": torch.tensor([0, 3])}}, "offsets"),
        ({"t": {"indices": torch.tensor([1, -2]), "offsets": torch.tensor([0, 2])}}, "negative"),
        ({"t": {"indices": torch.tensor([1.5]), "offsets": torch.tensor([0, 1])}}, "integers"),
        ({"t": {"ids": torch.tensor([1])}}, "indices"),
        ([1, 2, 3], "KeyedJaggedTensor"),
        ({}, "no tables"),
    ],
)
def test_bad_torch_files_name_file_and_problem(tmp_path, payload, match):
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(TableSpecError, match=match) as info:
        profile_tables(path)
    assert "bad.pt" in str(info.value)


def test_unsafe_or_garbage_files_are_refused(tmp_path):
    import datetime

    path = tmp_path / "object.pt"
    torch.save({"t": datetime.date(2024, 1, 1)}, path)  # not a safe class: refused
    with pytest.raises(TableSpecError, match="object.pt"):
        profile_tables(path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(TableSpecError, match="garbage.pt"):
        profile_tables(garbage)
    with pytest.raises(TableSpecError, match="file not found"):
        profile_tables(tmp_path / "missing.pt")


def test_parquet_missing_column(tmp_path):
    path = tmp_path / "bad.parquet"
    pd.DataFrame({"table": ["a"], "id": [1]}).to_parquet(path)
    with pytest.raises(TableSpecError, match="sample"):
        profile_tables(path)
