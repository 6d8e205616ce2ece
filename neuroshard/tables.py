"""Loading and validating table configs (JSON, CSV, YAML).

A config is a list of tables, each with ``name``, ``rows``, ``dim``, optional
``pooling_factor`` (default 1.0) and optional ``reuse_hist`` (17 fractions summing to 1;
default: the dataset-wide DLRM histogram). TorchRec spellings ``num_embeddings`` and
``embedding_dim`` are accepted. A JSON/YAML file may hold the list itself or an object
with a ``tables`` list. In CSV, ``reuse_hist`` is either one column of 17 numbers
separated by spaces or semicolons, or columns ``reuse_0`` .. ``reuse_16``.

A key repeated in one JSON/YAML object, or a column repeated in a CSV header (an alias
and its field count as one), is an error rather than "the last one wins".

Every problem raises :class:`TableSpecError` naming the file, the table and the field.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from neuroshard.atomic import write_text_atomic
from neuroshard.paths import input_problem
from neuroshard.types import (
    NUM_HIST_BINS,
    Constraints,
    TableConstraint,
    TableSpec,
    TableSpecError,
)

_ALIASES = {"num_embeddings": "rows", "embedding_dim": "dim"}


def load_tables(path: str | Path) -> list[TableSpec]:
    """Read and validate a table config from ``path`` (format from its suffix); tables'
    placement ``constraints`` are read by :func:`load_table_config`."""
    return load_table_config(path)[0]


def load_table_config(path: str | Path) -> tuple[list[TableSpec], Constraints]:
    """The tables of the config at ``path`` and their placement constraints (see
    :func:`constraints_from_records`)."""
    path = Path(path)
    source = str(path)
    problem = input_problem(path)
    if problem is not None:
        raise TableSpecError(problem, source=source)
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise TableSpecError(
            f"not UTF-8 text ({e.reason} at byte {e.start})", source=source
        ) from None
    except OSError as e:
        raise TableSpecError(f"cannot read: {e.strerror}", source=source) from None
    suffix = path.suffix.lower()
    records: Sequence[Mapping[str, Any]]
    if suffix == ".csv":
        records = _read_csv(text, source)
    elif suffix in (".yaml", ".yml"):
        records = _records_from_document(_read_yaml(text, source), source)
    else:
        records = _records_from_document(_read_json(text, source), source)
    tables = tables_from_records(records, source=source, extra=("constraints",))
    return tables, constraints_from_records(records, source=source)


# Keys of a table record's ``constraints`` object -> TableConstraint field.
_CONSTRAINT_KEYS = {
    "sharding_types": "sharding_types",
    "compute_kernels": "compute_kernels",
    "devices": "devices",
    "hosts": "hosts",
    "cache_fraction": "cache_fraction",
}


def constraints_from_records(
    records: Sequence[Mapping[str, Any]], *, source: str = "<tables>"
) -> Constraints:
    """The placement constraints table records carry, each under ``constraints``: any of
    ``sharding_types`` and ``compute_kernels`` (lists of those allowed), ``devices`` and
    ``hosts`` (lists of indices the table's shards may sit on), ``cache_fraction`` and
    ``colocate`` (a group label: the tables sharing it share a device). Shapes are checked
    here (:class:`TableSpecError` naming the table and key); whether they can hold, when
    planning (:meth:`Constraints.check`)."""
    tables: dict[str, TableConstraint] = {}
    groups: dict[str, list[str]] = {}
    for record in records:
        given = record.get("constraints")
        if given is None:
            continue
        name = str(record.get("name"))
        if not isinstance(given, Mapping):
            raise TableSpecError(
                "must be an object", source=source, table=name, field_name="constraints"
            )
        unknown = sorted(set(given) - set(_CONSTRAINT_KEYS) - {"colocate"})
        if unknown:
            raise TableSpecError(
                f"unknown keys {unknown}; known: {sorted([*_CONSTRAINT_KEYS, 'colocate'])}",
                source=source,
                table=name,
                field_name="constraints",
            )
        fields: dict[str, Any] = {}
        for key, attr in _CONSTRAINT_KEYS.items():
            if key not in given:
                continue
            value = given[key]
            if key == "cache_fraction":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise TableSpecError(
                        f"must be a number, got {value!r}",
                        source=source,
                        table=name,
                        field_name=f"constraints.{key}",
                    )
                fields[attr] = float(value)
                continue
            want = str if key in ("sharding_types", "compute_kernels") else int
            if (
                isinstance(value, (str, bytes))
                or not isinstance(value, Sequence)
                or any(isinstance(v, bool) or not isinstance(v, want) for v in value)
            ):
                raise TableSpecError(
                    f"must be a list of {want.__name__}s, got {value!r}",
                    source=source,
                    table=name,
                    field_name=f"constraints.{key}",
                )
            fields[attr] = tuple(value)
        if "colocate" in given:
            label = given["colocate"]
            if not isinstance(label, str) or not label:
                raise TableSpecError(
                    f"must be a group label (a string), got {label!r}",
                    source=source,
                    table=name,
                    field_name="constraints.colocate",
                )
            groups.setdefault(label, []).append(name)
        if fields:
            tables[name] = TableConstraint(**fields)
    return Constraints(tables=tables, colocate=tuple(tuple(g) for g in groups.values()))


def tables_from_records(
    records: Sequence[Mapping[str, Any]], *, source: str = "<tables>", extra: Sequence[str] = ()
) -> list[TableSpec]:
    """Validate a list of table dicts into :class:`TableSpec`s (:meth:`TableSpec.from_record`
    each; keys in ``extra`` are left to the caller) with unique names."""
    if not records:
        raise TableSpecError("no tables", source=source)
    tables: list[TableSpec] = []
    seen: set[str] = set()
    for i, record in enumerate(records):
        table = TableSpec.from_record(record, source=source, index=i, extra=extra)
        if table.name in seen:
            raise TableSpecError(
                "duplicate table name", source=source, table=table.name, field_name="name"
            )
        seen.add(table.name)
        tables.append(table)
    return tables


def save_tables(tables: Iterable[TableSpec], path: str | Path) -> None:
    """Write ``tables`` as a JSON table config, atomically; they are validated first
    (:func:`tables_from_records`), so what is written is what :func:`load_tables` reads."""
    records = [t.to_record() for t in tables]
    tables_from_records(records, source=str(path))
    write_text_atomic(path, json.dumps(records, indent=1, allow_nan=False) + "\n")


# --------------------------------------------------------------------------- parsing


def _read_json(text: str, source: str) -> Any:
    if not text.strip():
        raise TableSpecError("empty file", source=source)
    try:
        return json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=unique_keys(source)
        )
    except TableSpecError:
        raise
    except json.JSONDecodeError as e:
        raise TableSpecError(
            f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}", source=source
        ) from None
    except ValueError as e:
        raise TableSpecError(f"malformed JSON: {e}", source=source) from None
    except RecursionError:
        raise TableSpecError("malformed JSON: nested too deeply", source=source) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid number")


def unique_keys(source: str) -> Any:
    """A ``json.loads`` ``object_pairs_hook`` that refuses a key given twice in one object
    (:class:`TableSpecError` naming it) instead of keeping the last value."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise TableSpecError(f"key {key!r} given twice in one object", source=source)
            out[key] = value
        return out

    return hook


def _read_yaml(text: str, source: str) -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml ships with the stack
        raise TableSpecError(
            "YAML configs need PyYAML (pip install pyyaml)", source=source
        ) from None
    if not text.strip():
        raise TableSpecError("empty file", source=source)
    try:
        return yaml.load(text, Loader=_unique_key_loader(yaml))  # noqa: S506 -- a SafeLoader
    except TableSpecError as e:
        raise TableSpecError(str(e), source=source) from None
    except yaml.YAMLError as e:
        raise TableSpecError(f"malformed YAML: {str(e).splitlines()[0]}", source=source) from None
    except RecursionError:
        raise TableSpecError("malformed YAML: nested too deeply", source=source) from None
    except ValueError as e:  # e.g. an integer literal with too many digits
        raise TableSpecError(f"malformed YAML: {e}", source=source) from None


def _unique_key_loader(yaml: Any) -> Any:
    """A :class:`yaml.SafeLoader` that refuses a key given twice in one mapping."""

    class UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc,name-defined]
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    repeated = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader says so itself
                    continue
                if repeated:
                    raise TableSpecError(
                        f"key {key!r} given twice in one mapping "
                        f"(line {key_node.start_mark.line + 1})"
                    )
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _records_from_document(doc: Any, source: str) -> list[Mapping[str, Any]]:
    if isinstance(doc, Mapping):
        if "tables" not in doc:
            raise TableSpecError(
                "expected a list of tables or an object with a 'tables' list", source=source
            )
        doc = doc["tables"]
    if not isinstance(doc, list):
        raise TableSpecError(f"expected a list of tables, got {type(doc).__name__}", source=source)
    return doc


def _read_csv(text: str, source: str) -> list[dict[str, Any]]:
    if not text.strip():
        raise TableSpecError("empty file", source=source)
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
    except csv.Error as e:
        raise TableSpecError(f"malformed CSV header: {e}", source=source) from None
    canonical = {_ALIASES.get(h, h) for h in header}
    if len(canonical) < len(header):
        repeated = sorted(
            {
                h
                for h in header
                if [_ALIASES.get(x, x) for x in header].count(_ALIASES.get(h, h)) > 1
            }
        )
        raise TableSpecError(
            f"CSV header repeats column(s) {', '.join(map(repr, repeated))} "
            "(a column and its alias count as one)",
            source=source,
        )
    for required in ("name", "rows", "dim"):
        if required not in canonical:
            raise TableSpecError(
                f"CSV header lacks column {required!r} (has {', '.join(header)})", source=source
            )
    try:
        return _csv_records(reader, source)
    except csv.Error as e:
        raise TableSpecError(
            f"malformed CSV at line {reader.line_num}: {e}", source=source
        ) from None


def _csv_records(reader: csv.DictReader, source: str) -> list[dict[str, Any]]:
    records = []
    for line_no, row in enumerate(reader, start=2):
        if None in row:
            raise TableSpecError(
                f"line {line_no} has more values than the header has columns", source=source
            )
        row = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
        if any(v is None for v in row.values()):
            raise TableSpecError(
                f"line {line_no} has fewer values than the header has columns", source=source
            )
        bins = [f"reuse_{i}" for i in range(NUM_HIST_BINS)]
        if any(b in row for b in bins):
            row["reuse_hist"] = [row.pop(b, "") for b in bins]
        elif row.get("reuse_hist"):
            row["reuse_hist"] = row["reuse_hist"].replace(";", " ").split()
        else:
            row.pop("reuse_hist", None)
        if row.get("pooling_factor", None) == "":
            row.pop("pooling_factor")
        records.append(row)
    return records
