"""Artifact formats: every file a step writes is written and read back here.

`.npy` for arrays (never pickled), Parquet for tables, one-name-a-line text for lists,
CSV fields for names. Steps and the datapool import these instead of each other.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from tasks.storage import Storage


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_chunks(array: np.ndarray) -> list[bytes | memoryview]:
    """An array as .npy file content without copying its data: the header, then the
    array's own buffer (for `Storage.write_stream`)."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return [header.getvalue(), array.data.cast("B")]


def read_npy(storage: Storage, key: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read(key)), allow_pickle=False)


def to_parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def read_parquet_bytes(data: bytes) -> pd.DataFrame:
    import pandas as pd

    return pd.read_parquet(io.BytesIO(data))


def csv_field(name: str) -> str:
    """A file name as one CSV field (names may contain commas or quotes)."""
    if any(c in name for c in ',"\n\r'):
        return '"' + name.replace('"', '""') + '"'
    return name


def text_lines(names: list[str]) -> bytes:
    """A list of names, one a line (`filenames/*.txt`)."""
    return "".join(f"{name}\n" for name in names).encode()


# embeddings.csv (Lightly's format): `filenames,embedding_0,...,embedding_{d-1},labels`.
# Nine significant digits: the fewest that give every float32 back exactly.
EMBEDDING_FORMAT = "%.9g"


def embedding_csv_header(dim: int) -> str:
    return "filenames," + "".join(f"embedding_{i}," for i in range(dim)) + "labels\n"


def embedding_csv_rows(names: list[str], vectors: np.ndarray) -> str:
    """Rows of embeddings.csv, one per name (labels are 0: we have none)."""
    numbers = io.StringIO()
    np.savetxt(numbers, vectors, fmt=EMBEDDING_FORMAT, delimiter=",")  # C speed
    rows = numbers.getvalue().splitlines()
    return "".join(f"{csv_field(name)},{row},0\n" for name, row in zip(names, rows, strict=True))


def embedding_csv(names: list[str], vectors: np.ndarray) -> str:
    """A whole embeddings.csv (small ones; `tasks.export` streams big ones in blocks)."""
    return embedding_csv_header(vectors.shape[1]) + embedding_csv_rows(names, vectors)


def read_embedding_csv(data: bytes) -> tuple[list[str], np.ndarray]:
    """Names and float32 rows of an embeddings.csv; a ValueError when it is not one.
    Names are read as written: `01`, `nan` or `NA` stay text."""
    import pandas as pd

    table = pd.read_csv(
        io.BytesIO(data), dtype={"filenames": str}, keep_default_na=False, na_values=[]
    )
    columns = [c for c in table.columns if str(c).startswith("embedding_")]
    if "filenames" not in table.columns or not columns:
        raise ValueError("expected Lightly's embeddings.csv (filenames,embedding_0,...,labels)")
    return table["filenames"].tolist(), table[columns].to_numpy(np.float64).astype(np.float32)
