"""LightGBM cost model: gradient-boosted trees over per-load and per-device aggregates.

:class:`LightGBMCostModel` implements :class:`~neuroshard.types.CostEstimator` like
:class:`~neuroshard.models.neural.NeuralCostModel` does, from the same collected data, with
three boosted regressors on ``log(ms + eps_ms)``:

* **compute** -- one row per device load, made of aggregates of the load's per-shard
  features (:mod:`neuroshard.features`, schema ``table20/v1``): the shard count; sum, max
  and mean of the width, pooling factor and lookups (pooling x width); min, max and mean
  of ``log10(rows)``; log of total and largest memory; an estimate of the bytes the batch
  actually touches (unique rows from the reuse histogram, times width); the lookup share
  of hot rows (reuse bins above 16 accesses); and the lookup-weighted mean of every
  reuse bin. Trees cannot add over shards the way the neural model sums embeddings, so
  the sums are given to them.
* **backward comm** and **forward comm** -- one row per device: its own dim sum, the
  device count, the total, its share, and the mean, max and min of the *other* devices'
  dim sums, and the all-to-all traffic it sends and receives (in embedding columns:
  ``dim_sum * (N - 1) / N`` out, ``(total - dim_sum) / N`` in), which carries the model
  to device counts it was not trained on far better than the count alone. Forward adds its wait
  since the first device and the largest such wait. As in the neural model, the forward
  regressor learns the time *minus the straggler wait* ``max_j waits_j - waits_d``,
  which is added back exactly at prediction.

A model directory holds ``compute.lgb.txt``, ``bwd_comm.lgb.txt`` and
``fwd_comm.lgb.txt`` (LightGBM's text model format) and ``meta.json`` with ``kind``
``"lightgbm"`` and the same metadata as the neural model (feature schema, backend and
fingerprint, batch size, device count, data hash, sample counts, metrics, file
checksums). :func:`~neuroshard.models.load_cost_model` loads it by that kind.

LightGBM's own text parser trusts its input: a truncated or edited model file can abort
or crash the process (``[LightGBM] [Fatal] Model format error``, then a segfault). So a
model file is checked here first, tree by tree (:func:`check_model_text`: sizes, counts,
numbers, child links forming one tree), and LightGBM is handed only the header and
trees that passed; any problem is a :class:`~neuroshard.types.ModelFileError` naming the
file and the tree.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from neuroshard.atomic import write_text_atomic
from neuroshard.features import NUM_FEATURES, raw_features
from neuroshard.models.base import (
    META_FILE,
    TARGET_TRANSFORM,
    CostModelBase,
    checked_file,
    read_meta,
    since_first,
    straggler_wait,
)
from neuroshard.samples import CommData, ComputeData, Split
from neuroshard.types import NUM_HIST_BINS, ModelFileError, TableSpec

if TYPE_CHECKING:  # pragma: no cover
    import lightgbm

logger = logging.getLogger(__name__)

__all__ = [
    "COMPUTE_COLUMNS",
    "FWD_COLUMNS",
    "BWD_COLUMNS",
    "LightGBMCostModel",
    "check_model_text",
    "comm_features",
    "load_features",
]

MODEL_FILES = {"compute": "compute.lgb.txt", "bwd": "bwd_comm.lgb.txt", "fwd": "fwd_comm.lgb.txt"}
_DIM, _POOLING, _ROWS = NUM_HIST_BINS, NUM_HIST_BINS + 1, NUM_HIST_BINS + 2
# Typical access count of an index in each reuse bin: geometric middle of (2^(k-1), 2^k],
# 1 for the first bin and 2^15.5 for the open last one.
_BIN_ACCESSES = np.array([1.0] + [2.0 ** (k - 0.5) for k in range(1, NUM_HIST_BINS)])
_HOT_FROM_BIN = 5  # bins 5.. hold indices accessed more than 16 times per batch

COMPUTE_COLUMNS: tuple[str, ...] = (
    "num_shards",
    "dim_sum",
    "dim_max",
    "dim_mean",
    "pooling_sum",
    "pooling_max",
    "pooling_mean",
    "lookups_sum",
    "lookups_max",
    "lookups_mean",
    "log_rows_min",
    "log_rows_max",
    "log_rows_mean",
    "log_bytes_sum",
    "log_bytes_max",
    "log_touched_bytes_sum",
    "log_touched_bytes_max",
    "hot_lookup_share",
) + tuple(f"lookup_weighted_reuse_{i}" for i in range(NUM_HIST_BINS))
BWD_COLUMNS: tuple[str, ...] = (
    "dim_sum",
    "num_devices",
    "total_dim_sum",
    "dim_share",
    "others_mean",
    "others_max",
    "others_min",
    "sent_dims",
    "received_dims",
    "max_sent_received_dims",
)
FWD_COLUMNS: tuple[str, ...] = BWD_COLUMNS + ("wait_since_first_ms", "max_wait_since_first_ms")


# --------------------------------------------------------------------------- features


def load_features(raw: np.ndarray, offsets: np.ndarray, batch_size: int) -> np.ndarray:
    """Aggregate features ``(len(offsets) - 1, len(COMPUTE_COLUMNS))`` of ragged loads.

    ``raw`` holds every shard's 20 raw features (:func:`neuroshard.features.raw_features`),
    load ``i`` being rows ``offsets[i]:offsets[i+1]``. Empty loads get a row of zeros.
    """
    raw = np.asarray(raw, dtype=np.float64).reshape(-1, NUM_FEATURES)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    out = np.zeros((n, len(COMPUTE_COLUMNS)))
    counts = np.diff(offsets)
    busy = counts > 0
    if not busy.any():
        return out
    hist = np.clip(raw[:, :NUM_HIST_BINS], 0.0, None)
    dim = np.maximum(raw[:, _DIM], 1.0)
    pooling = np.maximum(raw[:, _POOLING], 0.0)
    rows = np.maximum(raw[:, _ROWS], 1.0)
    lookups = pooling * dim
    log_rows = np.log10(rows)
    bytes_ = rows * dim * 4.0
    # Unique rows a batch touches: its lookups over the mean accesses per unique index,
    # at most the table's rows; hot share: the fraction of lookups to indices in hot bins.
    per_bin = hist * _BIN_ACCESSES
    mean_access = np.maximum(per_bin.sum(axis=1), 1.0)
    touched = np.minimum(batch_size * pooling / mean_access, rows) * dim * 4.0
    hot_share = per_bin[:, _HOT_FROM_BIN:].sum(axis=1) / np.maximum(per_bin.sum(axis=1), 1e-12)

    starts = offsets[:-1][busy]
    cnt = counts[busy].astype(np.float64)

    def seg_sum(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x, starts, axis=0)

    def seg_max(x: np.ndarray) -> np.ndarray:
        return np.maximum.reduceat(x, starts, axis=0)

    def seg_min(x: np.ndarray) -> np.ndarray:
        return np.minimum.reduceat(x, starts, axis=0)

    lookups_sum = seg_sum(lookups)
    weights = np.maximum(lookups_sum, 1e-12)[:, None]
    cols = [
        cnt,
        seg_sum(dim),
        seg_max(dim),
        seg_sum(dim) / cnt,
        seg_sum(pooling),
        seg_max(pooling),
        seg_sum(pooling) / cnt,
        lookups_sum,
        seg_max(lookups),
        lookups_sum / cnt,
        seg_min(log_rows),
        seg_max(log_rows),
        seg_sum(log_rows) / cnt,
        np.log10(seg_sum(bytes_)),
        np.log10(seg_max(bytes_)),
        np.log10(seg_sum(touched) + 1.0),
        np.log10(seg_max(touched) + 1.0),
        seg_sum(hot_share * lookups) / weights[:, 0],
    ]
    out[busy] = np.column_stack(cols + [seg_sum(hist * lookups[:, None]) / weights])
    return out


def comm_features(
    dim_sums: np.ndarray, waits_ms: np.ndarray | None, mask: np.ndarray
) -> np.ndarray:
    """Per-device features ``(B, N, len(BWD_COLUMNS or FWD_COLUMNS))`` (forward with waits)."""
    d = np.where(mask, np.asarray(dim_sums, dtype=np.float64), 0.0)
    n_dev = mask.sum(axis=-1, keepdims=True)
    total = d.sum(axis=-1, keepdims=True)
    others_n = np.maximum(n_dev - 1, 1)
    others_mean = np.where(n_dev > 1, (total - d) / others_n, 0.0)
    # max/min over the other real devices: mask self and padding out
    eye = np.eye(d.shape[-1], dtype=bool)[None]
    valid = mask[:, None, :] & ~eye
    others = np.broadcast_to(d[:, None, :], valid.shape)
    others_max = np.where(valid, others, -np.inf).max(axis=-1)
    others_min = np.where(valid, others, np.inf).min(axis=-1)
    others_max = np.where(np.isfinite(others_max), others_max, 0.0)
    others_min = np.where(np.isfinite(others_min), others_min, 0.0)
    # all-to-all traffic in embedding columns per sample: a device keeps 1/N of its own
    # pooled outputs and sends the rest; it receives 1/N of every other device's
    sent = d * (n_dev - 1) / np.maximum(n_dev, 1)
    received = (total - d) / np.maximum(n_dev, 1)
    cols = [
        d,
        np.broadcast_to(n_dev, d.shape),
        np.broadcast_to(total, d.shape),
        d / np.maximum(total, 1.0),
        others_mean,
        others_max,
        others_min,
        sent,
        received,
        np.maximum(sent, received),
    ]
    if waits_ms is not None:
        gap = since_first(np.asarray(waits_ms, dtype=np.float64), mask)
        cols += [gap, np.broadcast_to(gap.max(axis=-1, keepdims=True), d.shape)]
    return np.stack(cols, axis=-1)


# --------------------------------------------------------------------------- the model


class LightGBMCostModel(CostModelBase):
    """LightGBM :class:`~neuroshard.types.CostEstimator` (compute, backward and forward comm).

    Hyperparameters are set here (``num_threads`` defaults to 1; LightGBM's own default
    takes every core); :meth:`fit` learns the attributes ending in ``_``. Boosting stops
    early when the validation split has not improved for ``early_stopping_rounds``.
    """

    kind = "lightgbm"
    _fitted_attr = "boosters_"

    def __init__(
        self,
        *,
        batch_size: int | None = None,
        n_estimators: int = 2000,
        learning_rate: float = 0.05,
        num_leaves: int = 63,
        min_child_samples: int = 10,
        subsample: float = 0.8,
        colsample_bytree: float = 0.9,
        reg_lambda: float = 0.0,
        early_stopping_rounds: int = 50,
        seed: int = 0,
        num_threads: int = 1,
        eps_ms: float = 1e-3,
    ):
        self.batch_size = batch_size
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.early_stopping_rounds = early_stopping_rounds
        self.seed = seed
        self.num_threads = num_threads
        self.eps_ms = eps_ms

    def _hyperparameters(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in (
                "n_estimators",
                "learning_rate",
                "num_leaves",
                "min_child_samples",
                "subsample",
                "colsample_bytree",
                "reg_lambda",
                "early_stopping_rounds",
                "seed",
                "num_threads",
            )
        }

    # ------------------------------------------------------------- fitting

    def _params(self) -> dict[str, Any]:
        return {
            "objective": "regression",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples,
            "bagging_fraction": self.subsample,
            "bagging_freq": 1 if self.subsample < 1 else 0,
            "feature_fraction": self.colsample_bytree,
            "lambda_l2": self.reg_lambda,
            "seed": self.seed,
            "num_threads": self.num_threads,
            "verbosity": -1,
            "deterministic": True,
            "force_row_wise": True,
        }

    def _train(
        self,
        which: str,
        x_tr: np.ndarray,
        y_tr: np.ndarray,
        x_va: np.ndarray,
        y_va: np.ndarray,
        columns: Sequence[str],
    ) -> lightgbm.Booster:
        import lightgbm as lgb

        train = lgb.Dataset(
            x_tr, self._to_target(y_tr), feature_name=list(columns), free_raw_data=True
        )
        callbacks: list[Callable[..., Any]] = [lgb.log_evaluation(0)]
        valid_sets = []
        if len(x_va):
            valid_sets = [lgb.Dataset(x_va, self._to_target(y_va), reference=train)]
            callbacks.append(lgb.early_stopping(self.early_stopping_rounds, verbose=False))
        booster = lgb.train(
            self._params(),
            train,
            num_boost_round=self.n_estimators,
            valid_sets=valid_sets,
            callbacks=callbacks,
        )
        best = booster.best_iteration or booster.current_iteration()
        logger.info("%s: %d trees (best of %d)", which, best, booster.current_iteration())
        if best and best < booster.current_iteration():
            # keep only the best trees, so a saved and reloaded model predicts the same
            booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
        return booster

    def fit(
        self,
        compute: ComputeData,
        comm: CommData,
        *,
        compute_split: Split | None = None,
        comm_split: Split | None = None,
        backend_name: str | None = None,
        num_devices: int | None = None,
    ) -> LightGBMCostModel:
        """Train the three regressors on collected data; test metrics go to ``metrics_``.

        Same contract as :meth:`NeuralCostModel.fit`: splits default to 80/10/10 by a
        permutation seeded with ``seed``; validation stops boosting, test gives metrics.
        """
        cs, ms = self._begin_fit(
            compute,
            comm,
            compute_split=compute_split,
            comm_split=comm_split,
            backend_name=backend_name,
            num_devices=num_devices,
        )
        tr, va = compute.subset(cs.train), compute.subset(cs.val)
        boosters = {
            "compute": self._train(
                "compute",
                self._compute_x(tr),
                tr.label_ms,
                self._compute_x(va),
                va.label_ms,
                COMPUTE_COLUMNS,
            )
        }
        ctr, cva = comm.subset(ms.train), comm.subset(ms.val)
        for which, columns in (("bwd", BWD_COLUMNS), ("fwd", FWD_COLUMNS)):
            xs, ys = [], []
            for part in (ctr, cva):
                x = comm_features(
                    part.dim_sums, part.waits_ms if which == "fwd" else None, part.mask
                )
                y = self._fwd_label(part) if which == "fwd" else part.bwd_ms
                xs.append(x[part.mask])
                ys.append(y[part.mask])
            boosters[which] = self._train(f"{which} comm", xs[0], ys[0], xs[1], ys[1], columns)
        self.boosters_ = boosters

        self._end_fit(compute, comm, cs, ms)
        self.training_summary_ = {
            k: {"num_trees": b.current_iteration()} for k, b in boosters.items()
        }
        return self

    @staticmethod
    def _fwd_label(comm: CommData) -> np.ndarray:
        return comm.fwd_ms - straggler_wait(comm.waits_ms, comm.mask)

    def _to_target(self, ms: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(np.asarray(ms, dtype=np.float64), 0.0) + self.eps_ms)

    def _from_target(self, y: np.ndarray) -> np.ndarray:
        return np.maximum(np.exp(np.asarray(y, dtype=np.float64)) - self.eps_ms, 0.0)

    def _compute_x(self, data: ComputeData) -> np.ndarray:
        return load_features(data.features, data.offsets, self.fitted_batch_size)

    def _predict(self, which: str, x: np.ndarray) -> np.ndarray:
        if not len(x):
            return np.zeros(0)
        return self._from_target(
            np.asarray(self.boosters_[which].predict(x, num_threads=self.num_threads))
        )

    # ------------------------------------------------------------- inference

    def _compute_from_raw(self, raw: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        counts = np.diff(offsets)
        out = np.zeros(len(counts))
        busy = counts > 0
        if busy.any():
            x = load_features(raw, offsets, self.fitted_batch_size)
            out[busy] = self._predict("compute", x[busy])
        return out

    def compute_ms(self, loads: Sequence[Sequence[TableSpec]]) -> np.ndarray:
        """Fused forward+backward ms of each load; an empty load costs 0."""
        self._check_fitted()
        counts = np.fromiter((len(load) for load in loads), dtype=np.int64, count=len(loads))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return self._compute_from_raw(raw_features([t for load in loads for t in load]), offsets)

    def _comm(
        self,
        which: str,
        dim_sums: np.ndarray,
        waits_ms: np.ndarray | None,
        mask: np.ndarray | None = None,
    ) -> np.ndarray:
        self._check_fitted()
        d, waits_ms, mask, squeeze = self._comm_batch(dim_sums, waits_ms, mask)
        w = None if waits_ms is None else np.asarray(waits_ms, dtype=np.float64)
        x = comm_features(d, w, mask)
        out = np.zeros(d.shape)
        out[mask] = self._predict(which, x[mask])
        if which == "fwd" and w is not None:
            out = out + straggler_wait(w, mask)
        out = np.where(mask, out, 0.0)
        return out[0] if squeeze else out

    # ------------------------------------------------------------- scoring

    def _predict_compute_data(self, data: ComputeData) -> np.ndarray:
        return self._compute_from_raw(data.features, data.offsets)

    # ------------------------------------------------------------- files

    def meta(self) -> dict[str, Any]:
        """What ``meta.json`` records (without the file checksums)."""
        return {
            **self._base_meta(),
            "aggregate_features": {
                "compute": list(COMPUTE_COLUMNS),
                "bwd": list(BWD_COLUMNS),
                "fwd": list(FWD_COLUMNS),
            },
            "target_transform": TARGET_TRANSFORM.replace(", standardised", ""),
            "fwd_target": "residual",
            "normalisation": {"eps_ms": self.eps_ms},
            "hyperparameters": self._hyperparameters(),
            "lightgbm_version": _lightgbm_version(),
        }

    def save(self, model_dir: str | os.PathLike) -> Path:
        """Write the three LightGBM text models and ``meta.json`` into ``model_dir``."""
        self._check_fitted()
        out = Path(model_dir)
        out.mkdir(parents=True, exist_ok=True)
        for which, fname in MODEL_FILES.items():
            write_text_atomic(out / fname, self.boosters_[which].model_to_string())
        return self._write_meta(out, tuple(MODEL_FILES.values()))

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike,
        meta: Mapping[str, Any] | None = None,
    ) -> LightGBMCostModel:
        """A fitted model from ``model_dir`` (``meta`` if already read)."""
        import lightgbm as lgb

        d = Path(model_dir)
        meta = dict(meta) if meta is not None else read_meta(d)
        try:
            if meta["kind"] != cls.kind:
                raise ValueError(f"kind {meta['kind']!r} is not {cls.kind!r}")
            hyper = {
                k: v
                for k, v in dict(meta.get("hyperparameters", {})).items()
                if k in cls().__dict__
            }
            model = cls(
                batch_size=int(meta["batch_size"]),
                eps_ms=float(meta["normalisation"]["eps_ms"]),
                **hyper,
            )
            agg = meta["aggregate_features"]
            for which, columns in (
                ("compute", COMPUTE_COLUMNS),
                ("bwd", BWD_COLUMNS),
                ("fwd", FWD_COLUMNS),
            ):
                if list(agg[which]) != list(columns):
                    raise ValueError(
                        f"{which} features {agg[which]} are not this NeuroShard's {list(columns)}"
                    )
            model._load_base_meta(meta)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelFileError(f"{d / META_FILE}: bad or missing entry ({exc!r})") from exc

        checksums = meta.get("files", {})
        boosters = {}
        for which, fname in MODEL_FILES.items():
            path = checked_file(d, fname, checksums)
            expected = {"compute": COMPUTE_COLUMNS, "bwd": BWD_COLUMNS, "fwd": FWD_COLUMNS}[which]
            text = check_model_text(path.read_bytes(), str(path), expected)
            try:
                booster = lgb.Booster(model_str=text)
            except Exception as exc:  # noqa: BLE001 -- any unreadable model is one error
                raise ModelFileError(f"{path}: unreadable LightGBM model ({exc})") from exc
            if booster.num_feature() != len(expected):
                raise ModelFileError(
                    f"{path}: {booster.num_feature()} features, expected {len(expected)}"
                )
            boosters[which] = booster
        model.boosters_ = boosters
        model.meta_ = meta
        return model


# --------------------------------------------------------------------------- model text

# Every key of a LightGBM v4 regression model's header, in its order.
_HEADER_KEYS = (
    "version",
    "num_class",
    "num_tree_per_iteration",
    "label_index",
    "max_feature_idx",
    "objective",
    "feature_names",
    "feature_infos",
    "tree_sizes",
)
_TREE_INTS = ("split_feature", "decision_type", "left_child", "right_child")
_TREE_FLOATS = ("split_gain", "threshold", "internal_value", "internal_weight")
# Every key LightGBM writes for a tree of a boosted regression model, in its order.
_TREE_KEYS = (
    "num_leaves",
    "num_cat",
    "split_feature",
    "split_gain",
    "threshold",
    "decision_type",
    "left_child",
    "right_child",
    "leaf_value",
    "leaf_weight",
    "leaf_count",
    "internal_value",
    "internal_weight",
    "internal_count",
    "is_linear",
    "shrinkage",
)
_MAX_LEAVES = 1 << 17


def check_model_text(blob: bytes, source: str, feature_names: Sequence[str]) -> str:
    """The text of a LightGBM regression model as LightGBM should parse it: its header
    and its trees, each checked (:class:`ModelFileError` naming ``source`` and the tree
    otherwise); the sections after the trees (feature importances, training parameters)
    are left out, as prediction does not read them.

    Checked: the header (``tree``, one class, a regression objective, ``feature_names``
    equal to ``feature_names``, ``tree_sizes``); every tree where ``tree_sizes`` puts it,
    numbered in order, with ``num_leaves``, no categorical splits and no linear leaves,
    every array of the length its leaf count implies, finite numbers, split features in
    range, and child links that reach every node and leaf exactly once from the root;
    ``end of trees`` right after the last tree.
    """

    def bad(message: str) -> ModelFileError:
        return ModelFileError(f"{source}: not a valid LightGBM model: {message}")

    try:
        text = blob.decode("ascii")
    except UnicodeDecodeError as exc:
        raise bad(f"a byte that is not ASCII at offset {exc.start}") from None
    head_end = text.find("\n\n")
    if not text.startswith("tree\n") or head_end < 0:
        raise bad("no 'tree' header")
    header = _key_values(text[:head_end].split("\n")[1:], "header", bad)
    if tuple(header) != _HEADER_KEYS:
        raise bad(f"header keys {list(header)} are not a LightGBM v4 regression model's")
    if header.get("num_class") != "1" or header.get("num_tree_per_iteration") != "1":
        raise bad("not a single-output model (num_class, num_tree_per_iteration)")
    if header.get("version") != "v4" or header.get("objective") != "regression":
        raise bad(
            f"version {header.get('version')!r} or objective "
            f"{header.get('objective')!r} is not v4 regression"
        )
    names = header.get("feature_names", "").split(" ")
    if names != list(feature_names):
        raise bad(
            f"feature_names {names[:3]}... are not this NeuroShard's "
            f"({len(feature_names)} features)"
        )
    if header.get("max_feature_idx") != str(len(feature_names) - 1):
        raise bad(
            f"max_feature_idx {header.get('max_feature_idx')!r}, expected {len(feature_names) - 1}"
        )
    infos = header.get("feature_infos", "").split(" ")
    if len(infos) != len(feature_names) or not all(
        info == "none" or re.fullmatch(r"\[[-+0-9.eE]+:[-+0-9.eE]+\]", info) for info in infos
    ):
        raise bad("feature_infos do not give one numeric range (or none) per feature")
    sizes = _numbers(header.get("tree_sizes", ""), int, "tree_sizes", bad)
    if not sizes or min(sizes) <= 0:
        raise bad("no tree_sizes")
    pos = head_end + 2  # the header, one blank line, then the trees back to back
    for i, size in enumerate(sizes):
        block = text[pos : pos + size]
        head = f"Tree={i}\n"
        # "Tree=i", its key=value lines with no blank line among them, two blank lines
        if len(block) < size or not block.startswith(head) or not block.endswith("\n\n\n"):
            raise bad(f"tree {i} is not where tree_sizes puts it (truncated or edited)")
        lines = block[len(head) : -3].split("\n")
        if not all(lines):
            raise bad(f"tree {i}: a blank line among its entries")
        _check_tree(lines, i, len(feature_names), bad)
        pos += size
    if not text[pos:].startswith("end of trees\n"):
        raise bad(f"no 'end of trees' right after tree {len(sizes) - 1}")
    return text[:pos] + "end of trees\n\npandas_categorical:null\n"


def _key_values(
    lines: Sequence[str], where: str, bad: Callable[[str], ModelFileError]
) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        key, eq, value = line.partition("=")
        if not eq:
            if where == "header" and line == "average_output":
                raise bad("a random-forest model (average_output), not a boosted one")
            raise bad(f"{where}: line {line[:40]!r} is not key=value")
        if key in out:
            raise bad(f"{where}: {key!r} given twice")
        out[key] = value
    return out


def _numbers(value: str, kind: type, what: str, bad: Callable[[str], ModelFileError]) -> list:
    if not value:
        return []
    try:
        numbers = [kind(v) for v in value.split(" ")]
    except ValueError:
        raise bad(f"{what}: not a list of {kind.__name__}s") from None
    if kind is float and not all(math.isfinite(x) for x in numbers):
        raise bad(f"{what}: a number that is not finite")
    return numbers


def _check_tree(
    lines: Sequence[str], i: int, num_features: int, bad: Callable[[str], ModelFileError]
) -> None:
    where = f"tree {i}"
    kv = _key_values(lines, where, bad)
    if tuple(kv) != _TREE_KEYS:
        missing = [k for k in _TREE_KEYS if k not in kv]
        extra = [k for k in kv if k not in _TREE_KEYS]
        raise bad(
            f"{where}: keys differ from a LightGBM regression tree's (missing "
            f"{missing or 'none'}, unexpected {extra or 'none'}, or out of order)"
        )
    leaves = _numbers(kv["num_leaves"], int, f"{where} num_leaves", bad)
    if len(leaves) != 1 or not 1 <= leaves[0] <= _MAX_LEAVES:
        raise bad(f"{where}: num_leaves out of range")
    n = leaves[0]
    if kv["num_cat"] != "0" or kv["is_linear"] != "0":
        raise bad(f"{where}: categorical splits or linear leaves (never trained here)")
    if len(_numbers(kv["shrinkage"], float, f"{where} shrinkage", bad)) != 1:
        raise bad(f"{where}: shrinkage is not one number")
    arrays: dict[str, list] = {}
    for key, kind, lengths in (
        *((k, int, (n - 1,)) for k in _TREE_INTS),
        *((k, float, (n - 1,)) for k in _TREE_FLOATS),
        ("internal_count", int, (n - 1,)),
        ("leaf_value", float, (n,)),
        ("leaf_weight", float, (n,) if n > 1 else (0, 1)),
        ("leaf_count", int, (n,)),
    ):
        arrays[key] = _numbers(kv[key], kind, f"{where} {key}", bad)
        if len(arrays[key]) not in lengths:
            raise bad(f"{where}: {key} has {len(arrays[key])} values, expected {lengths[0]}")
    if n == 1:
        return
    if not all(0 <= f < num_features for f in arrays["split_feature"]):
        raise bad(f"{where}: a split on a feature out of range")
    if not all(0 <= d < 16 and not d & 1 and (d >> 2) & 3 < 3 for d in arrays["decision_type"]):
        raise bad(f"{where}: a decision_type that is not a numerical split")
    # every internal node and every leaf reached exactly once from the root
    nodes, leaves_seen, stack = {0}, set(), [0]
    left, right = arrays["left_child"], arrays["right_child"]
    while stack:
        node = stack.pop()
        for child in (left[node], right[node]):
            if child >= 0:
                if child >= n - 1 or child in nodes:
                    raise bad(f"{where}: child links do not form a tree")
                nodes.add(child)
                stack.append(child)
            else:
                leaf = ~child
                if leaf >= n or leaf in leaves_seen:
                    raise bad(f"{where}: child links do not form a tree")
                leaves_seen.add(leaf)
    if len(nodes) != n - 1 or len(leaves_seen) != n:
        raise bad(f"{where}: child links do not reach every node and leaf")


def _lightgbm_version() -> str:
    import lightgbm

    return str(lightgbm.__version__)
