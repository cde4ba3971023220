"""Batch scoring of files: stream a CSV (or Parquet) file through the agent in chunks.

Memory stays bounded by the chunk size whatever the file size. Columns that are not model inputs
(ids, timestamps, labels) pass through to the output unchanged; empty cells are missing values.
The output is written to a temp file and renamed, so a failed run leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from edge_agent.agent import Agent, PredictResult
from edge_agent.atomic import atomic_write
from edge_agent.errors import InputError

__all__ = ["score_file"]


def _csv_chunks(path: Path, size: int, bar: Any) -> Iterator[tuple[list[str], list[list[str]]]]:
    with path.open("rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        reader = csv.reader(text)
        header = next(reader, None)
        if header is None:
            raise InputError(f"{path} is empty; expected a header row")
        chunk: list[list[str]] = []
        last = 0
        for line in reader:
            chunk.append(line)
            if len(chunk) >= size:
                yield header, chunk
                chunk = []
                pos = raw.tell()
                bar.update(pos - last)
                last = pos
        if chunk:
            yield header, chunk
        bar.update(max(0, path.stat().st_size - last))


def _parquet_chunks(path: Path, size: int, bar: Any) -> Iterator[tuple[list[str],
                                                                        list[list[Any]]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from err
    pf = pq.ParquetFile(path)
    header = list(pf.schema_arrow.names)
    for batch in pf.iter_batches(batch_size=size):
        cols = batch.to_pydict()
        rows = [list(r) for r in zip(*(cols[h] for h in header), strict=True)]
        bar.update(batch.num_rows)
        yield header, rows


def _cell_number(value: Any, column: str, line: int) -> float:
    if value is None or value == "":
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(
            f"row {line}, column {column!r} = {value!r:.40}: expected a number or an empty cell"
        ) from None


def _model_input(agent: Agent, header: list[str], rows: list[list[Any]],
                 first_line: int) -> tuple[Any, list[int]]:
    validator = agent.serving().validator
    if validator.signal:
        if len(header) != validator.width:
            raise InputError(f"file has {len(header)} columns; this model takes "
                             f"{validator.describe()}")
        return [[_cell_number(v, header[j], first_line + i) for j, v in enumerate(r)]
                for i, r in enumerate(rows)], []
    index = {h: j for j, h in enumerate(header)}
    absent = [n for n in validator.names if n not in index]
    if absent:
        raise InputError(f"file has no column {absent[0]!r}; the model takes "
                         f"{list(validator.names)}")
    data: dict[str, list[Any]] = {}
    for spec in validator.specs:
        j = index[spec.name]
        if spec.dtype == "string":
            data[spec.name] = [None if (r[j] is None or r[j] == "") else str(r[j]) for r in rows]
        else:
            data[spec.name] = [_cell_number(r[j], spec.name, first_line + i)
                               for i, r in enumerate(rows)]
    keep = [j for j, h in enumerate(header) if h not in validator._index]
    return data, keep


def _result_columns(result: PredictResult, labels: tuple[str, ...]) -> tuple[list[str],
                                                                              list[list[Any]]]:
    names = ["prediction_id", "label"]
    cols: list[list[Any]] = [result.ids, [str(x) for x in result.labels]]
    if result.probabilities is not None:
        for k, lbl in enumerate(labels):
            names.append(f"p_{lbl}")
            cols.append([float(p) for p in result.probabilities[:, k]])
    elif result.values is not None:
        names[1] = "value"
        cols[1] = [float(v) for v in result.values]
    return names, cols


def score_file(agent: Agent, input_file: Path, output_file: Path, *, chunk_rows: int = 4096,
               progress: bool = False) -> int:
    """Score every row; returns the number of rows written."""
    parquet_in = input_file.suffix.lower() in (".parquet", ".pq")
    total = input_file.stat().st_size
    bar_cm = (click.progressbar(length=total, label="scoring", file=None) if progress
              else contextlib.nullcontext(_NoBar()))
    written = 0
    labels = agent.serving().bundle.manifest.labels
    with bar_cm as bar, atomic_write(output_file) as out:
        text = io.TextIOWrapper(out, encoding="utf-8", newline="")
        writer = csv.writer(text)
        chunks = (_parquet_chunks(input_file, chunk_rows, _NoBar()) if parquet_in
                  else _csv_chunks(input_file, chunk_rows, bar))
        line = 2  # the header is line 1
        for header, rows in chunks:
            data, keep = _model_input(agent, header, rows, line)
            result = agent.predict(data)
            names, cols = _result_columns(result, labels)
            if written == 0:
                writer.writerow([header[j] for j in keep] + names)
            for i, r in enumerate(rows):
                writer.writerow([r[j] for j in keep] + [c[i] for c in cols])
            written += len(rows)
            line += len(rows)
        if written == 0:
            writer.writerow(["prediction_id", "label"])
        text.flush()
        text.detach()
    return written


class _NoBar:
    def update(self, n: int) -> None:
        return None

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
