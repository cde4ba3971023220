"""Training and holdout data: load from files or wrap in-memory arrays, with clear errors.

Formats: CSV (header row; the label is a named column), ``.npz`` (arrays ``X`` and ``y``), and
Parquet when pyarrow is installed. Columns that are not numeric stay strings (they need an
encoder in the pipeline).
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from compiler.errors import InputDataError

__all__ = ["Dataset", "dataset_from_arrays", "load_dataset"]


@dataclass(frozen=True)
class Dataset:
    """Features, optional labels, and the sha256 that provenance records."""

    X: pd.DataFrame | np.ndarray
    y: np.ndarray | None
    sha256: str
    source: str

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_columns(self) -> int:
        return int(self.X.shape[1]) if self.X.ndim == 2 else 0

    def rows(self, index: np.ndarray) -> Dataset:
        X = self.X.iloc[index] if isinstance(self.X, pd.DataFrame) else self.X[index]
        y = None if self.y is None else self.y[index]
        return Dataset(X, y, self.sha256, self.source)


def _hash_arrays(X: Any, y: Any) -> str:
    h = hashlib.sha256()
    if isinstance(X, pd.DataFrame):
        h.update(repr(list(X.columns)).encode())
        h.update(pd.util.hash_pandas_object(X, index=False).to_numpy().tobytes())
    else:
        arr = np.ascontiguousarray(X)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes() if arr.dtype != object else repr(arr.tolist()).encode())
    if y is not None:
        yarr = np.asarray(y)
        h.update(repr(yarr.tolist()).encode() if yarr.dtype == object else yarr.tobytes())
    return h.hexdigest()


def _check(X: Any, y: Any, source: str, require_labels: bool) -> None:
    if X.ndim != 2:
        raise InputDataError(f"{source}: features must be 2-D (rows x columns), got {X.ndim}-D")
    if X.shape[0] == 0:
        raise InputDataError(f"{source}: no rows; the compiler needs data to check the model")
    if X.shape[1] == 0:
        raise InputDataError(f"{source}: no feature columns")
    if require_labels and y is None:
        raise InputDataError(
            f"{source}: labels are missing; the holdout needs them (CSV: --label COLUMN; "
            ".npz: an array named 'y')"
        )
    if y is not None and len(y) != X.shape[0]:
        raise InputDataError(f"{source}: {X.shape[0]} rows of features but {len(y)} labels")


def dataset_from_arrays(X: Any, y: Any = None, *, source: str = "<memory>",
                        require_labels: bool = False) -> Dataset:
    """Wrap in-memory data (numpy array or pandas DataFrame)."""
    if not isinstance(X, pd.DataFrame):
        X = np.asarray(X)
    yv = None if y is None else np.asarray(y)
    _check(X, yv, source, require_labels)
    return Dataset(X, yv, _hash_arrays(X, yv), source)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_dataset(path: str | Path, *, label: str | None = None,
                 require_labels: bool = False) -> Dataset:
    """Load CSV, .npz or Parquet; `label` names the label column (CSV/Parquet)."""
    p = Path(path)
    if not p.is_file():
        raise InputDataError(f"data file {p} does not exist")
    suffix = p.suffix.lower()
    y: np.ndarray | None = None
    X: pd.DataFrame | np.ndarray
    try:
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as npz:
                if "X" not in npz:
                    raise InputDataError(
                        f"{p}: .npz holds {sorted(npz.files)}; expected an array named 'X'"
                    )
                X = npz["X"]
                y = npz.get("y")
        elif suffix in (".csv", ".parquet", ".pq"):
            if suffix == ".csv":
                frame = pd.read_csv(p)
            else:
                try:
                    import pyarrow  # noqa: F401
                except ImportError as err:
                    raise InputDataError(
                        f"{p}: reading Parquet needs pyarrow (pip install pyarrow)"
                    ) from err
                frame = pd.read_parquet(p)
            if label is not None:
                if label not in frame.columns:
                    raise InputDataError(
                        f"{p}: label column {label!r} not found; columns are "
                        f"{list(frame.columns)[:20]}"
                    )
                y = frame[label].to_numpy()
                frame = frame.drop(columns=[label])
            X = frame
        else:
            raise InputDataError(
                f"{p}: unknown data format {suffix!r}; expected .csv, .npz or .parquet"
            )
    except InputDataError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, pd.errors.ParserError,
            pd.errors.EmptyDataError) as err:
        raise InputDataError(f"{p}: cannot read data: {str(err).splitlines()[0]}") from err
    if isinstance(X, pd.DataFrame) and all(
        pd.api.types.is_numeric_dtype(t) for t in X.dtypes
    ) and all(str(c).isdigit() or str(c).startswith("Unnamed") for c in X.columns):
        X = X.to_numpy(dtype=np.float64)
    _check(X, y, str(p), require_labels)
    return Dataset(X, y, _file_sha256(p), str(p))
