"""Fuzzing ``load_tables``: every input loads to valid TableSpecs or raises TableSpecError.

Hypothesis feeds random bytes, random text, junk JSON/YAML documents, mutated near-valid
records and ragged CSV; hand-made cases cover what random generation rarely reaches
(NaN/Infinity tokens, 1e400, 10**30, BOMs, duplicate and Unicode names, deep nesting).
``EXAMPLES`` caps each hypothesis test; the inputs actually tried are counted per category
and logged at module teardown (``pytest --log-cli-level=INFO``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import Counter

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuroshard.tables import load_tables
from neuroshard.types import DIM_MULTIPLE, MAX_ROWS, NUM_HIST_BINS, TableSpec, TableSpecError

log = logging.getLogger(__name__)

EXAMPLES = 200  # per hypothesis test below; several run once per file suffix
SUFFIXES = (".json", ".csv", ".yaml", ".txt")
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TRIED: Counter[str] = Counter()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    yield tmp_path_factory.mktemp("fuzz_tables")
    log.info(
        "load_tables fuzz inputs tried: %s (total %d)",
        dict(sorted(TRIED.items())),
        sum(TRIED.values()),
    )


def assert_valid(tables: list[TableSpec]) -> None:
    assert tables, "loaded an empty table list"
    assert len({t.name for t in tables}) == len(tables), "duplicate names loaded"
    for t in tables:
        assert isinstance(t, TableSpec)
        assert isinstance(t.name, str) and t.name.strip()
        assert type(t.rows) is int and 1 <= t.rows <= MAX_ROWS
        assert type(t.dim) is int and 0 < t.dim <= 65_536 and t.dim % DIM_MULTIPLE == 0
        assert isinstance(t.pooling_factor, float) and 0 < t.pooling_factor <= 1e6
        assert len(t.reuse_hist) == NUM_HIST_BINS
        assert all(isinstance(b, float) and math.isfinite(b) and b >= 0 for b in t.reuse_hist)
        assert abs(sum(t.reuse_hist) - 1) < 1e-6


def check(directory, suffix: str, content: bytes | str, category: str):
    """Load ``content`` as a ``suffix`` file: valid specs or TableSpecError, nothing else."""
    TRIED[category] += 1
    path = directory / f"tables{suffix}"
    if isinstance(content, str):
        path.write_bytes(content.encode("utf-8", "surrogatepass"))
    else:
        path.write_bytes(content)
    try:
        tables = load_tables(path)
    except TableSpecError as e:
        assert str(e).startswith(str(path)), f"message does not name the file: {e}"
        return None
    assert_valid(tables)
    return tables


# --------------------------------------------------------------------------- strategies

FIELDS = ("name", "rows", "dim", "pooling_factor", "reuse_hist", "num_embeddings", "embedding_dim")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.sampled_from([0, 1, 4, 64, 65_536, 65_540, MAX_ROWS, MAX_ROWS + 1, 10**30, -4]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([1e308, -1e308, 5e-324, 0.5, 1e6, 1e6 + 1, 4.0, 4.5]),
    st.text(max_size=12),
    st.sampled_from(
        [
            "",
            " ",
            "12",
            "1e400",
            "nan",
            "inf",
            "-Infinity",
            "0x10",
            "4.0",
            "1_0",
            "\u00e9t\u00e9",
            "\U0001f600",
            "\x00",
            "t0",
        ]
    ),
)
junk = st.recursive(
    scalars,
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(st.text(max_size=6) | st.sampled_from(FIELDS), kids, max_size=4)
    ),
    max_leaves=12,
)
hist_values = st.one_of(
    st.lists(st.floats(min_value=0, max_value=1), min_size=NUM_HIST_BINS, max_size=NUM_HIST_BINS),
    st.lists(junk, max_size=20),
    st.just([1.0] + [0.0] * (NUM_HIST_BINS - 1)),
    junk,
)


@st.composite
def records(draw):
    keys = draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=8), max_size=8, unique=True))
    record = {}
    for key in keys:
        if key == "reuse_hist":
            record[key] = draw(hist_values)
        elif key in ("rows", "num_embeddings"):
            record[key] = draw(st.integers(min_value=-5, max_value=10**7) | scalars)
        elif key in ("dim", "embedding_dim"):
            record[key] = draw(st.sampled_from([4, 8, 64, 256]) | scalars)
        else:
            record[key] = draw(junk)
    return record


documents = st.one_of(
    st.lists(records(), max_size=5),
    st.lists(records(), max_size=5).map(lambda r: {"tables": r}),
    st.lists(records() | junk, max_size=4),
    junk,
)


@st.composite
def near_valid_records(draw):
    """A list of valid records with at most one field of one record broken."""
    n = draw(st.integers(1, 5))
    recs = []
    for i in range(n):
        rec = {
            "name": draw(
                st.sampled_from([f"t{i}", f"\u8868{i}", f"emb {i} \U0001f600", f"t{i}\t"])
            ),
            "rows": draw(st.integers(1, 10**9)),
            "dim": 4 * draw(st.integers(1, 64)),
        }
        if draw(st.booleans()):
            rec["pooling_factor"] = draw(st.floats(min_value=0.01, max_value=1e6))
        if draw(st.booleans()):
            raw = draw(st.lists(st.floats(0, 1), min_size=NUM_HIST_BINS, max_size=NUM_HIST_BINS))
            total = sum(raw)
            rec["reuse_hist"] = [x / total for x in raw] if total > 0 else [1.0] + [0.0] * 16
        if draw(st.booleans()):  # TorchRec spellings
            rec["num_embeddings"] = rec.pop("rows")
            rec["embedding_dim"] = rec.pop("dim")
        recs.append(rec)
    if draw(st.booleans()):
        victim = recs[draw(st.integers(0, n - 1))]
        key = draw(st.sampled_from(FIELDS + ("extra",)))
        if draw(st.booleans()) and key in victim:
            del victim[key]
        else:
            victim[key] = draw(junk)
    if draw(st.integers(0, 9)) == 0:
        recs.append(dict(recs[0]))  # duplicate name
    return recs


csv_cells = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10),
    st.integers(-10, 10**8).map(str),
    st.floats().map(repr),
    st.sampled_from(
        [
            "",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "1" * 400,
            "0x10",
            "1_000",
            "4.0",
            " 64 ",
            '"',
            "a,b",
            "\u00e9",
            ";".join(["0.0625"] * 16),
            " ".join(["1"] + ["0"] * 16),
        ]
    ),
)
csv_columns = [
    "name",
    "rows",
    "dim",
    "pooling_factor",
    "reuse_hist",
    "num_embeddings",
    "embedding_dim",
    "extra",
    " name ",
    "",
] + [f"reuse_{i}" for i in range(NUM_HIST_BINS)]


@st.composite
def csv_text(draw):
    header = draw(st.lists(st.sampled_from(csv_columns), min_size=0, max_size=8))
    if draw(st.booleans()):  # usually a usable header, so the rows get validated
        header = ["name", "rows", "dim"] + header
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=draw(st.sampled_from(["\n", "\r\n", "\r"])))
    writer.writerow(header)
    for _ in range(draw(st.integers(0, 4))):
        width = len(header) + draw(st.sampled_from([0, 0, 0, -1, 1, 2]))
        writer.writerow(draw(st.lists(csv_cells, min_size=max(0, width), max_size=max(0, width))))
    text = buf.getvalue()
    if draw(st.integers(0, 9)) == 0:
        text = "\ufeff" + text
    return text


# --------------------------------------------------------------------------- hypothesis


@pytest.mark.parametrize("suffix", SUFFIXES)
@FUZZ
@given(blob=st.binary(max_size=400))
def test_random_bytes(fuzz_dir, suffix, blob):
    check(fuzz_dir, suffix, blob, "random bytes")


@pytest.mark.parametrize("suffix", SUFFIXES)
@FUZZ
@given(text=st.text(max_size=300))
def test_random_text(fuzz_dir, suffix, text):
    check(fuzz_dir, suffix, text, "random text")


@FUZZ
@given(doc=documents, indent=st.sampled_from([None, 1]))
def test_junk_json_documents(fuzz_dir, doc, indent):
    # allow_nan writes NaN / Infinity / -Infinity tokens, which must be refused
    check(fuzz_dir, ".json", json.dumps(doc, indent=indent, allow_nan=True), "junk JSON")


@FUZZ
@given(doc=documents)
def test_junk_yaml_documents(fuzz_dir, doc):
    check(fuzz_dir, ".yaml", yaml.safe_dump(doc, allow_unicode=True), "junk YAML")


@FUZZ
@given(recs=near_valid_records(), fmt=st.sampled_from([".json", ".yaml", ".yml"]))
def test_near_valid_records(fuzz_dir, recs, fmt):
    text = (
        json.dumps(recs, allow_nan=True)
        if fmt == ".json"
        else yaml.safe_dump(recs, allow_unicode=True)
    )
    check(fuzz_dir, fmt, text, "near-valid records")


@FUZZ
@given(text=csv_text())
def test_ragged_csv(fuzz_dir, text):
    check(fuzz_dir, ".csv", text, "ragged CSV")


@FUZZ
@given(
    recs=near_valid_records(), cut=st.integers(0, 400), junk_byte=st.binary(min_size=1, max_size=3)
)
def test_corrupted_valid_json(fuzz_dir, recs, cut, junk_byte):
    """Truncate or splice bytes into an otherwise loadable file."""
    blob = json.dumps(recs, ensure_ascii=False).encode()
    cut = min(cut, len(blob))
    check(fuzz_dir, ".json", blob[:cut] + junk_byte + blob[cut + 1 :], "corrupted JSON")


# --------------------------------------------------------------------------- hand-made

HIST = [1.0 / NUM_HIST_BINS] * NUM_HIST_BINS


def _j(records) -> str:
    return json.dumps(records)


def _rec(**kw):
    return [{"name": "t0", "rows": 1000, "dim": 64, **kw}]


def _named(*names):
    return [{"name": n, "rows": 3, "dim": 4} for n in names]


# (id, suffix, content, expected: "ok" | "error")
HAND_MADE = [
    ("empty json", ".json", "", "error"),
    ("whitespace json", ".json", " \n\t ", "error"),
    ("empty csv", ".csv", "", "error"),
    ("empty yaml", ".yaml", "", "error"),
    ("yaml null doc", ".yaml", "~\n", "error"),
    ("empty list", ".json", "[]", "error"),
    ("tables not a list", ".json", '{"tables": {"t0": 1}}', "error"),
    ("object without tables", ".json", '{"name": "t0"}', "error"),
    ("scalar doc", ".json", "42", "error"),
    ("string doc", ".json", '"tables"', "error"),
    ("entry is a list", ".json", "[[1, 2]]", "error"),
    ("entry is null", ".json", "[null]", "error"),
    ("NaN rows", ".json", '[{"name": "t0", "rows": NaN, "dim": 4}]', "error"),
    ("Infinity rows", ".json", '[{"name": "t0", "rows": Infinity, "dim": 4}]', "error"),
    (
        "-Infinity pooling",
        ".json",
        '[{"name": "t0", "rows": 1, "dim": 4, "pooling_factor": -Infinity}]',
        "error",
    ),
    (
        "NaN in hist",
        ".json",
        '[{"name": "t0", "rows": 1, "dim": 4, "reuse_hist": [NaN' + ", 0" * 16 + "]}]",
        "error",
    ),
    ("1e400 rows", ".json", '[{"name": "t0", "rows": 1e400, "dim": 4}]', "error"),
    ("-1e400 dim", ".json", '[{"name": "t0", "rows": 1, "dim": -1e400}]', "error"),
    (
        "1e400 pooling",
        ".json",
        '[{"name": "t0", "rows": 1, "dim": 4, "pooling_factor": 1e400}]',
        "error",
    ),
    (
        "1e400 in hist",
        ".json",
        '[{"name": "t0", "rows": 1, "dim": 4, "reuse_hist": [1e400' + ", 0" * 16 + "]}]",
        "error",
    ),
    ("10**30 rows", ".json", _j(_rec(rows=10**30)), "error"),
    ("10**400 rows", ".json", _j(_rec(rows=10**400)), "error"),
    ("5000-digit rows", ".json", '[{"name": "t0", "rows": ' + "9" * 5000 + ', "dim": 4}]', "error"),
    ("10**30 dim", ".json", _j(_rec(dim=10**30)), "error"),
    ("MAX_ROWS ok", ".json", _j(_rec(rows=MAX_ROWS, dim=4)), "ok"),
    ("MAX_ROWS+1", ".json", _j(_rec(rows=MAX_ROWS + 1)), "error"),
    ("1e-320 pooling", ".json", _j(_rec(pooling_factor=1e-320)), "ok"),
    ("zero pooling", ".json", _j(_rec(pooling_factor=0)), "error"),
    ("rows 1.5", ".json", _j(_rec(rows=1.5)), "error"),
    ("rows 1000.0", ".json", _j(_rec(rows=1000.0)), "ok"),
    ("rows as string", ".json", _j(_rec(rows="1000")), "ok"),
    ("rows bool", ".json", _j(_rec(rows=True)), "error"),
    ("rows list", ".json", _j(_rec(rows=[1000])), "error"),
    ("rows object", ".json", _j(_rec(rows={"value": 1000})), "error"),
    ("rows null", ".json", _j(_rec(rows=None)), "error"),
    ("dim 6", ".json", _j(_rec(dim=6)), "error"),
    ("dim 0", ".json", _j(_rec(dim=0)), "error"),
    ("dim 65540", ".json", _j(_rec(dim=65_540)), "error"),
    ("name int", ".json", '[{"name": 7, "rows": 1, "dim": 4}]', "error"),
    ("name blank", ".json", '[{"name": "  ", "rows": 1, "dim": 4}]', "error"),
    ("name null", ".json", '[{"name": null, "rows": 1, "dim": 4}]', "error"),
    ("missing name", ".json", '[{"rows": 1, "dim": 4}]', "error"),
    ("missing rows", ".json", '[{"name": "t0", "dim": 4}]', "error"),
    ("missing dim", ".json", '[{"name": "t0", "rows": 1}]', "error"),
    ("unknown fields refused", ".json", _j(_rec(owner="ads", weights=[1, 2])), "error"),
    ("misspelled field refused", ".json", _j(_rec(pooling_factr=2.0)), "error"),
    ("alias and field both", ".json", _j(_rec(num_embeddings=5)), "error"),
    (
        "torchrec spellings",
        ".json",
        '[{"name": "t0", "num_embeddings": 9, "embedding_dim": 8}]',
        "ok",
    ),
    ("duplicate names", ".json", _j(_rec() + _rec()), "error"),
    ("unicode names", ".json", _j(_named("表", "tàble", "\U0001f600", "t\u200b")), "ok"),
    ("names differ by NFC only", ".json", _j(_named("\u00e9", "e\u0301")), "ok"),
    # a lone surrogate cannot be written out as UTF-8: refused as a name
    ("lone surrogate escape", ".json", '[{"name": "\\ud800", "rows": 1, "dim": 4}]', "error"),
    ("hist 16 bins", ".json", _j(_rec(reuse_hist=HIST[:16])), "error"),
    ("hist 18 bins", ".json", _j(_rec(reuse_hist=HIST + [0.0])), "error"),
    ("hist negative", ".json", _j(_rec(reuse_hist=[-0.5, 1.5] + [0.0] * 15)), "error"),
    ("hist sums to 2", ".json", _j(_rec(reuse_hist=[2.0] + [0.0] * 16)), "error"),
    ("hist huge", ".json", _j(_rec(reuse_hist=[1.7e308, 1.7e308] + [0.0] * 15)), "error"),
    ("hist string", ".json", _j(_rec(reuse_hist="0.5 0.5")), "error"),
    ("hist object", ".json", _j(_rec(reuse_hist={"0": 1.0})), "error"),
    ("hist of strings", ".json", _j(_rec(reuse_hist=[str(x) for x in HIST])), "ok"),
    ("hist of bools", ".json", _j(_rec(reuse_hist=[True] + [False] * 16)), "error"),
    ("hist nested", ".json", _j(_rec(reuse_hist=[[1.0]] + [0.0] * 16)), "error"),
    (
        "nested junk",
        ".json",
        '[{"name": {"a": [1, {"b": null}]}, "rows": [[[]]], "dim": {}}]',
        "error",
    ),
    ("BOM json", ".json", "\ufeff" + _j(_rec()), "ok"),
    ("BOM yaml", ".yaml", "\ufeff- {name: t0, rows: 10, dim: 4}\n", "ok"),
    ("BOM csv", ".csv", "\ufeffname,rows,dim\nt0,10,4\n", "ok"),
    (
        "latin-1 bytes",
        ".json",
        '[{"name": "caf\xe9", "rows": 1, "dim": 4}]'.encode("latin-1"),
        "error",
    ),
    ("utf-16", ".json", _j(_rec()).encode("utf-16"), "error"),
    ("nul bytes", ".json", b"\x00" * 64, "error"),
    ("truncated", ".json", _j(_rec())[:-3], "error"),
    ("trailing comma", ".json", '[{"name": "t0", "rows": 1, "dim": 4},]', "error"),
    ("two documents", ".json", _j(_rec()) + _j(_rec()), "error"),
    ("csv ok", ".csv", "name,rows,dim,pooling_factor\nt0,10,4,\nt1,20,8,2.5\n", "ok"),
    ("csv torchrec", ".csv", "name,num_embeddings,embedding_dim\nt0,10,4\n", "ok"),
    ("csv missing column", ".csv", "name,rows\nt0,10\n", "error"),
    ("csv header only", ".csv", "name,rows,dim\n", "error"),
    ("csv extra value", ".csv", "name,rows,dim\nt0,10,4,99\n", "error"),
    ("csv missing value", ".csv", "name,rows,dim\nt0,10\n", "error"),
    ("csv unknown column refused", ".csv", "name,rows,dim,owner\nt0,10,4,ads\n", "error"),
    ("csv NaN", ".csv", "name,rows,dim\nt0,nan,4\n", "error"),
    ("csv inf", ".csv", "name,rows,dim\nt0,10,4\nt1,inf,4\n", "error"),
    ("csv 1e400", ".csv", "name,rows,dim\nt0,1e400,4\n", "error"),
    (
        "csv hist column",
        ".csv",
        "name,rows,dim,reuse_hist\nt0,10,4," + ";".join(map(str, HIST)) + "\n",
        "ok",
    ),
    (
        "csv hist bins",
        ".csv",
        "name,rows,dim,"
        + ",".join(f"reuse_{i}" for i in range(17))
        + "\nt0,10,4,"
        + ",".join(map(str, HIST))
        + "\n",
        "ok",
    ),
    ("csv hist bins short", ".csv", "name,rows,dim,reuse_0,reuse_1\nt0,10,4,0.5,0.5\n", "error"),
    ("csv duplicate names", ".csv", "name,rows,dim\nt0,10,4\nt0,10,4\n", "error"),
    # a line break in a name breaks every one-line message and CSV reader downstream
    ("csv quoted newline", ".csv", 'name,rows,dim\n"t\n0",10,4\n', "error"),
    ("csv unterminated quote", ".csv", 'name,rows,dim\n"t0,10,4\n', "error"),
    ("csv semicolons", ".csv", "name;rows;dim\nt0;10;4\n", "error"),
    ("yaml ok", ".yml", "tables:\n  - {name: t0, rows: 10, dim: 4}\n", "ok"),
    ("yaml nan", ".yaml", "- {name: t0, rows: .nan, dim: 4}\n", "error"),
    ("yaml inf", ".yaml", "- {name: t0, rows: 10, dim: 4, pooling_factor: .inf}\n", "error"),
    ("yaml date", ".yaml", "- {name: t0, rows: 2024-01-01, dim: 4}\n", "error"),
    ("yaml python tag", ".yaml", "!!python/object/apply:os.system ['true']\n", "error"),
    ("yaml set", ".yaml", "!!set {a, b}\n", "error"),
    ("yaml binary", ".yaml", "- {name: !!binary aGk=, rows: 1, dim: 4}\n", "error"),
    ("yaml recursive alias", ".yaml", "&a [*a]\n", "error"),
    (
        "yaml self-referencing record",
        ".yaml",
        "- &r {name: t0, rows: 1, dim: 4, extra: *r}\n",
        "error",
    ),
    ("yaml tab indent", ".yaml", "-\t{name: t0}\n\t- x", "error"),
    ("yaml bool name", ".yaml", "- {name: yes, rows: 1, dim: 4}\n", "error"),
    # a repeated key is an error, not "the last one wins" (issue 18, item 6)
    ("yaml duplicate key", ".yaml", "- {name: t0, rows: 1, rows: 2, dim: 4}\n", "error"),
    ("json duplicate key", ".json", '[{"name": "t0", "rows": 1, "rows": 2, "dim": 4}]', "error"),
    ("csv repeated column", ".csv", "name,rows,dim,rows\nt0,1,4,2\n", "error"),
    ("csv column and its alias", ".csv", "name,rows,dim,num_embeddings\nt0,1,4,2\n", "error"),
    (
        "misspelled field",
        ".json",
        '[{"name": "t0", "rows": 1, "dim": 4, "pooling_factr": 2}]',
        "error",
    ),
    ("yaml hex rows", ".yaml", "- {name: t0, rows: 0x10, dim: 4}\n", "ok"),
    ("json under .txt", ".txt", _j(_rec()), "ok"),
    ("no suffix junk", "", "\x01\x02", "error"),
]

FORMER_CRASHES = [
    pytest.param("deep json nesting", ".json", "[" * 100_000, id="deep json nesting"),
    pytest.param("closed deep json", ".json", "[" * 3000 + "]" * 3000, id="closed deep json"),
    pytest.param("deep yaml flow", ".yaml", "[" * 2000 + "]" * 2000, id="deep yaml flow"),
    pytest.param("deep yaml block", ".yaml", "- " * 3000 + "x\n", id="deep yaml block"),
    pytest.param(
        "5000-digit yaml int",
        ".yaml",
        "- {name: t0, rows: " + "9" * 5000 + ", dim: 4}\n",
        id="5000-digit yaml int",
    ),
    pytest.param(
        "csv field over 128 KiB",
        ".csv",
        "name,rows,dim\n" + "t" * 200_000 + ",10,4\n",
        id="csv field over 128 KiB",
    ),
]


@pytest.mark.parametrize(
    "case_id,suffix,content,expected", HAND_MADE, ids=[c[0] for c in HAND_MADE]
)
def test_hand_made(fuzz_dir, case_id, suffix, content, expected):
    tables = check(fuzz_dir, suffix, content, "hand-made")
    assert (tables is not None) == (expected == "ok"), f"{case_id}: expected {expected}"


@pytest.mark.parametrize("case_id,suffix,content", FORMER_CRASHES)
def test_former_crashes_are_clean_errors(fuzz_dir, case_id, suffix, content):
    check(fuzz_dir, suffix, content, "hand-made (former crash)")


def test_paths_that_are_not_files(tmp_path):
    for path in (tmp_path / "missing.json", tmp_path, tmp_path / "a\x00b.json"):
        with pytest.raises(TableSpecError):
            load_tables(path)
    TRIED["hand-made"] += 3


def test_valid_records_load_exactly(fuzz_dir):
    """The positive side: what goes in valid comes out equal, in every format."""
    recs = [
        {"name": "t0", "rows": 10, "dim": 4},
        {
            "name": "\u8868",
            "num_embeddings": 7,
            "embedding_dim": 128,
            "pooling_factor": 2.5,
            "reuse_hist": HIST,
        },
    ]
    for suffix, text in ((".json", _j(recs)), (".yaml", yaml.safe_dump(recs, allow_unicode=True))):
        tables = check(fuzz_dir, suffix, text, "hand-made")
        assert [(t.name, t.rows, t.dim, t.pooling_factor) for t in tables] == [
            ("t0", 10, 4, 1.0),
            ("\u8868", 7, 128, 2.5),
        ]
        assert tables[1].reuse_hist == tuple(HIST)
