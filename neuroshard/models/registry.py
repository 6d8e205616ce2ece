"""One registry of model kinds, used to train and to load, and the choice of a cost model.

A kind (``neural``, ``lightgbm``, ``surco-prior``) names a class imported only when used
(torch for the neural model, lightgbm for the boosted one). :func:`model_class` gives the
class to train; :func:`load_model` reads ``meta.json``, checks it against the ask and
loads the directory with its kind's class. :func:`resolve_cost_model` is the one place
that picks a cost model for a plan: an explicit directory, or the shipped model of a kind
trained on a backend with the device count nearest the cluster's.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast

from neuroshard.models.base import META_FILE, batch_range, check_compatible, read_meta
from neuroshard.types import (
    CostEstimator,
    HardwareBackend,
    ModelFileError,
    UnknownNameError,
)

__all__ = [
    "DEFAULT_BACKEND",
    "DEFAULT_KIND",
    "DEVICE_BACKENDS",
    "ModelKind",
    "backend_for_device",
    "cost_model_kinds",
    "default_model_dir",
    "load_cost_model",
    "load_model",
    "model_class",
    "model_kinds",
    "register_model_kind",
    "resolve_cost_model",
    "shipped_models",
]

DEFAULT_PROFILE = "h100"  # the hardware profile of the default (sim) models
DEFAULT_KIND = "neural"
# Hardware profiles whose shipped any-cluster model plans better than their models of one
# device count at those counts, so it wins the tie there (README "Results": h100 at 4 and
# 8 devices); for other profiles a model trained at exactly the device count wins it
# (h200 at 8 devices, where the any-cluster model has had less training).
ANY_CLUSTER_FIRST = frozenset({"h100"})
DEFAULT_BACKEND = "sim"

# The backends whose shipped models price each compute device (TorchRec's
# ``Topology.compute_device``), preferred first: a CPU topology gets a model measured on
# CPUs; a GPU one a model measured on CUDA, else the simulated GPU's.
DEVICE_BACKENDS: dict[str, tuple[str, ...]] = {"cpu": ("cpu",), "cuda": ("cuda", "sim")}


@dataclass(frozen=True)
class ModelKind:
    """A registered kind: ``target`` is ``"module:Class"``, a class with
    ``load(model_dir, meta)``; ``cost_model`` says whether it is a
    :class:`~neuroshard.types.CostEstimator` (a plan can be priced with it)."""

    name: str
    target: str
    cost_model: bool = True

    def load_class(self) -> Any:
        module, attr = self.target.split(":")
        return getattr(importlib.import_module(module), attr)


_KINDS: dict[str, ModelKind] = {
    k.name: k
    for k in (
        ModelKind("neural", "neuroshard.models.neural:NeuralCostModel"),
        ModelKind("lightgbm", "neuroshard.models.lightgbm:LightGBMCostModel"),
        ModelKind("surco-prior", "neuroshard.models.surrogate:SurrogatePrior", cost_model=False),
    )
}


def register_model_kind(kind: str, target: str, *, cost_model: bool = True) -> None:
    """Register ``target`` (``"module:Class"``) as the class of model directories whose
    ``meta["kind"]`` is ``kind``."""
    _KINDS[kind] = ModelKind(kind, target, cost_model)


ENTRY_POINT_GROUP = "neuroshard.model_kinds"


def _kinds() -> dict[str, ModelKind]:
    """The registered kinds and those installed packages declare as entry points in the
    group ``neuroshard.model_kinds`` (name = kind, value = ``module:Class``; a class
    with ``cost_model = False`` is not a cost model). Registered kinds win a clash."""
    found = dict(_KINDS)
    for ep in _entry_points():
        if ep.name not in found:
            found[ep.name] = _PluginKind(ep.name, ep.value, ep)
    return found


@functools.lru_cache(maxsize=1)
def _entry_points() -> tuple[Any, ...]:
    from importlib.metadata import entry_points

    return tuple(entry_points(group=ENTRY_POINT_GROUP))


@dataclass(frozen=True)
class _PluginKind(ModelKind):
    entry_point: Any = None

    def load_class(self) -> Any:
        return self.entry_point.load()

    @property
    def is_cost_model(self) -> bool:
        return bool(getattr(self.load_class(), "cost_model", True))


def _is_cost_model(kind: ModelKind) -> bool:
    return kind.is_cost_model if isinstance(kind, _PluginKind) else kind.cost_model


def model_kinds() -> list[str]:
    """Every registered kind (plug-ins included)."""
    return sorted(_kinds())


def cost_model_kinds() -> list[str]:
    """The registered kinds that are cost models (a plan can be priced with them)."""
    return sorted(k for k, v in _kinds().items() if _is_cost_model(v))


def model_class(kind: str, *, cost_model: bool = True) -> type:
    """The class of ``kind`` (imported now); :class:`UnknownNameError` listing the valid
    kinds (cost models only, unless ``cost_model`` is false) otherwise."""
    valid = cost_model_kinds() if cost_model else model_kinds()
    if kind not in valid:
        raise UnknownNameError(f"unknown cost model {kind!r}; valid: {', '.join(valid)}")
    return _kinds()[kind].load_class()


def load_model(
    model_dir: str | os.PathLike,
    *,
    kind: str | None = None,
    batch_size: int | None = None,
    backend: str | HardwareBackend | Mapping[str, Any] | None = None,
) -> Any:
    """Load the model in ``model_dir`` (any registered kind), checked against the ask.

    Raises :class:`ModelFileError` (naming the file) for a missing, truncated or
    unreadable file or an unknown kind, and :class:`ModelMismatchError` when ``kind``,
    ``batch_size`` or ``backend`` differ from what the model is.
    """
    meta = read_meta(model_dir)
    check_compatible(meta, batch_size=batch_size, backend=backend, kind=kind)
    found = _kinds().get(meta["kind"])
    if found is None:
        raise ModelFileError(
            f"{Path(model_dir) / META_FILE}: unknown model kind "
            f"{meta['kind']!r}; known: {', '.join(model_kinds())}"
        )
    return found.load_class().load(model_dir, meta)


def load_cost_model(
    model_dir: str | os.PathLike,
    *,
    batch_size: int | None = None,
    backend: str | HardwareBackend | Mapping[str, Any] | None = None,
    kind: str | None = None,
) -> CostEstimator:
    """:func:`load_model` for cost models (neural, lightgbm): a directory holding another
    kind of model is a :class:`ModelFileError`."""
    meta = read_meta(model_dir)
    found = _kinds().get(meta["kind"])
    if found is not None and not _is_cost_model(found):
        raise ModelFileError(
            f"{Path(model_dir) / META_FILE}: a {meta['kind']!r} model, not "
            f"a cost model ({', '.join(cost_model_kinds())})"
        )
    return load_model(model_dir, kind=kind, batch_size=batch_size, backend=backend)


# --------------------------------------------------------------------------- shipped


def shipped_models() -> dict[str, Path]:
    """Model directories shipped in ``neuroshard.data/models``, by name."""
    root = resources.files("neuroshard.data") / "models"
    found = {}
    for entry in root.iterdir():
        if entry.is_dir() and (entry / META_FILE).is_file():
            found[entry.name] = Path(str(entry))
    return dict(sorted(found.items()))


def _profile(meta: Mapping[str, Any]) -> str | None:
    """The hardware profile a model's samples came from (a sim model's), else None."""
    fingerprint = meta.get("backend_fingerprint")
    return fingerprint.get("profile") if isinstance(fingerprint, Mapping) else None


def default_model_dir(
    num_devices: int,
    backend: str = DEFAULT_BACKEND,
    kind: str = DEFAULT_KIND,
    batch_size: int | None = None,
    profile: str = DEFAULT_PROFILE,
) -> Path:
    """The shipped model of ``kind`` trained on ``backend`` nearest ``num_devices``: a
    model that takes the batch and cluster as inputs (``batch_input``) is at distance 0
    inside its trained device range, a model of one device count at the difference. With
    ``batch_size``, models that price it (their batch, or one in their range) come first.
    Models of another hardware ``profile`` (sim models of ``a100``, ``h200``) are left
    out. Ties go to a model trained at exactly ``num_devices`` unless its own profile is
    one of :data:`ANY_CLUSTER_FIRST`, then to the smaller name."""
    candidates = []
    for name, path in shipped_models().items():
        meta = read_meta(path)
        if meta.get("backend") != backend or meta.get("kind") != kind:
            continue
        if _profile(meta) not in (None, profile):
            continue
        trained = batch_range(meta)
        own = int(meta.get("num_devices", 0))
        if trained is None:
            distance = abs(own - num_devices)
            prices = batch_size is None or meta.get("batch_size") == batch_size
        else:
            low, high = (meta.get("training_ranges") or {}).get("devices", (own, own))
            distance = max(low - num_devices, num_devices - high, 0)
            prices = batch_size is None or trained[0] <= batch_size <= trained[1]
        exact = trained is None and own == num_devices and _profile(meta) not in ANY_CLUSTER_FIRST
        candidates.append((not prices, distance, not exact, name, path))
    if not candidates:
        raise ModelFileError(f"no shipped {kind} model for backend {backend!r}; pass --model DIR")
    return min(candidates)[-1]


def backend_for_device(compute_device: str, kind: str = DEFAULT_KIND) -> str:
    """The backend of the shipped ``kind`` models that price ``compute_device`` (the first
    of :data:`DEVICE_BACKENDS` with one); :class:`ModelFileError` naming the device and
    the devices that have one otherwise."""
    shipped = {
        read_meta(path).get("backend")
        for path in shipped_models().values()
        if read_meta(path).get("kind") == kind
    }
    for backend in DEVICE_BACKENDS.get(compute_device, ()):
        if backend in shipped:
            return backend
    covered = sorted(d for d, backends in DEVICE_BACKENDS.items() if shipped & set(backends))
    raise ModelFileError(
        f"no shipped {kind} model for compute device {compute_device!r} (shipped models "
        f"cover: {', '.join(covered) or 'none'}); pass a model trained on that hardware"
    )


def resolve_cost_model(
    model_dir: str | os.PathLike | None = None,
    *,
    kind: str | None = None,
    backend: str | None = None,
    batch_size: int | None = None,
    num_devices: int | None = None,
    force: bool = False,
    compute_device: str | None = None,
    profile: str = DEFAULT_PROFILE,
) -> CostEstimator:
    """The cost model a plan should be priced with.

    ``model_dir`` is loaded when given; otherwise the shipped model of ``kind`` (default
    neural) trained on ``backend`` (default sim, of hardware ``profile``) nearest
    ``num_devices``. The model must
    match ``batch_size`` (lie in its training range, for a model that takes the batch as
    an input: it is returned bound to it), ``backend`` and ``kind`` where they are given
    (:class:`~neuroshard.types.ModelMismatchError` lists every difference), unless
    ``force``. Without ``backend``, ``compute_device`` (``cpu``, ``cuda``) picks it
    (:func:`backend_for_device`). An unknown ``kind`` is an :class:`UnknownNameError`.
    """
    if kind is not None and kind not in cost_model_kinds():
        raise UnknownNameError(
            f"unknown cost model {kind!r}; valid: {', '.join(cost_model_kinds())}"
        )
    if model_dir is None:
        if num_devices is None:
            raise ValueError("resolve_cost_model needs model_dir or num_devices")
        if backend is None and compute_device is not None:
            backend = backend_for_device(compute_device, kind or DEFAULT_KIND)
        model_dir = default_model_dir(
            num_devices, backend or DEFAULT_BACKEND, kind or DEFAULT_KIND, batch_size, profile
        )
    if force:
        model = load_cost_model(model_dir)
    else:
        model = load_cost_model(model_dir, batch_size=batch_size, backend=backend, kind=kind)
    if batch_size is not None and batch_range(getattr(model, "meta_", {})) is not None:
        model = cast(Any, model).for_batch(batch_size)  # a model with the batch as an input
    return model
