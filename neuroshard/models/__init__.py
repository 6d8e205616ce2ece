"""Learned models: cost models (neural, LightGBM) and the SurCo prior.

* :mod:`~neuroshard.models.registry` -- kinds by name, loading, the shipped models and
  :func:`resolve_cost_model`, the one place a cost model is chosen;
* :mod:`~neuroshard.models.base` -- model directories (``meta.json``, sha256 checksums,
  atomic writes, compatibility checks) and :class:`CostModelBase`;
* :mod:`~neuroshard.models.neural`, :mod:`~neuroshard.models.lightgbm`,
  :mod:`~neuroshard.models.surrogate` -- the models;
* :mod:`~neuroshard.models.training` -- the torch training loop and MLP builder;
* :mod:`~neuroshard.models.metrics` -- error metrics and breakdowns, numpy only.

This package depends on the core only (types, features, fingerprint, samples); the
pretrain pipeline depends on it and injects its trainers.
"""

from neuroshard.models.base import META_FILE, CostModelBase, check_compatible, read_meta
from neuroshard.models.registry import (
    ModelKind,
    cost_model_kinds,
    default_model_dir,
    load_cost_model,
    load_model,
    model_class,
    model_kinds,
    register_model_kind,
    resolve_cost_model,
    shipped_models,
)

__all__ = [
    "META_FILE",
    "CostModelBase",
    "ModelKind",
    "check_compatible",
    "cost_model_kinds",
    "default_model_dir",
    "load_cost_model",
    "load_model",
    "model_class",
    "model_kinds",
    "read_meta",
    "register_model_kind",
    "resolve_cost_model",
    "shipped_models",
]
