"""`matchrt match-pairs`: match a pair list, stream results into a journal, write hloc and COLMAP files.

The job is resumable: committed batches live in the journal (core/journal.py), a re-run matches only
the pairs it lacks, and the h5 files (and the COLMAP database) are rebuilt from the journal at the
end under temporary names, so they are never seen half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import MatchrtError
from .atomic import atomic_text
from .journal import MatchJournal, PairRecord, size_hw
from .pairs import Pair, check_images_exist, unique_pairs, write_pairs
from .types import InputContract, Matches, PairContext

JOURNAL = ".matchrt-journal"


@dataclass
class PairJob:
    """Everything that defines a pair job (what `match-pairs` parses from its flags)."""

    image_dir: Path
    pairs: list[Pair]
    output: Path
    matcher: Optional[str] = None
    backend: str = "torch"
    weights: dict[str, Optional[Path]] = field(default_factory=dict)
    artifact: Optional[Path] = None
    height: Optional[int] = None
    width: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    precision: str = "fp32"
    compile: bool = False
    allow_partial: bool = False
    random_weights: bool = False
    batch_size: int = 1
    num_workers: int = 2
    merge_grid: float = 2.0
    resize: Optional[str] = None  # "stretch" or "pad": overrides the matcher's resize rule
    colmap: Optional[Path] = None
    reconstruct: bool = False
    overwrite: bool = False

    def backend_options(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "compile": self.compile}


@dataclass
class RunStats:
    """Where the wall time of the matching loop went."""

    pairs: int = 0
    batches: int = 0
    model_s: float = 0.0  # graph execution (synchronised)
    wait_s: float = 0.0  # waiting for the loader (decode + resize not hidden behind the model)
    read_s: float = 0.0  # Ray's reading stage: CPU seconds decoding image files (on other cores)
    post_s: float = 0.0  # postprocess + journal commit
    wall_s: float = 0.0
    first_s: Optional[float] = None  # until the first batch was committed (workers, model load)
    first_pairs: int = 0

    def committed(self, count: int, start: float) -> None:
        """Count a committed batch; remember when the first one came."""
        if self.first_s is None:
            self.first_s, self.first_pairs = time.perf_counter() - start, count
        self.pairs += count
        self.batches += 1

    def steady_rate(self) -> Optional[float]:
        """Pairs/s after the first batch: throughput without start-up costs."""
        if self.first_s is None or self.pairs <= self.first_pairs or self.wall_s <= self.first_s:
            return None
        return (self.pairs - self.first_pairs) / (self.wall_s - self.first_s)


def fingerprint(job: PairJob) -> dict[str, Any]:
    """What makes two runs' matches interchangeable; a journal refuses a run that differs."""
    from .host import get_host
    from .runner import resolve_weights

    files: dict[str, Any] = {}
    size: list[Optional[int]] = [job.height, job.width]
    name = job.matcher
    if job.artifact is not None:
        from .export import load_manifest

        manifest = load_manifest(job.artifact)
        name = manifest["matcher"]
        st = Path(job.artifact).stat()
        files["artifact"] = {"path": str(Path(job.artifact).resolve()), "bytes": st.st_size}
        size = list(manifest.get("input_size") or size)
    else:
        if name is None:
            raise MatchrtError("--matcher is needed with --backend torch")
        info = get_host().matcher(name)
        for src, path in resolve_weights(info, job.weights, job.random_weights).items():
            files[src] = {"name": path.name, "bytes": path.stat().st_size}
        size = [job.height or info.contract.default_height, job.width or info.contract.default_width]
    return {"matcher": name, "backend": job.backend, "precision": job.precision,
            "size": size, "resize": job.resize, "options": job.extra, "weights": files,
            "random_weights": job.random_weights}


def graph_batch(pipe: Any) -> Optional[int]:
    """The fixed batch of an exported graph, or None when the graph takes any batch (torch)."""
    if pipe.backend == "torch" or not pipe.source:
        return None
    from .export import load_manifest

    shapes = load_manifest(Path(pipe.source))["stages"][0].get("input_shapes", {})
    first = next(iter(shapes.values()), [1])
    return int(first[0]) if isinstance(first[0], int) and first[0] > 0 else None


def split_outputs(outputs: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """A batch's outputs (leading batch axis) -> one dict per pair, left where they are: a plugin's
    postprocess then runs on the GPU when the graph did (roma_plus samples its warp there)."""
    arrays = {k: (v.detach() if hasattr(v, "detach") else np.asarray(v)) for k, v in outputs.items()}
    return [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(count)]


def to_record(matches: Matches, ctx: PairContext) -> PairRecord:
    """A pair's matches for the journal; matches outside either image (padding) are dropped."""
    keep = np.ones(len(matches), bool)
    for kp, (h, w) in ((matches.keypoints0, ctx.original_size0), (matches.keypoints1, ctx.original_size1)):
        keep &= (kp[:, 0] >= -0.5) & (kp[:, 0] < w - 0.5) & (kp[:, 1] >= -0.5) & (kp[:, 1] < h - 0.5)
    return PairRecord(str(ctx.path0), str(ctx.path1), matches.keypoints0[keep],
                      matches.keypoints1[keep], matches.confidence[keep],
                      size_hw(ctx.original_size0), size_hw(ctx.original_size1))


def input_contract(job: PairJob, contract: InputContract) -> InputContract:
    """The matcher's contract, with --resize applied."""
    if job.resize is None or job.resize == contract.resize:
        return contract
    if job.resize not in ("stretch", "pad"):
        raise MatchrtError(f"--resize must be stretch or pad, got {job.resize!r}")
    return replace(contract, resize=job.resize)  # type: ignore[arg-type]


class BatchMatcher:
    """An opened pipeline that matches prepared batches: what one process or one Ray actor holds."""

    def __init__(self, job: PairJob, progress: Optional[Callable[[str], None]] = None):
        from .runner import open_pipeline

        self.job = job
        self.pipe = open_pipeline(job.matcher, job.backend, job.weights, job.artifact, job.height,
                                  job.width, job.extra, job.backend_options(), job.allow_partial,
                                  job.random_weights, progress=progress)
        self.fixed_batch = graph_batch(self.pipe)
        self.device = job.device

    @property
    def batch_size(self) -> int:
        return self.fixed_batch or self.job.batch_size

    def run(self, inputs: dict[str, Any], contexts: Sequence[PairContext],
            stats: Optional[RunStats] = None) -> list[PairRecord]:
        import torch

        count = len(contexts)
        if self.fixed_batch and count < self.fixed_batch:  # the last batch of a fixed-batch graph
            pad = self.fixed_batch - count
            inputs = {k: torch.cat([v, v[-1:].expand(pad, *v.shape[1:])]) for k, v in inputs.items()}
        if self.pipe.backend == "torch" and self.device != "cpu":
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in inputs.items()}
        start = time.perf_counter()
        outputs = self.pipe.run(inputs)
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.synchronize()
        done = time.perf_counter()
        records = [to_record(self.pipe.postprocess(out, ctx, self.job.extra), ctx)
                   for out, ctx in zip(split_outputs(outputs, count), contexts)]
        if stats is not None:
            stats.model_s += done - start
            stats.post_s += time.perf_counter() - done
        return records


def pending_pairs(pairs: Sequence[Pair], done: set[Pair]) -> list[int]:
    """Positions of the pairs not yet in the journal (in either order)."""
    return [i for i, (a, b) in enumerate(pairs) if (a, b) not in done and (b, a) not in done]


def _progress_bar(total: int, completed: int):
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text("-- pairs/s" if speed is None else f"{speed:.1f} pairs/s")

    from rich.console import Console

    progress = Progress(TextColumn("matching"), BarColumn(), MofNCompleteColumn(), Rate(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=Console(stderr=True))
    task = progress.add_task("pairs", total=total, completed=completed)
    return progress, task


def match_local(job: PairJob, pairs: list[Pair], todo: list[int], journal: MatchJournal,
                advance: Callable[[int], None], log: Callable[[str], None]) -> RunStats:
    """The single-process loop: DataLoader workers prepare, this process runs the model and commits."""
    import torch

    from .loader import PairDataset, pair_loader

    stats = RunStats()
    matcher = BatchMatcher(job, progress=log)
    pipe = matcher.pipe
    dataset = PairDataset(job.image_dir, pairs, todo, input_contract(job, pipe.info.contract),
                          pipe.input_sizes)
    pin = job.device.startswith("cuda") and torch.cuda.is_available()
    loader = pair_loader(dataset, matcher.batch_size, job.num_workers, pin)
    start = time.perf_counter()
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        except MatchrtError as exc:  # from a worker, its traceback folded into the message
            raise worker_error(exc) from None
        stats.wait_s += time.perf_counter() - t0
        records = matcher.run(batch["inputs"], batch["contexts"], stats)
        t1 = time.perf_counter()
        journal.commit(records)
        stats.post_s += time.perf_counter() - t1
        stats.committed(len(records), start)
        advance(len(records))
    stats.wall_s = time.perf_counter() - start
    return stats


def worker_error(exc: MatchrtError) -> MatchrtError:
    """A loader worker's MatchrtError as its own one-line message (DataLoader adds a traceback)."""
    return error_in_traceback(str(exc)) or exc


def error_in_traceback(text: str) -> Optional[MatchrtError]:
    """The last `MatchrtError: message` line of a traceback another process sent as text."""
    prefix = "MatchrtError: "
    found = [ln.split(prefix, 1)[1].strip() for ln in text.splitlines() if prefix in ln]
    return MatchrtError(found[-1]) if found else None


def summary_dict(job: PairJob, stats: RunStats, total: int, skipped: int, ray: Optional[str],
                 workers: int) -> dict[str, Any]:
    rate = stats.pairs / stats.wall_s if stats.wall_s > 0 else None
    return {
        "matcher": job.matcher, "backend": job.backend, "device": job.device,
        "precision": job.precision, "random_weights": job.random_weights,
        "pairs_total": total, "pairs_skipped": skipped, "pairs_matched": stats.pairs,
        "batches": stats.batches, "batch_size": job.batch_size, "num_workers": workers,
        "ray": ray, "wall_s": round(stats.wall_s, 3),
        "pairs_per_s": None if rate is None else round(rate, 3),
        "first_batch_s": None if stats.first_s is None else round(stats.first_s, 3),
        "pairs_per_s_after_first_batch": (None if stats.steady_rate() is None
                                          else round(stats.steady_rate() or 0.0, 3)),
        "model_s": round(stats.model_s, 3),
        "model_share": round(stats.model_s / stats.wall_s, 4) if stats.wall_s > 0 else None,
        "loader_wait_s": round(stats.wait_s, 3), "postprocess_write_s": round(stats.post_s, 3),
        **({"ray_read_cpu_s": round(stats.read_s, 3)} if ray is not None else {}),
    }


def clear_outputs(out: Path, job: PairJob) -> None:
    """--overwrite: the journal and what was built from it."""
    shutil.rmtree(out / JOURNAL, ignore_errors=True)
    for name in ("features.h5", "matches.h5", "pairs.txt", "summary.json"):
        (out / name).unlink(missing_ok=True)
    if job.colmap is not None:
        Path(job.colmap).unlink(missing_ok=True)
    if job.reconstruct:
        shutil.rmtree(out / "sfm", ignore_errors=True)


def remove_leftovers(out: Path, job: PairJob) -> None:
    """Temporary files of a run that was killed while writing its outputs (we hold the lock)."""
    places = [(out, ".*.tmp-*")]
    if job.colmap is not None:
        places.append((Path(job.colmap).parent, f".{Path(job.colmap).name}.tmp-*"))
    if job.reconstruct:
        places += [(out, ".sfm.tmp-*"), (out, ".sfm.old-*")]
    for folder, pattern in places:
        for path in folder.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def run_pair_job(job: PairJob, ray_address: Optional[str] = None, use_ray: bool = False,
                 show_progress: bool = True, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Match what is missing, then write features.h5, matches.h5, pairs.txt, summary.json (and the
    COLMAP database and model when asked). Returns the summary."""
    log = log or (lambda msg: None)
    out = Path(job.output)
    out.mkdir(parents=True, exist_ok=True)
    pairs = unique_pairs(job.pairs)
    if not pairs:
        raise MatchrtError("the pair list is empty (self-pairs and repeats are dropped)")
    check_images_exist(pairs, job.image_dir)
    if job.overwrite:
        clear_outputs(out, job)
    with MatchJournal(out / JOURNAL).open(fingerprint(job)) as journal:
        remove_leftovers(out, job)
        todo = pending_pairs(pairs, journal.done())
        skipped = len(pairs) - len(todo)
        if skipped:
            log(f"{skipped} of {len(pairs)} pairs already matched in {out}; matching {len(todo)}")
        stats, workers = RunStats(), job.num_workers
        if todo:
            progress, task = (_progress_bar(len(pairs), skipped) if show_progress else (None, None))

            def advance(n: int) -> None:
                if progress is not None:
                    progress.update(task, advance=n)

            if progress is not None:
                progress.start()
            try:
                if use_ray:
                    from .ray_runner import match_ray

                    stats, workers = match_ray(job, pairs, todo, journal, ray_address, advance, log)
                else:
                    stats = match_local(job, pairs, todo, journal, advance, log)
            finally:
                if progress is not None:
                    progress.stop()
        summary = summary_dict(job, stats, len(pairs), skipped,
                               (ray_address or "local") if use_ray else None, workers)
        log("writing features.h5 and matches.h5")
        t0 = time.perf_counter()
        from .features_h5 import write_hloc

        merged = write_hloc(journal.records, out, job.merge_grid)
        done_pairs: list[Pair] = list(merged.pop("pairs"))  # type: ignore[call-overload]
        write_pairs(done_pairs, out / "pairs.txt")
        summary["merge"] = dict(merged, grid_px=job.merge_grid, seconds=round(time.perf_counter() - t0, 3))
    if job.colmap is not None:
        from .colmap import write_database

        log(f"writing the COLMAP database {job.colmap} (pycolmap verification)")
        summary["colmap"] = write_database(Path(job.colmap), job.image_dir, out / "features.h5",
                                           out / "matches.h5", done_pairs)
        if job.reconstruct:
            from .colmap import reconstruct

            log("incremental mapping (pycolmap)")
            summary["reconstruction"] = reconstruct(Path(job.colmap), job.image_dir, out / "sfm")
    atomic_text(out / "summary.json", json.dumps(summary, indent=1))
    return summary


def default_workers() -> int:
    """Loader workers: the cores beside the main process, at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))
