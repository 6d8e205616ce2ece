import numpy as np
import pytest

from neuroshard.samples import ComputeData


def _data(prefix, counts, fingerprint="fp"):
    n, total = len(counts), sum(counts)
    return ComputeData(
        keys=np.array([f"{prefix}{i}" for i in range(n)]),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        features=np.arange(total * 20, dtype=float).reshape(total, 20)
        + (0 if prefix == "a" else 1e6),
        table_names=np.array([f"{prefix}t{j}" for j in range(total)]),
        label_ms=np.arange(n, dtype=float) + 1,
        spread=np.zeros(n),
        fingerprint=fingerprint,
    )


def test_concat_keeps_each_rows_tables_and_label():
    a, b = _data("a", [2, 1]), _data("b", [3, 1, 2])
    both = a.concat(b)
    assert len(both) == 5 and both.keys.tolist() == ["a0", "a1", "b0", "b1", "b2"]
    assert both.num_tables.tolist() == [2, 1, 3, 1, 2]
    assert both.names_of(2) == ["bt0", "bt1", "bt2"] and both.names_of(1) == ["at2"]
    np.testing.assert_array_equal(both.subset([2, 3, 4]).features, b.features)
    assert both.label_ms.tolist() == [1, 2, 1, 2, 3]


def test_concat_refuses_samples_of_another_backend():
    with pytest.raises(ValueError, match="fingerprints differ"):
        _data("a", [1]).concat(_data("b", [1], fingerprint="other"))


def test_concat_refuses_samples_whose_keys_repeat():
    with pytest.raises(ValueError, match="sample keys repeat .1, e.g. 'a0'"):
        _data("a", [1]).concat(_data("a", [2]))
