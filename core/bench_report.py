"""`matchrt bench-report`: the rows of several `matchrt bench --json` files in one table and chart, each
timed row beside its speed-up over the eager fp32 row of the same GPU.

Why: compiled rows are best measured in processes of their own (each compiles for minutes, and a process
that ran other rows has warmed caches and clocks), so one before/after comparison spans several JSON files.
Timings compare only on one GPU, so a row's reference is the eager fp32 row (torch, fp32; same matcher,
input size, swept options and batch) of the same file, or of another file recorded on the same GPU (its
UUID, in the provenance since session 24). Files from before that record no UUID: pass ``one_machine`` to
vouch that they come from one GPU; otherwise their rows get no speed-up across files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from .bench import BenchRow, _label, _per_pair, _shape
from .errors import MatchrtError


@dataclass
class ReportRow:
    """One bench row and where it came from."""

    row: BenchRow
    source: Path  # the JSON file
    gpu: str  # the GPU's name (or the bench's device) as the file records it
    gpu_uuid: Optional[str]  # the physical GPU, where the file records it
    speedup: Optional[float] = None  # reference ms per pair / this row's ms per pair
    reference: Optional[Path] = None  # the file holding the reference row


def read_bench_json(path: Path) -> tuple[list[BenchRow], dict[str, Any]]:
    """The rows and provenance of a `matchrt bench --json` file; fields a newer or older bench wrote that
    this one does not know are ignored, missing ones take their defaults."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MatchrtError(f"{path}: not readable as JSON ({exc}); pass files written by `matchrt bench --json`")
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise MatchrtError(f"{path}: no \"rows\" list, so not a `matchrt bench --json` file; pass files written "
                           "by `matchrt bench --json`")
    known = {f.name for f in fields(BenchRow)}
    rows = []
    for i, item in enumerate(data["rows"]):
        try:
            rows.append(BenchRow(**{k: v for k, v in item.items() if k in known}))
        except (TypeError, AttributeError) as exc:
            raise MatchrtError(f"{path}: row {i} is not a bench row ({exc})")
    return rows, data.get("provenance") or {}


def _comparable(row: BenchRow) -> tuple[Any, ...]:
    """What a reference row must share with a timed row: matcher, input size, swept options, batch."""
    return row.matcher, tuple(row.input_size), tuple(sorted((k, repr(v)) for k, v in row.sweep.items())), row.batch


def _is_reference(row: BenchRow) -> bool:
    return row.status == "ok" and row.backend == "torch" and row.precision == "fp32"


def collect(paths: list[Path], one_machine: bool = False) -> list[ReportRow]:
    """Every row of ``paths`` in order, each ok row with its speed-up over the eager fp32 row of the same
    file, else of a file from the same GPU: the same recorded UUID, or, with ``one_machine``, a GPU of the
    same name where a file records no UUID (two different recorded UUIDs are two GPUs)."""
    entries: list[ReportRow] = []
    for path in paths:
        rows, prov = read_bench_json(path)
        gpu = str(prov.get("gpu") or prov.get("device") or "unknown device")
        entries += [ReportRow(r, Path(path), gpu, prov.get("gpu_uuid")) for r in rows]
    references = [e for e in entries if _is_reference(e.row)]
    for entry in entries:
        if entry.row.status != "ok":
            continue
        same = [r for r in references if _comparable(r.row) == _comparable(entry.row)]
        found = ([r for r in same if r.source == entry.source]
                 or [r for r in same if entry.gpu_uuid is not None and r.gpu_uuid == entry.gpu_uuid]
                 or ([r for r in same if r.gpu == entry.gpu and None in (r.gpu_uuid, entry.gpu_uuid)]
                     if one_machine else []))
        if found:
            entry.reference = found[0].source
            entry.speedup = _per_pair(found[0].row) / _per_pair(entry.row)
    return entries


def unmatched(entries: list[ReportRow]) -> list[ReportRow]:
    """Timed rows left without a speed-up: no eager fp32 row of their kind on a GPU known to be theirs."""
    return [e for e in entries if e.row.status == "ok" and e.speedup is None]


def _spread(r: BenchRow) -> str:
    """Median ms per pair with its p10-p90."""
    b = max(1, r.batch)
    return f"{_per_pair(r):.2f} ({r.model_ms['p10'] / b:.2f}-{r.model_ms['p90'] / b:.2f})"


def render_table(entries: list[ReportRow]) -> Any:
    """The report as a rich Table for the terminal."""
    from rich.table import Table

    table = Table(title="matchrt bench-report", title_style="bold")
    for col in ("matcher", "backend", "prec", "input", "B", "ms/pair p50 (p10-p90)", "x eager fp32", "GPU", "file"):
        table.add_column(col, justify="right" if col in ("B", "ms/pair p50 (p10-p90)", "x eager fp32") else "left")
    for e in entries:
        r = e.row
        ok = r.status == "ok"
        table.add_row(r.matcher, r.backend, r.precision, _shape(r), str(r.batch),
                      _spread(r) if ok else f"{r.status}: {r.reason}"[:40],
                      "-" if e.speedup is None else f"{e.speedup:.2f}", e.gpu, e.source.name)
    return table


def markdown(entries: list[ReportRow]) -> str:
    """The report as a Markdown table, with the sources and what a missing speed-up means."""
    head = ["matcher", "backend", "precision", "input", "batch", "ms per pair, median (p10-p90)", "ms per MP",
            "x eager fp32", "GPU", "file"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        r = e.row
        if r.status != "ok":
            lines.append(f"| {_label(r)} | {r.backend} | {r.precision} | {_shape(r)} | {r.batch} | "
                         f"{r.status}: {r.reason} | - | - | {e.gpu} | {e.source.name} |")
            continue
        mpix = "-" if r.ms_per_mpix is None else f"{r.ms_per_mpix:.1f}"
        ratio = "-" if e.speedup is None else f"{e.speedup:.2f}"
        lines.append(f"| {_label(r)} | {r.backend} | {r.precision} | {_shape(r)} | {r.batch} | {_spread(r)} | {mpix} | "
                     f"{ratio} | {e.gpu} | {e.source.name} |")
    lines.append("\nx eager fp32: the eager fp32 row's ms per pair (same matcher, input, options and batch, same "
                 "GPU) divided by the row's. A row's reference comes from its own file, or from a file recorded "
                 "on the same GPU.")
    if unmatched(entries):
        lines.append("\"-\": no eager fp32 row of that kind known to come from the same GPU (files that record no "
                     "GPU UUID count only with --one-machine).")
    if any(e.row.random_weights for e in entries):
        lines.append("\n**Random weights**: accuracy figures are meaningless; timings are not.")
    return "\n".join(lines) + "\n"


__all__ = ["ReportRow", "collect", "markdown", "read_bench_json", "render_table", "unmatched"]
