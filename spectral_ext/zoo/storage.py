"""Zoo results on disk: tables per chunk committed by an atomic rename,
resumption (what is finished), merging, the options a resumed run must
share, the writer's lock and the output and metadata checks."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
import time

import pandas as pd
import torch

from ._base import TABLES, ZooError

def _write(frame: pd.DataFrame, path: pathlib.Path, fmt: str):
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)


STRING_COLUMNS = ("model", "model_a", "model_b", "layer", "previous", "next", "architecture", "error", "measure",
                  "kind", "path", "source")


def _read(path: pathlib.Path, fmt: str) -> pd.DataFrame:
    """A table as written: names stay strings ("NA", "None", "nan" and "0"
    are names, not missing values or numbers); only empty fields are missing."""
    if fmt == "parquet":
        frame = pd.read_parquet(path)
    else:
        try:
            frame = pd.read_csv(path, dtype={c: str for c in STRING_COLUMNS}, keep_default_na=False, na_values=[""])
        except pd.errors.EmptyDataError:
            return pd.DataFrame()
    for column in STRING_COLUMNS:
        if column in frame:
            frame[column] = frame[column].fillna("").astype(str)
    return frame


RECORD = "chunk.json"  # in each chunk: every table's file, rows and sha256, written before the commit


def _digest(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _commit_chunk(out: pathlib.Path, chunk_id: str, tables: dict[str, pd.DataFrame], fmt: str):
    """Write every table of a chunk into a temporary folder with its record
    (rows, bytes and sha256 per table), then rename it into place: a chunk is
    either wholly present or absent, and a later change to its files (a
    truncation, a disk error) fails _verify_chunks. Chunk ids are unique, so
    a commit never replaces an earlier chunk."""
    root = out / "chunks"
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{chunk_id}.", suffix=".tmp", dir=root))
    record = {}
    for name, frame in tables.items():
        path = tmp / f"{name}.{fmt}"
        _write(frame, path, fmt)
        record[name] = {"file": path.name, "rows": len(frame), "bytes": path.stat().st_size, "sha256": _digest(path)}
    (tmp / RECORD).write_text(json.dumps({"format": fmt, "tables": record}))
    final = root / f"{chunk_id}-{time.time_ns():x}-{os.getpid()}"
    os.rename(tmp, final)


def _chunk_folders(out: pathlib.Path) -> list[pathlib.Path]:
    root = out / "chunks"
    # in commit order (the id ends in its time); names starting with "." are interrupted or set-aside chunks
    return sorted((p for p in root.iterdir() if not p.name.startswith(".")), key=lambda p: p.name.rsplit("-", 2)[1:]) \
        if root.exists() else []


def _chunk_fault(chunk: pathlib.Path, fmt: str) -> str | None:
    """Why a committed chunk cannot be trusted (None when its record and files agree)."""
    try:
        record = json.loads((chunk / RECORD).read_text())
        tables = record["tables"]
        if not isinstance(tables, dict) or record.get("format") != fmt:
            return f"its record {RECORD} does not describe {fmt} tables"
    except FileNotFoundError:
        return f"it has no record {RECORD} of its rows and checksums (written by an earlier version)"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"its record {RECORD} is unreadable ({type(error).__name__})"
    for name, entry in tables.items():
        try:
            path = chunk / entry["file"]
            if path.parent != chunk:
                return f"its record names a file outside it ({entry['file']!r})"
            size = path.stat().st_size
            if size != entry["bytes"]:
                return f"{path.name} has {size} bytes, {entry['bytes']} were written"
            if _digest(path) != entry["sha256"]:
                return f"{path.name} does not match its checksum"
            rows = len(_read(path, fmt))
        except FileNotFoundError:
            return f"{entry.get('file', name)} is missing"
        except (KeyError, TypeError):
            return f"its record {RECORD} is malformed"
        except Exception as error:  # an unparsable table raises many kinds of errors
            return f"{entry['file']} is unreadable ({type(error).__name__})"
        if rows != entry["rows"]:
            return f"{path.name} has {rows} rows, {entry['rows']} were written"
    return None


def _verify_chunks(out: pathlib.Path, fmt: str) -> list[pathlib.Path]:
    """Check every committed chunk against its record before a run trusts it;
    a bad one is renamed aside (.bad-<name>, kept for inspection) with a
    warning, so its members and pairs count as not done and are redone.
    Returns the chunks set aside."""
    import warnings

    bad = []
    for chunk in _chunk_folders(out):
        fault = _chunk_fault(chunk, fmt)
        if fault is not None:
            aside = chunk.with_name(f".bad-{chunk.name}")
            os.rename(chunk, aside)
            warnings.warn(f"result chunk {chunk} is not as it was committed ({fault}): set aside as {aside.name}, "
                          "its rows are computed again", RuntimeWarning, stacklevel=3)
            bad.append(aside)
    return bad


def _finished(out: pathlib.Path, fmt: str) -> tuple[set[str], set[tuple[str, str]]]:
    models, pairs = set(), set()
    for chunk in _chunk_folders(out):
        path = chunk / f"models.{fmt}"
        if path.exists():
            frame = _read(path, fmt)
            if "model" in frame:
                models.update(frame["model"])
        path = chunk / f"pairs_done.{fmt}"
        if path.exists():
            frame = _read(path, fmt)
            if len(frame):
                pairs.update(zip(frame["model_a"], frame["model_b"]))
    return models, pairs


def _merge(out: pathlib.Path, fmt: str, tables=TABLES, write: bool = True) -> dict[str, pd.DataFrame]:
    """The chunks' tables joined; a model (or pair) found in two chunks keeps
    the rows of the first (a safety net: resumed runs skip finished members)."""
    chunks = _chunk_folders(out)
    merged = {}
    for table in tables:
        key = ["model"] if table in ("models", "layers", "edges") else ["model_a", "model_b"]
        parts, seen = [], set()
        for chunk in chunks:
            path = chunk / f"{table}.{fmt}"
            if not path.exists():
                continue
            part = _read(path, fmt)
            if not len(part):
                continue
            ids = list(zip(*(part[k] for k in key)))
            fresh = [i not in seen for i in ids]
            seen.update(ids)
            parts.append(part[fresh] if not all(fresh) else part)
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        keys = [k for k in ("model", "model_a", "model_b") if k in frame]
        if keys:  # stable: layers and edges keep their forward order within a model
            frame = frame.sort_values(keys, kind="stable").reset_index(drop=True)
        if write:
            _write(frame, out / f"{table}.{fmt}", fmt)
        merged[table] = frame
    return merged


# Options that decide the numbers of each phase: stored in <out>/options.json with the chunks.
def _run_options(arch, metrics, example_input, fmt, pairs, probe, layers, max_pairs, seed, stitch_options,
                 route: str | None = None) -> dict:
    """route: "weights" for a run without an architecture (its tables come from the weights alone: a run of
    an earlier version, whose state_dict members were all error rows, is not resumed by it)."""
    def fingerprint(value):
        if value is None:
            return None
        tensors = [value] if isinstance(value, torch.Tensor) else list(value) if isinstance(value, (tuple, list)) \
            else []
        digest = hashlib.sha1()
        for t in tensors:
            if isinstance(t, torch.Tensor):
                digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
                digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    arch_name = arch if isinstance(arch, str) or arch is None else \
        f"{getattr(arch, '__module__', '?')}:{getattr(arch, '__qualname__', type(arch).__name__)}"
    models = {"arch": arch_name, "metrics": list(metrics), "example_input": fingerprint(example_input),
              "format": fmt}
    if route is not None:  # absent otherwise: the runs of earlier versions resume as they did
        models["route"] = route
    return {"models": models,
            "pairs": {"measures": list(pairs), "probe": fingerprint(probe) if pairs else None,
                      "layers": list(layers) if layers is not None else None,
                      "max_pairs": max_pairs, "seed": seed if pairs else None,
                      "stitch_options": repr(sorted((stitch_options or {}).items())) if "stitching" in pairs else None}}


def _stored_options(out: pathlib.Path) -> dict:
    """The options.json of a results folder ({} when there is none)."""
    path = out / "options.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ZooError(f"{path} is unreadable ({error}): use a new results folder") from error


def _reconcile_options(out: pathlib.Path, options: dict):
    """Refuse to resume a run with options that change its numbers; a run
    that had no pair measures may be resumed with some (the pairs are computed)."""
    path = out / "options.json"
    if path.exists():
        stored = _stored_options(out)
        for phase in ("models", "pairs"):
            if stored.get(phase) == options[phase] or (phase == "pairs" and not stored.get("pairs", {}).get("measures")):
                continue
            there = stored.get(phase, {})
            differ = [f"{k}: {there.get(k)!r} there, {options[phase].get(k)!r} now"
                      for k in [*options[phase], *(k for k in there if k not in options[phase])]
                      if there.get(k) != options[phase].get(k)]
            raise ZooError(f"{out} holds a run with other {phase} options ({'; '.join(differ)}): resume with the "
                           "same options, or use a new results folder")
    elif _chunk_folders(out):
        raise ZooError(f"{out} holds result chunks but no options.json: use a new results folder")
    tmp = out / ".options.json.tmp"
    tmp.write_text(json.dumps(options, indent=1))
    os.replace(tmp, path)


class _Lock:
    """<out>/.lock: the writer holds an flock on it, which the OS releases
    when the writer dies however it dies, so a dead run's lock is free with
    no takeover step: the earlier takeover (read the pid, judge it dead,
    unlink, create) was three steps two contenders could interleave, both
    then holding the lock. flock is one atomic call on a local filesystem
    and on NFS (emulated with fcntl locks). The file names the holder's pid
    and host for the refusal message only. Where flock is unavailable the
    pid check is the fallback."""

    def __init__(self, out: pathlib.Path):
        self.path = out / ".lock"
        self.held = False
        self._fd = None

    def acquire(self):
        import socket

        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            return self._acquire_by_pid(me)
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._in_use() from None
            except OSError:  # a filesystem without locks
                empty = os.fstat(fd).st_size == 0
                os.close(fd)
                if empty:  # made by our open just now: the pid check must not read it as a holder's
                    self.path.unlink(missing_ok=True)
                return self._acquire_by_pid(me)
            # the holder may have released (unlinked) the file between our open and flock: lock the file at the path
            try:
                here, mine = os.stat(self.path), os.fstat(fd)
                same = (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
            self._fd, self.held = fd, True
            return
        raise ZooError(f"could not take the lock {self.path}")

    def _in_use(self) -> ZooError:
        holder = {}
        for _ in range(20):  # its holder writes its name just after taking it
            try:
                holder = json.loads(self.path.read_text())
                break
            except (OSError, ValueError):
                time.sleep(0.01)
        return ZooError(f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')} since {holder.get('since')}); wait for it to finish")

    def _acquire_by_pid(self, me: dict):
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                if holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                    self.path.unlink(missing_ok=True)  # stale: its writer is gone
                    continue
                if not holder:  # being written by its holder right now
                    time.sleep(0.05)
                    continue
                raise ZooError(f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
                               f"{holder.get('host')} since {holder.get('since')}); wait for it to finish, or remove "
                               f"{self.path} if that run is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise ZooError(f"could not take the lock {self.path}")

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)  # while still locked: a waiter that opened it retries on the new file
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self.held = False


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def check_out(out) -> pathlib.Path:
    """The results folder, created.

    Raises ZooError if out is an empty name, an existing file, or not writable.

    Args:
        out: the folder's path (str or path-like).

    Returns:
        The folder as a pathlib.Path.
    """
    if not isinstance(out, (str, os.PathLike)) or str(out).strip() == "":
        raise ZooError(f"out must name a results folder, got {out!r}")
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise ZooError(f"out {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test."):
            pass
    except OSError as error:
        raise ZooError(f"out {path} is not a writable folder ({error.strerror or error})") from None
    return path


def check_metadata(metadata) -> pathlib.Path | None:
    """The metadata table's path, checked readable with a model column (CSV or Parquet).

    Raises ZooError for a missing or unreadable file or one without a 'model' column.

    Args:
        metadata: the table's path (str or path-like), or None.

    Returns:
        The path as a pathlib.Path, or None when metadata is None.
    """
    if metadata is None:
        return None
    path = pathlib.Path(metadata)
    if not path.is_file():
        raise ZooError(f"no such metadata file: {path}")
    try:
        columns = pd.read_parquet(path).columns if path.suffix == ".parquet" else \
            pd.read_csv(path, nrows=5, dtype=str, keep_default_na=False).columns
    except Exception as error:  # a corrupt table raises many kinds of errors
        raise ZooError(f"unreadable metadata file {path} ({type(error).__name__}: {str(error)[:120]})") from None
    if "model" not in columns:
        raise ZooError(f"the metadata file {path} needs a 'model' column naming the members, it has {list(columns)}")
    return path
