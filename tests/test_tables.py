import json

import pytest

from neuroshard.tables import load_tables, save_tables
from neuroshard.types import DLRM_REUSE_HIST, FeatureSpec, TableSpec, TableSpecError

from factories import make_table


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_json_list_with_torchrec_spellings_and_defaults(tmp_path):
    path = write(
        tmp_path,
        "t.json",
        json.dumps(
            [
                {"name": "a", "num_embeddings": 1000, "embedding_dim": 64},
                {
                    "name": "b",
                    "rows": 10,
                    "dim": 8,
                    "pooling_factor": 2.5,
                    "reuse_hist": [1] + [0] * 16,
                },
            ]
        ),
    )
    a, b = load_tables(path)
    assert (a.rows, a.dim, a.pooling_factor, a.reuse_hist) == (1000, 64, 1.0, DLRM_REUSE_HIST)
    assert (b.rows, b.dim, b.pooling_factor, b.reuse_hist[0]) == (10, 8, 2.5, 1.0)


def test_object_with_tables_key_and_yaml(tmp_path):
    path = write(tmp_path, "t.yaml", "tables:\n  - {name: a, rows: 100, dim: 16}\n")
    assert load_tables(path)[0].name == "a"
    path = write(tmp_path, "t.json", json.dumps({"tables": [{"name": "a", "rows": 1, "dim": 4}]}))
    assert load_tables(path)[0].rows == 1


def test_csv_with_histogram_column_and_bin_columns(tmp_path):
    hist = " ".join(["1"] + ["0"] * 16)
    path = write(
        tmp_path, "t.csv", f"name,rows,dim,pooling_factor,reuse_hist\na,100,16,3,{hist}\nb,5,4,,\n"
    )
    a, b = load_tables(path)
    assert a.reuse_hist[0] == 1.0 and a.pooling_factor == 3.0
    assert b.pooling_factor == 1.0 and b.reuse_hist == DLRM_REUSE_HIST
    bins = ",".join(f"reuse_{i}" for i in range(17))
    values = ",".join(["0.5", "0.5"] + ["0"] * 15)
    path = write(tmp_path, "u.csv", f"name,num_embeddings,embedding_dim,{bins}\nc,7,8,{values}\n")
    assert load_tables(path)[0].reuse_hist[:2] == (0.5, 0.5)


def test_round_trip(tmp_path):
    tables = [make_table("a"), make_table("b", rows=5, dim=4, pooling_factor=0.5)]
    save_tables(tables, tmp_path / "t.json")
    assert load_tables(tmp_path / "t.json") == tables


@pytest.mark.parametrize(
    "records, table, field",
    [
        ([{"rows": 1, "dim": 4}], "#0", "name"),
        ([{"name": "a", "dim": 4}], "a", "rows"),
        ([{"name": "a", "rows": "many", "dim": 4}], "a", "rows"),
        ([{"name": "a", "rows": 0, "dim": 4}], "a", "rows"),
        ([{"name": "a", "rows": 1.5, "dim": 4}], "a", "rows"),
        ([{"name": "a", "rows": 10, "dim": 6}], "a", "dim"),
        ([{"name": "a", "rows": 10, "dim": -4}], "a", "dim"),
        ([{"name": "a", "rows": 10, "dim": True}], "a", "dim"),
        ([{"name": "a", "rows": 10, "dim": 4, "pooling_factor": -1}], "a", "pooling_factor"),
        ([{"name": "a", "rows": 10, "dim": 4, "reuse_hist": [1.0]}], "a", "reuse_hist"),
        ([{"name": "a", "rows": 10, "dim": 4, "reuse_hist": [0.5] * 17}], "a", "reuse_hist"),
        ([{"name": "a", "rows": 10, "dim": 4}, {"name": "a", "rows": 1, "dim": 4}], "a", "name"),
        ([{"name": "a", "rows": 10, "num_embeddings": 10, "dim": 4}], "a", "rows"),
    ],
)
def test_bad_fields_name_file_table_and_field(tmp_path, records, table, field):
    path = write(tmp_path, "bad.json", json.dumps(records))
    with pytest.raises(TableSpecError) as info:
        load_tables(path)
    message = str(info.value)
    assert "bad.json" in message and repr(table) in message and repr(field) in message


@pytest.mark.parametrize(
    "name, text, words",
    [
        ("nan.json", '[{"name": "a", "rows": NaN, "dim": 4}]', "NaN"),
        ("empty.json", "", "empty"),
        ("broken.json", '[{"name": ', "malformed JSON"),
        ("scalar.json", "3", "list of tables"),
        ("empty.csv", "", "empty"),
        ("nohead.csv", "name,dim\na,4\n", "'rows'"),
        ("extra.csv", "name,rows,dim\na,1,4,9\n", "more values"),
        ("short.csv", "name,rows,dim\na,1\n", "fewer values"),
        ("list.json", "[]", "no tables"),
    ],
)
def test_malformed_files(tmp_path, name, text, words):
    with pytest.raises(TableSpecError, match=words):
        load_tables(write(tmp_path, name, text))


def test_missing_file_and_binary(tmp_path):
    with pytest.raises(TableSpecError, match="file not found"):
        load_tables(tmp_path / "nope.json")
    path = tmp_path / "bin.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TableSpecError, match="UTF-8"):
        load_tables(path)


def test_misspelled_field_is_an_error_that_suggests_the_known_name(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[{"name": "a", "rows": 10, "dim": 4, "pooling_factr": 3}]')
    with pytest.raises(TableSpecError, match=r"'pooling_factr'.*did you mean 'pooling_factor'"):
        load_tables(path)


def test_features_sum_to_the_table_pooling_factor_and_round_trip():
    record = {
        "name": "a",
        "rows": 10,
        "dim": 8,
        "features": [
            {"name": "f0", "pooling_factor": 2.5},
            {"name": "f1", "pooling_factor": 1.5, "weighted": True},
        ],
    }
    spec = TableSpec.from_record(record)
    assert spec.pooling_factor == 4.0
    assert [f.weighted for f in spec.features] == [False, True]
    assert TableSpec.from_record(spec.to_record()) == spec
    with pytest.raises(TableSpecError, match="features' pooling factors sum to 4"):
        TableSpec.from_record({**record, "pooling_factor": 3.0})


def test_one_default_feature_is_the_canonical_form():
    spec = TableSpec.from_record(
        {
            "name": "a",
            "rows": 10,
            "dim": 8,
            "pooling_factor": 2.0,
            "features": [{"name": "a", "pooling_factor": 2.0}],
        }
    )
    assert spec == TableSpec("a", 10, 8, 2.0)
    assert spec.feature_list == (FeatureSpec("a", 2.0),)
