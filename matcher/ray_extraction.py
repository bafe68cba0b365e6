"""Feature extraction on a Ray cluster: Ray Data batches over actors that each hold the model.

`extract_features_ray` answers what `matcher.extraction.extract_features` answers, from the
same parts, so the two cannot drift apart:

* each actor builds the feature backend from the same settings (`matcher.factory`: the same
  engine, SavedModel and preprocessing) and loads it once;
* each batch of paths is read, hashed, looked up in the content-hash cache and header-checked
  by `scan_file`, run through the model by `compute_batch`, and new features go into the cache
  (`FeatureCache`, atomic writes) from the actor;
* the driver receives the batches in input order (Ray Data's `preserve_order`) and appends
  them to the same `FeatureSink`: the same `.npy`, kept mask and rejections.

Two calls run at once in each actor (threads), so one batch is read while the previous one is
on the model, as the local pipeline's readers do. One actor per node by default, each
reserving the smallest node's CPUs: the engine already uses every core it is given.

On a cluster of several machines every node must see the photos and the cache directory at the
same paths (a shared volume: `deploy/kuberay/`); the features come back to the driver, where the
classifier is trained.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from matcher.errors import MatcherError
from matcher.extraction import Extraction, FeatureCache, FeatureSink, compute_batch, scan_file
from matcher.images import ImageLimits
from matcher.settings import BackendSettings

log = logging.getLogger(__name__)

#: Paths per input block, at most (a block is one actor task's work).
BLOCK_ROWS = 512

#: How long the extraction waits for every planned actor to have loaded its model before the
#: first batch is handed out. Without the wait the first actor up takes the whole queue of a
#: small job while the others still load (seen on a 2-core CI machine: one node did all 26
#: photos); the plan only counts CPUs of live nodes, so a slower start is a node's model load.
ACTOR_START_TIMEOUT_S = 600


class RayUnavailableError(MatcherError):
    """The Ray cluster cannot be reached or cannot run the actors; the message says why."""


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run the extraction."""

    #: "auto": the cluster named by RAY_ADDRESS or running on this machine, else a new local
    #: one; anything else: a cluster address ("10.0.0.5:6379", "ray://head:10001").
    address: str = "auto"
    #: At most this many model actors (None: one per node).
    actors: int | None = None
    #: CPUs each actor reserves (None: the smallest node's CPU count).
    actor_cpus: float | None = None


def connect(options: RayOptions) -> bool:
    """Connect to (or start) the cluster unless this process already is; True if it did."""
    import ray

    if ray.is_initialized():
        return False
    if options.address != "auto":
        _probe(options.address)
    try:
        if options.address == "auto":
            ray.init(log_to_driver=False, include_dashboard=False)
        else:
            ray.init(address=options.address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailableError(
            f"cannot reach the Ray cluster {options.address!r}: {exc}"
        ) from exc
    return True


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with the reason, when nothing listens at a cluster address: `ray.init`
    itself retries for minutes before it gives up."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailableError(f"--ray {address!r}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise RayUnavailableError(
            f"cannot reach the Ray cluster {address!r}: {exc.strerror or exc}"
        ) from exc


def cluster_plan(options: RayOptions) -> tuple[int, float]:
    """(actors, CPUs per actor) for the live nodes of the connected cluster."""
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]  # type: ignore[no-untyped-call]
    cpus = [node["Resources"].get("CPU", 0.0) for node in nodes]
    cpus = [count for count in cpus if count > 0]
    if not cpus:
        raise RayUnavailableError("the Ray cluster has no live node with CPUs")
    per_actor = options.actor_cpus or min(cpus)
    fits = sum(int(count // per_actor) for count in cpus)
    if fits < 1:
        raise RayUnavailableError(
            f"no node of the Ray cluster has {per_actor} CPUs for a model actor "
            f"(nodes: {sorted(cpus)})"
        )
    actors = min(options.actors, fits) if options.actors else fits
    return actors, per_actor


class FeatureActor:
    """A Ray Data callable class: one loaded backend, batches of paths in, features out."""

    def __init__(
        self,
        settings: BackendSettings,
        cache_root: str | None,
        cache_key: str,
        limits: ImageLimits,
        readers: int,
    ) -> None:
        from matcher.factory import make_backend

        self.backend = make_backend(settings)
        self.backend.load()
        if self.backend.info.cache_key != cache_key:
            raise MatcherError(
                f"this node's model is {self.backend.info.cache_key}, the driver's {cache_key}: "
                "every node must see the same SavedModel at the same path"
            )
        self.dim = self.backend.info.feature_dim
        self.side = self.backend.info.input_size
        self.cache = FeatureCache(Path(cache_root), cache_key, self.dim) if cache_root else None
        self.limits = limits
        self.pool = ThreadPoolExecutor(readers, thread_name_prefix="ray-features-read")
        import ray

        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indices = [int(i) for i in batch["index"]]
        paths = [Path(str(p)) for p in batch["path"]]
        scanned = list(
            self.pool.map(
                lambda i: scan_file(i, paths[i], self.cache, self.limits, self.side),
                range(len(paths)),
            )
        )
        computed, failures = compute_batch(self.backend, scanned)
        features = np.zeros((len(paths), self.dim), np.float32)
        kept = np.zeros(len(paths), bool)
        errors = []
        for row, item in enumerate(scanned):
            found = item.row if item.row is not None else computed.get(item.index)
            if found is not None:
                features[row], kept[row] = found, True
            errors.append(item.error or failures.get(item.index, ""))
        if self.cache is not None and computed:
            ok = [item for item in scanned if item.index in computed]
            self.cache.put_many(
                [item.digest for item in ok], np.stack([computed[item.index] for item in ok])
            )
        return {
            "index": np.asarray(indices, np.int64),
            "kept": kept,
            "computed": np.asarray([item.index in computed for item in scanned]),
            "error": np.asarray(errors, dtype=object),
            "features": features,
            "node": np.asarray([self.node] * len(paths), dtype=object),
        }


def extract_features_ray(
    paths: Sequence[Path],
    settings: BackendSettings,
    cache_key: str,
    feature_dim: int,
    cache: FeatureCache | None,
    options: RayOptions,
    batch_size: int = 32,
    limits: ImageLimits | None = None,
    progress: bool = True,
    *,
    out: Path | None = None,
    readers: int = 2,
) -> Extraction:
    """Features for `paths` in order, computed by model actors on a Ray cluster.

    The same answer as `extract_features(paths, make_backend(settings), cache, ...)`:
    `cache_key` and `feature_dim` are the driver's backend's (each actor checks its own model
    against them). Ray is started or reached as `options` say, and shut down again if this
    call started it.
    """
    import ray

    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    started_here = connect(options)
    try:
        actors, per_actor = cluster_plan(options)
        with _ordered_batches():
            return _stream(
                paths, actor_settings_for(settings, per_actor), cache_key, feature_dim, cache,
                actors, per_actor, batch_size, limits or ImageLimits(), progress, out, readers,
            )  # fmt: skip
    finally:
        if started_here:
            ray.shutdown()


@contextlib.contextmanager
def _ordered_batches() -> Iterator[None]:
    """Ray Data set to return batches in input order (what the sink's layout rests on), to
    start only once every planned actor is up (`ACTOR_START_TIMEOUT_S`) and without its own
    progress bars (ours counts images, as the local pipeline's does); the process's settings
    are restored afterwards."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = (
        context.execution_options.preserve_order,
        context.enable_progress_bars,
        context.wait_for_min_actors_s,
    )
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
    try:
        yield
    finally:
        (
            context.execution_options.preserve_order,
            context.enable_progress_bars,
            context.wait_for_min_actors_s,
        ) = saved


def actor_settings_for(settings: BackendSettings, cpus: float) -> BackendSettings:
    """The actors' settings: each engine runs as many threads as its actor has CPUs, not one
    per core of the node."""
    return settings.model_copy(update={"engine_threads": max(1, int(cpus))})


def _stream(
    paths: Sequence[Path],
    settings: BackendSettings,
    cache_key: str,
    feature_dim: int,
    cache: FeatureCache | None,
    actors: int,
    per_actor: float,
    batch_size: int,
    limits: ImageLimits,
    progress: bool,
    out: Path | None,
    readers: int,
) -> Extraction:
    import ray
    import ray.data

    rows = [{"index": i, "path": str(Path(p).resolve())} for i, p in enumerate(paths)]
    # A block goes to one actor whole: at least a few per actor, so that every node gets work.
    blocks = max(1, min(len(rows), max(4 * actors, -(-len(rows) // BLOCK_ROWS))))
    dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        FeatureActor,
        fn_constructor_args=(
            settings,
            str(cache.root) if cache else None,
            cache_key,
            limits,
            readers,
        ),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=per_actor,
        # A fixed pool: every planned actor is waited for (`_ordered_batches`) and kept.
        compute=ray.data.ActorPoolStrategy(
            min_size=actors,
            max_size=actors,
            initial_size=actors,
            max_concurrent_calls_per_actor=2,
            enable_true_multi_threading=True,
        ),
    )
    log.info(
        "Ray extraction: %d photos over up to %d actors of %g CPUs", len(paths), actors, per_actor
    )
    sink = FeatureSink(out, len(paths), feature_dim)
    kept: list[int] = []
    rejected: dict[Path, str] = {}
    computed = 0
    nodes: dict[str, int] = {}
    began = time.perf_counter()
    try:
        with tqdm(total=len(paths), unit="img", desc="features (ray)", disable=not progress) as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                ok = np.asarray(batch["kept"], bool)
                if ok.any():
                    sink.append(np.asarray(batch["features"], np.float32)[ok])
                kept.extend(int(i) for i in batch["index"][ok])
                for i, why in zip(batch["index"][~ok], batch["error"][~ok], strict=True):
                    rejected[Path(paths[int(i)])] = str(why)
                computed += int(np.count_nonzero(batch["computed"]))
                for node in batch["node"]:
                    nodes[str(node)] = nodes.get(str(node), 0) + 1
                bar.update(len(ok))
    except ray.exceptions.RayError as exc:
        sink.abort()
        raise actor_failure(exc) from exc
    except BaseException:
        sink.abort()
        raise
    if kept != sorted(kept):  # preserve_order is what the sink's layout rests on
        sink.abort()
        raise RuntimeError("Ray returned the batches out of order")
    log.info("Ray extraction: %d photos in %.1f s", len(paths), time.perf_counter() - began)
    features = sink.finish(kept)
    return Extraction(features, kept, rejected, computed, out, nodes)


def actor_failure(exc: Exception) -> MatcherError:
    """What a failed actor raised, as the local pipeline would have raised it: the actor's own
    MatcherError where Ray kept it, else the last error line of Ray's report."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, MatcherError):
        return type(cause)(str(cause))
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "Error: " in line]
    last = (errors or lines or [type(exc).__name__])[-1]
    return RayUnavailableError(f"a Ray feature actor failed: {last}")
