"""`match-pairs --ray`: the same pair job on Ray Data, one actor per GPU (or CPU worker).

Two stages: CPU tasks decode the batch's image files (`read_images`, the costly half of reading, kept
out of the GPU actors' processes as DataLoader workers keep it out of the single-process loop), then
each actor, holding a pipeline opened once (`pairjob.BatchMatcher`), resizes, runs the graph and
postprocesses. The driver commits each returned batch to the journal exactly as the single-process
loop does, so resuming, the h5 files and the COLMAP output are shared code. Install with
`pip install 'matchrt[ray]'`.
"""

from __future__ import annotations

import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .errors import MatchrtError
from .journal import MatchJournal, PairRecord, size_hw
from .pairjob import BatchMatcher, PairJob, RunStats, error_in_traceback, input_contract
from .pairs import Pair

# environment a worker needs to see the same plugins and generated files as the driver
FORWARDED_ENV = ("MATCHRT_PLUGINS", "MATCHRT_CACHE_DIR")


def require_ray():  # -> module
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise MatchrtError("--ray needs Ray Data: pip install 'matchrt[ray]'") from None
    return ray


def encode_record(rec: PairRecord) -> bytes:
    """A record as npz bytes (one binary column in Ray's blocks, whatever the match count)."""
    buf = io.BytesIO()
    np.savez(buf, keypoints0=rec.keypoints0, keypoints1=rec.keypoints1, scores=rec.scores,
             size0=np.asarray(rec.size0), size1=np.asarray(rec.size1))
    return buf.getvalue()


def decode_record(name0: str, name1: str, payload: bytes) -> PairRecord:
    data = np.load(io.BytesIO(payload), allow_pickle=False)
    return PairRecord(name0, name1, data["keypoints0"], data["keypoints1"], data["scores"],
                      size_hw(data["size0"]), size_hw(data["size1"]))


def _pixels_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, image, allow_pickle=False)
    return buf.getvalue()


def _pixels(payload: bytes) -> np.ndarray:
    return np.load(io.BytesIO(payload), allow_pickle=False)


def read_images(batch: dict[str, np.ndarray], image_dir: str) -> dict[str, Any]:
    """The reading stage: decode each distinct image of the batch once, as stored (uint8 mostly)."""
    from .images import decode_image

    decoded: dict[str, bytes] = {}

    def pixels(name: str) -> bytes:
        if name not in decoded:
            decoded[name] = _pixels_bytes(decode_image(Path(image_dir) / name))
        return decoded[name]

    start = time.perf_counter()
    out = {"name0": batch["name0"], "name1": batch["name1"],
           "image0": np.array([pixels(str(n)) for n in batch["name0"]], dtype=object),
           "image1": np.array([pixels(str(n)) for n in batch["name1"]], dtype=object)}
    out["read_s"] = np.full(len(batch["name0"]), (time.perf_counter() - start) / max(1, len(batch["name0"])))
    return out


class PairActor:
    """Holds an opened pipeline; called with batches of {"name0", "name1"} rows."""

    def __init__(self, job: dict[str, Any], threads: int):
        from .loader import PairDataset

        self.job = PairJob(**job)
        self.matcher = BatchMatcher(self.job)
        pipe = self.matcher.pipe
        self.dataset = PairDataset(self.job.image_dir, [], [], input_contract(self.job, pipe.info.contract),
                                   pipe.input_sizes)
        self.pool = ThreadPoolExecutor(max(1, threads))
        # two calls run at once (one resizes while the other's batch is on the GPU); the graph runs
        # one batch at a time, so model seconds are the GPU's and two threads never launch together
        self.gpu = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from .images import unit_float
        from .loader import collate_pairs

        start = time.perf_counter()
        rows = list(zip(map(str, batch["name0"]), map(str, batch["name1"]), batch["image0"], batch["image1"]))

        def prepare(k: int) -> Any:
            name0, name1, pix0, pix1 = rows[k]
            return self.dataset.prepare_images(k, name0, name1, unit_float(_pixels(pix0)),
                                               unit_float(_pixels(pix1)))

        stacked = collate_pairs(list(self.pool.map(prepare, range(len(rows)))))
        stats = RunStats()
        prep = time.perf_counter() - start
        with self.gpu:
            records = self.matcher.run(stacked["inputs"], stacked["contexts"], stats)
        encoding = time.perf_counter()
        payload = np.array([encode_record(r) for r in records], dtype=object)
        post = stats.post_s + time.perf_counter() - encoding  # postprocess + encoding, not the lock wait
        n = max(1, len(records))
        return {"name0": batch["name0"], "name1": batch["name1"], "payload": payload,
                "model_s": np.full(len(records), stats.model_s / n),
                "prepare_s": np.full(len(records), prep / n),
                "post_s": np.full(len(records), post / n),
                "read_s": batch["read_s"]}


def _init(ray: Any, address: Optional[str], workers: int, use_gpu: bool) -> bool:
    """Start or join Ray; returns whether this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    import logging

    # matchrt shows its own progress; Ray's INFO lines about plans and executors are noise here
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False,
                              "log_to_driver": False, "configure_logging": False}
    if address is None and not use_gpu:
        # one CPU per actor, and one for Ray Data's own tasks so they never wait for an actor
        kwargs["num_cpus"] = max(workers, 1) + 1
    ray.init(address=address, **kwargs)
    return True


def _actor_pool(ray: Any, workers: int, calls: int) -> Any:
    """A fixed pool of `workers` actors; on GPUs two calls at once per actor, so one batch's images
    are read while the other's run on the GPU (Ray versions without threaded actors: one call)."""
    strategy = ray.data.ActorPoolStrategy
    if calls > 1:
        try:
            return strategy(size=workers, max_concurrent_calls_per_actor=calls,
                            enable_true_multi_threading=True)
        except TypeError:
            pass
    return strategy(size=workers)


def match_ray(job: PairJob, pairs: list[Pair], todo: list[int], journal: MatchJournal,
              address: Optional[str], advance: Callable[[int], None],
              log: Callable[[str], None]) -> tuple[RunStats, int]:
    """Match the pending pairs on Ray Data and commit each returned batch; (stats, actors)."""
    ray = require_ray()
    use_gpu = job.device.startswith("cuda")
    started = _init(ray, address, job.num_workers, use_gpu)
    try:
        if use_gpu:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            if gpus < 1:
                raise MatchrtError("--device cuda with --ray, but the Ray cluster has no GPU; use "
                                   "--device cpu or join a cluster with GPUs")
            workers = min(job.num_workers, gpus) if job.num_workers > 0 else gpus
            resources: dict[str, Any] = {"num_gpus": 1}
            threads = 4
        else:
            workers = max(1, job.num_workers)
            resources = {"num_cpus": 1}
            threads = 1
        log(f"Ray: {workers} actor(s) on {'GPU' if use_gpu else 'CPU'}")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        spec = asdict(replace(job, pairs=[], num_workers=0))  # actors get pairs from the dataset
        ds = ray.data.from_items([{"name0": pairs[i][0], "name1": pairs[i][1]} for i in todo])
        ds = ds.map_batches(read_images, fn_kwargs={"image_dir": str(job.image_dir)},
                            batch_size=job.batch_size, batch_format="numpy", num_cpus=1)
        ds = ds.map_batches(PairActor, fn_constructor_kwargs={"job": spec, "threads": threads},
                            batch_size=job.batch_size, batch_format="numpy",
                            compute=_actor_pool(ray, workers, 2 if use_gpu else 1), **resources)
        stats = RunStats()
        start = time.perf_counter()
        try:
            _consume(ds, journal, stats, start, advance)
        except Exception as exc:  # noqa: BLE001 - a user's mistake inside an actor stays one line
            raise _user_error(exc) or exc
        stats.wall_s = time.perf_counter() - start
        # the model share of a pool: model seconds over the actors' wall time together
        stats.model_s /= workers
        stats.wait_s /= workers
        stats.post_s /= workers
        return stats, workers
    finally:
        if started:
            ray.shutdown()


def _user_error(exc: BaseException) -> Optional[MatchrtError]:
    """The MatchrtError an actor raised, from inside Ray's wrappers, if that is what failed."""
    seen: set[int] = set()
    stack: list[Optional[BaseException]] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, MatchrtError):
            return MatchrtError(str(e))
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return error_in_traceback(str(exc))  # Ray may send the actor's traceback as text only


def _consume(ds: Any, journal: MatchJournal, stats: RunStats, start: float,
             advance: Callable[[int], None]) -> None:
    """Commit each batch the actors return, as it comes."""
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        records = [decode_record(str(a), str(b), p)
                   for a, b, p in zip(batch["name0"], batch["name1"], batch["payload"])]
        journal.commit(records)
        stats.model_s += float(np.sum(batch["model_s"]))
        stats.wait_s += float(np.sum(batch["prepare_s"]))  # resizing in the actor, after the reading stage
        stats.post_s += float(np.sum(batch["post_s"]))
        stats.read_s += float(np.sum(batch["read_s"]))
        stats.committed(len(records), start)
        advance(len(records))
