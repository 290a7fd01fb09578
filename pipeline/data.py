"""Load a stage's rows from local files, the hub, or the embedded demo, and check them before training.

Every source goes through `load_rows`, so user data and the demo data take the same path.
A row that cannot be used stops the stage before training with an error naming the file,
the row and the field.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.config import DataSection
from pipeline.errors import DataError
from pipeline import movie_reviews, schemas

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def resolve_source(source: str, data_dir: Path) -> str:
    """A `movie-reviews:<split>` source becomes its JSONL path; anything else is returned as is."""
    if source.startswith(movie_reviews.PREFIX):
        try:
            return str(movie_reviews.split_path(source, data_dir))
        except ValueError as err:
            raise DataError(str(err)) from None
    return source


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def is_local_source(source: str) -> bool:
    return Path(source).suffix in LOCAL_FORMATS or source.startswith((".", "/", "~")) or os.path.exists(source)


def _is_blank(path: Path) -> bool:
    """True when a text file holds nothing but whitespace (read only up to its first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


class BadJsonLine(ValueError):
    """A JSONL line that does not parse: its 1-based number and the decoder's error."""

    def __init__(self, number: int, err: json.JSONDecodeError):
        super().__init__(f"line {number}: not valid JSON ({err.msg} at column {err.colno})")
        self.number, self.err = number, err


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for every non-blank line of a JSONL text, numbered from 1; raises
    BadJsonLine at the first line that is not JSON."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadJsonLine(number, err) from None
        yield number, value


def _bad_json_line(path: Path) -> str | None:
    """`line N: ...` for the first line of a JSONL file that is not a JSON object, or None."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        try:
            for number, row in json_lines(f):
                if not isinstance(row, dict):
                    return f"line {number}: expected a JSON object, got {type(row).__name__}"
        except BadJsonLine as bad:
            return str(bad)
    return None


# The defaults of `data.split` and `data.eval_split`: a dataset saved without splits is taken whole for them.
WHOLE_DATASET_SPLITS = ("train", "test")


def check_whole_dataset_split(path: Path, split: str, split_key: str) -> None:
    """A dataset saved without splits has none to choose: a split named other than the defaults would
    silently read the same rows as every other split (the training rows evaluated as held-out ones)."""
    if split not in WHOLE_DATASET_SPLITS:
        raise DataError(f"{split_key}: {path} is one dataset saved without splits (Dataset.save_to_disk), so it "
                        f"has no split '{split}'; leave {split_key} unset to use it whole, or save a DatasetDict")


def load_folder(path: Path, split: str, what: str, split_key: str | None = None, streaming: bool = False):
    """A folder written by `save_to_disk` (one dataset, or a DatasetDict whose `split` is taken), or a folder
    of data files laid out like a hub dataset's repository (e.g. a local copy: data/train-*.parquet), then
    streamed when `streaming` (its rows read as iterated, nothing cached). `split_key` is the config key that
    chose `split` (default `what`)."""
    import datasets

    try:
        if (path / "dataset_dict.json").exists():
            saved = datasets.load_from_disk(str(path))
            if split not in saved:
                raise DataError(f"{what}: {path}: no split '{split}' (splits: {', '.join(saved)})")
            return saved[split]
        if (path / "state.json").exists():
            check_whole_dataset_split(path, split, split_key or what)
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(str(path), split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as err:  # datasets raises several types for a folder it cannot read
        raise DataError(f"{what}: {path}: cannot be read as a dataset folder, split '{split}' "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def load_dataset_any(source: str, split: str, what: str, split_key: str | None = None):
    """A `datasets.Dataset` from a local JSONL/JSON/parquet/CSV file, a dataset folder, or a hub dataset name."""
    import datasets

    if is_local_source(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"{what}: data file not found: {path}")
        if path.is_dir():
            return load_folder(path, split, what, split_key)
        fmt = LOCAL_FORMATS.get(path.suffix)
        if fmt is None:
            raise DataError(f"{what}: {path}: unsupported format; use one of {', '.join(LOCAL_FORMATS)}")
        if fmt != "parquet" and _is_blank(path):
            raise DataError(f"{what}: {path}: file is empty")
        try:
            as_text = {"features": csv_text_features(path)} if fmt == "csv" else {}
            return datasets.load_dataset(fmt, data_files=str(path), split="train", **as_text)
        except Exception as err:  # datasets wraps parse errors in several types
            where = _bad_json_line(path) if path.suffix == ".jsonl" else None
            raise DataError(f"{what}: {path}: " + (where or f"cannot be read as {fmt} ({type(err).__name__}: "
                                                            f"{str(err).splitlines()[0][:200]})")) from None
    if not hub_reachable():
        raise DataError(f"{what}: '{source}' is not a local file and the Hugging Face hub is offline")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as err:
        raise DataError(f"{what}: cannot load hub dataset '{source}' split '{split}': "
                        f"{str(err).splitlines()[0][:200]}") from None


def csv_text_features(path: Path):
    """Every column of a CSV file typed as text: a CSV cell has no type, and a completion "4" is the text 4,
    which pandas would otherwise read as a number that no field accepts."""
    import datasets
    import pandas

    return datasets.Features({name: datasets.Value("string") for name in pandas.read_csv(path, nrows=0).columns})


def _check_value(value: Any, field: str) -> str | None:
    """Why `value` is unusable for `field`, or None when it is fine."""
    if value is None:
        return f"field '{field}' is missing"
    if field == "messages":
        if not isinstance(value, list) or not value:
            return "field 'messages' must be a non-empty list of {role, content}"
        for turn in value:
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), str) or not turn.get("role"):
                return "field 'messages' holds a turn without role/content"
        return None
    if isinstance(value, list):  # conversational prompt/completion
        return None if value else f"field '{field}' is empty"
    if not isinstance(value, str):
        return f"field '{field}' must be a string, got {type(value).__name__}"
    if not value.strip():
        return f"field '{field}' is an empty string"
    return None


def validate_rows(ds, fields: list[str], where: str) -> None:
    """Stop before training on an empty dataset or the first row with a missing or empty field."""
    if len(ds) == 0:
        raise DataError(f"{where}: dataset is empty")
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise DataError(f"{where}: row 1: field '{missing[0]}' is missing (columns: {', '.join(ds.column_names)})")
    for i, row in enumerate(ds.select_columns(fields)):
        for field in fields:
            problem = _check_value(row[field], field)
            if problem:
                raise DataError(f"{where}: row {i + 1}: {problem}")


def load_rows(
    data: DataSection,
    *,
    split: str,
    fields: list[str] | None,
    data_dir: Path,
    what: str,
    optional_fields: tuple[str, ...] = (),
):
    """Load the `train` or `eval` source of a stage's data section, renamed and checked.

    `fields` are the stage's own names (prompt, completion, ...); `data.columns` maps them to the
    dataset's names; None keeps every column and checks only that there are rows. Returns None when
    `eval` is requested but not configured.
    """
    source = data.train if split == "train" else data.eval
    if source is None:
        if split == "train":
            raise DataError(f"{data_key(what, split)}: no training data configured")
        return None
    path = resolve_source(source, data_dir)
    ds = load_dataset_any(path, data.split if split == "train" else data.eval_split, data_key(what, split),
                          split_key(what, split))
    renames = {theirs: ours for ours, theirs in data.columns.items() if theirs in ds.column_names and theirs != ours}
    # `{prompt: question}` names the column the user wants as the prompt; a column already called `prompt` is
    # the one they chose not to use (a hub dataset's they cannot drop themselves), so it goes, as in `renamed`
    shadowed = [ours for ours in renames.values() if ours in ds.column_names and ours not in renames]
    if shadowed:
        ds = ds.remove_columns(shadowed)
    if renames:
        ds = ds.rename_columns(renames)
    if split == "train" and data.max_samples is not None:
        ds = ds.select(range(min(data.max_samples, len(ds))))
    validate_rows(ds, fields or [], path)
    if fields is None:
        return ds
    keep = [c for c in ds.column_names if c in fields or c in optional_fields]
    return ds.select_columns(keep)


def data_key(what: str, split: str) -> str:
    """The config key that names a data source: a stage's `<stage>.data.<split>`, or a key given whole
    (`eval.prompts`, `eval.fluency_text`)."""
    return what if "." in what else f"{what}.data.{split}"


def split_key(what: str, split: str) -> str:
    """The config key that chooses the split read from a source: a stage's `<stage>.data.split` or
    `<stage>.data.eval_split`, or a key given whole (`eval.prompts`)."""
    return what if "." in what else f"{what}.data.{'split' if split == 'train' else 'eval_split'}"


def check_first_row(data: DataSection, stage: str, what: str) -> dict[str, dict[str, Any]]:
    """Before anything is written or launched: each local data file of a stage is UTF-8 text (JSONL, JSON,
    CSV), each dataset folder has the split the stage reads, and the first row fits one of the stage's formats
    (the stage itself checks every row before training). Hub names and the demo's splits are left to the stage.
    Returns the first rows checked, by split, as the stage will see them."""
    checked = {}
    for split in ("train", "eval"):
        source = data.train if split == "train" else data.eval
        if not source or source.startswith(movie_reviews.PREFIX):
            continue
        path = Path(source).expanduser()
        if path.is_dir():
            first = first_row_of_folder(path, data.split if split == "train" else data.eval_split,
                                        data_key(what, split), split_key(what, split))
        elif path.suffix in LOCAL_FORMATS and path.is_file():  # preflight names a missing file
            first = first_row(path, f"{data_key(what, split)}: {path}")
        else:
            continue
        if first is None:
            continue  # a JSON document this check does not parse alone: the stage reads it whole
        row = renamed(first, data.columns)
        checked[split] = schemas.normalise(stage, row_format(data, stage, row, str(path), what), [row], str(path))[0]
    return checked


def first_row_of_folder(path: Path, split: str, what: str, split_key: str) -> dict[str, Any]:
    """The first row of the split a stage reads from a dataset folder, its split checked as the stage checks it;
    nothing else is read (a saved dataset is memory-mapped, a folder of data files streamed)."""
    ds = load_folder(path, split, what, split_key, streaming=True)
    try:
        first = next(iter(ds), None)
    except Exception as err:  # a streamed data file is parsed only now
        raise DataError(f"{what}: {path}: cannot be read as a dataset folder, split '{split}' "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    if first is None:
        raise DataError(f"{what}: {path}: split '{split}' has no rows")
    return first


def check_utf8(path: Path, key: str) -> None:
    """Stop on the first bytes of a text file that are not UTF-8, naming the line (read in chunks)."""
    import codecs

    decoder, line = codecs.getincrementaldecoder("utf-8")(), 1
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                line += chunk[: err.start].count(b"\n")
                raise DataError(f"{key}: line {line}: not UTF-8 text (byte 0x{chunk[err.start]:02x}); "
                                "save the file as UTF-8") from None
            if not chunk:
                return
            line += chunk.count(b"\n")


def first_row(path: Path, key: str) -> dict[str, Any] | None:
    """The first row of a local data file as the stage will load it; None for a JSON document that is not an
    array or JSON lines (an indented object: the stage reads it whole)."""
    if path.suffix != ".parquet":
        check_utf8(path, key)
        if _is_blank(path):
            raise DataError(f"{key}: file is empty")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=1), None)
        except Exception as err:  # pyarrow raises several types for a file that is not parquet
            raise DataError(f"{key}: cannot be read as parquet ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200]})") from None
        if batch is None or batch.num_rows == 0:
            raise DataError(f"{key}: file has no rows")
        return batch.to_pylist()[0]
    if path.suffix == ".csv":
        import pandas  # what `datasets` reads CSV with, so the values have the types the stage sees

        try:
            head = pandas.read_csv(path, nrows=1, dtype=str)  # as the stage reads it (csv_text_features)
        except Exception as err:
            raise DataError(f"{key}: cannot be read as CSV ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200]})") from None
        if head.empty:
            raise DataError(f"{key}: file has a header but no rows")
        return {k: (None if pandas.isna(v) else v) for k, v in head.to_dict("records")[0].items()}
    with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is skipped, as datasets skips it
        if path.suffix == ".json" and f.read(1 << 12).lstrip().startswith("["):
            f.seek(0)
            first = first_of_array(f, key)
            # datasets reads an array of strings as rows of `text`
            return {"text": first} if isinstance(first, str) else _json_object(first, key)
        f.seek(0)
        try:
            first = next((row for _, row in json_lines(f)), None)
        except BadJsonLine as bad:
            if path.suffix == ".json":
                return None  # an indented JSON document, not JSON lines
            raise DataError(f"{key}: {bad}") from None
    return _json_object(first, key)


def _json_object(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataError(f"{key}: line 1: expected a JSON object")
    return value


def first_of_array(f, key: str) -> Any:
    """The first element of the JSON array a text file holds, read only as far as that element's end (a large
    file is not read whole: the decoder is retried on a longer prefix until the element is complete)."""
    decoder = json.JSONDecoder()
    text = f.read(1 << 16).lstrip()[1:]  # after the '['
    while True:
        start = len(text) - len(text.lstrip())
        if text[start:start + 1] == "]":
            raise DataError(f"{key}: the JSON array has no rows")
        try:
            return decoder.raw_decode(text, start)[0]
        except json.JSONDecodeError as err:
            more = f.read(1 << 20)
            if not more:
                raise DataError(f"{key}: not valid JSON ({err.msg} in the array's first element)") from None
            text += more


def row_format(data: DataSection, stage: str, first_row: dict[str, Any], where: str, what: str) -> str:
    """The declared `data.format`, or the one the first row's fields show; a row that fits none stops here."""
    fmt = schemas.detect(stage, first_row) if data.format == "auto" else data.format
    if fmt is None:
        raise DataError(f"{where}: row 1: no {stage} format fits the fields ({', '.join(first_row)}); "
                        f"expected {schemas.EXPECTED[stage]} (rename with {what}.data.columns)")
    return fmt


@dataclass
class StageRows:
    """A stage's rows in the form `pipeline.schemas` gives them, the format they had, and where they came from."""

    rows: Any  # datasets.Dataset
    format: str
    source: str


def load_stage_rows(data: DataSection, stage: str, *, split: str, data_dir: Path, what: str) -> StageRows | None:
    """The `train` or `eval` rows of a stage in any format it accepts (see pipeline/schemas.py), every row
    checked; None when `eval` is requested but not configured."""
    import datasets

    ds = load_rows(data, split=split, fields=None, data_dir=data_dir, what=what)
    if ds is None:
        return None
    where = resolve_source(data.train if split == "train" else data.eval, data_dir)
    first = ds[0]
    fmt = row_format(data, stage, first, where, what)
    keep = schemas.columns_of(stage, fmt, first)
    missing = [c for c in keep if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: row 1: field '{missing[0]}' is missing (format '{fmt}'; columns: "
                        f"{', '.join(ds.column_names)})")
    rows = ds.select_columns(keep)
    if mixed_columns(ds, keep) and Path(where).suffix in (".json", ".jsonl") and Path(where).is_file():
        # datasets keeps a column whose rows mix types as JSON text and decodes back any string that parses
        # as JSON ("4" becomes 4, "null" None); the file's own values name the row that really differs
        rows = [{c: row.get(c) for c in keep} for row in islice(json_file_rows(Path(where), data.columns), len(ds))]
    return StageRows(datasets.Dataset.from_list(schemas.normalise(stage, fmt, rows, where)), fmt, where)


def mixed_columns(ds, names: list[str]) -> list[str]:
    """The columns among `names` that datasets typed as JSON because their rows hold values of several types."""
    import datasets

    json_type = getattr(datasets, "Json", None)  # datasets >= 5
    return [n for n in names if json_type is not None and isinstance(ds.features[n], json_type)]


def json_file_rows(path: Path, columns: dict[str, str]) -> Iterator[dict[str, Any]]:
    """The rows of a JSON lines or JSON array file as the json module reads them, renamed by `columns`."""
    with open(path, encoding="utf-8-sig") as f:
        if f.read(1 << 12).lstrip().startswith("["):
            f.seek(0)
            rows = ({"text": v} if isinstance(v, str) else v for v in json.load(f))  # as datasets reads strings
        else:
            f.seek(0)
            rows = (row for _, row in json_lines(f))
        yield from (renamed(row, columns) for row in rows)


def renamed(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """A row with the dataset's column names replaced by the stage's (`data.columns`, ours -> theirs)."""
    theirs = {t: o for o, t in columns.items() if t in row}
    return {**{k: v for k, v in row.items() if k not in theirs}, **{o: row[t] for t, o in theirs.items()}}
