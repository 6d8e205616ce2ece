import math

import numpy as np
import pytest

from neuroshard.features import (
    FEATURE_NAMES,
    FEATURE_SCHEMA,
    NUM_FEATURES,
    pad_loads,
    raw_features,
    table_features,
    transform_raw,
)
from neuroshard.types import DLRM_REUSE_HIST

from factories import make_table


def test_schema_names_twenty_features():
    assert FEATURE_SCHEMA == "table20/v1"
    assert NUM_FEATURES == len(FEATURE_NAMES) == 20
    assert FEATURE_NAMES[-3:] == ("dim", "pooling_factor", "rows")


def test_transform_keeps_reuse_bins_and_logs_the_rest():
    t = make_table(rows=1000, dim=64, pooling_factor=3.0)
    f = table_features([t])
    assert f.shape == (1, 20) and f.dtype == np.float32
    np.testing.assert_allclose(f[0, :17], DLRM_REUSE_HIST, rtol=1e-6)
    assert f[0, 17] == pytest.approx(6.0)  # log2(64)
    assert f[0, 18] == pytest.approx(math.log1p(3.0), rel=1e-6)
    assert f[0, 19] == pytest.approx(3.0)  # log10(1000)


def test_raw_then_transform_equals_table_features():
    tables = [make_table(f"t{i}", rows=10 ** (i + 2), dim=4 * (i + 1)) for i in range(4)]
    raw = raw_features(tables)
    assert raw.shape == (4, 20)
    np.testing.assert_array_equal(raw, [t.feature_vector() for t in tables])
    assert raw[2, 17] == 12 and raw[3, 19] == 10**5
    np.testing.assert_array_equal(transform_raw(raw), table_features(tables))
    assert raw_features([]).shape == (0, 20)


def test_transform_rejects_wrong_width():
    with pytest.raises(ValueError):
        transform_raw(np.zeros((2, 19)))


def test_pad_loads_shapes_and_mask():
    loads = [[make_table("a"), make_table("b"), make_table("c")], [make_table("d")], []]
    x, mask = pad_loads(loads)
    assert x.shape == (3, 3, 20) and mask.shape == (3, 3)
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert np.all(x[~mask] == 0)
    np.testing.assert_array_equal(x[1, 0], table_features([make_table("d")])[0])
    # arrays of transformed features pad the same way, and max_tables widens
    x2, mask2 = pad_loads([table_features(load) for load in loads], max_tables=5)
    assert x2.shape == (3, 5, 20)
    np.testing.assert_array_equal(x2[:, :3], x)
    with pytest.raises(ValueError):
        pad_loads(loads, max_tables=2)
