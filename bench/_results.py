"""What the benchmarks' result files share: the run's metadata (device name, package versions,
date, run id, command), one row run into a record (ok; skipped with the reason; failed with the
error), the records written to <stem>.json and <stem>.md after every row, and the merge of partial
result files (one device call is capped at 10 minutes, so a sweep runs in pieces).

`bench_prefill.py` and `bench_decode.py` use all of it; `bench_attention.py` and
`bench_distill.py` the device name, the versions and the JSON writer. Each script puts bench/ on
sys.path, so this is imported as `_results`. Every file is written through
`seerlib.io.atomic_write_text`.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.metadata
import json
import os
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from seerlib.io import atomic_write_text

PACKAGES = ("triton", "transformers")  # besides torch, what a timing depends on


class Skip(Exception):
    """A row that does not apply here (recorded as skipped with the reason)."""


class OutOfTime(Exception):
    """--budget-s is spent: start no more rows."""


# ---------------------------------------------------------------------------------------------
# the run's metadata


def resolve_device(name: str | torch.device) -> torch.device:
    """torch.device(name); a bare "cuda" gets the current device's index."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def device_name(device: str | torch.device) -> str:
    """The GPU as result file names spell it ("H200", "H100-80GB-HBM3"); else the device type."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "-")
    return device.type


def versions(packages: Iterable[str] = PACKAGES) -> dict:
    """{"torch": its version, package: its installed version or "absent", ...}."""
    out = {"torch": torch.__version__}
    for pkg in packages:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def run_meta(device: torch.device, command: str) -> dict:
    """The fields every record of one run starts with: gpu, device (its type), date, command,
    run_id (start time and pid: ratios pair rows of one run only) and the versions."""
    now = datetime.datetime.now()
    return {"gpu": device_name(device), "device": device.type, "date": now.date().isoformat(),
            "command": command, "run_id": f"{now.isoformat(timespec='seconds')}-{os.getpid()}",
            **versions()}


# ---------------------------------------------------------------------------------------------
# result files


def write_json(path, obj) -> None:
    """`obj` as JSON (indent 1, the committed files' layout), written atomically."""
    atomic_write_text(path, json.dumps(obj, indent=1))


def read_records(path) -> list[dict]:
    """The records of a result file (a JSON list of objects); anything else is refused."""
    try:
        with open(path) as f:
            records = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected a benchmark result file "
                         "(a JSON list of records)") from e
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path} holds a JSON {type(records).__name__}, not a list of records: "
                         "not a result file of this benchmark")
    return records


def _no_ratios(records: list[dict]) -> None:
    """ResultFiles' default: no fields derived across records."""


@dataclass(frozen=True)
class ResultFiles:
    """One benchmark's result files: <out>/<prefix>-<gpu>-<date><tag>.json (a list of records)
    and .md (`markdown(records)`), with `add_ratios(records)` run over the records (in place)
    before each write, and `key`: the fields that name a record, for merges."""

    prefix: str
    key: tuple[str, ...]
    markdown: Callable[[list[dict]], str]
    add_ratios: Callable[[list[dict]], None] = _no_ratios

    def stem(self, out_dir: str, gpu: str, date: str, tag: str = "") -> str:
        return os.path.join(out_dir, f"{self.prefix}-{gpu}-{date}{tag}")


class Results:
    """Records, written to <stem>.json and <stem>.md after every add (a killed run keeps them)."""

    def __init__(self, stem: str, files: ResultFiles, records=None):
        self.stem, self.files, self.records = stem, files, list(records or [])

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.write()

    def write(self) -> None:
        self.files.add_ratios(self.records)
        write_json(self.stem + ".json", self.records)
        atomic_write_text(self.stem + ".md", self.files.markdown(self.records))


def tuned_cases(records: list[dict], fields: tuple[str, ...]) -> list[tuple]:
    """A tuning script's variant records grouped by case: (case, its records, those that ran)
    for each distinct value of `fields`, in sorted order. The default launch is the first that
    ran (each script times it first), the best the fastest."""
    def case(r):
        return tuple(r[f] for f in fields)

    out = []
    for c in sorted({case(r) for r in records}):
        mine = [r for r in records if case(r) == c]
        out.append((c, mine, [r for r in mine if r["status"] == "ok"]))
    return out


def merge(paths, out_dir: str, files: ResultFiles, tag: str = "") -> str:
    """Combine result files into one pair, named from the first record's gpu and date; returns
    its stem. Of records with the same `files.key` fields the first (in the order of `paths`) is
    kept, so a file given twice adds nothing."""
    records, seen = [], set()
    for p in paths:
        for r in read_records(p):
            key = tuple(r.get(k) for k in files.key)
            if key not in seen:
                seen.add(key)
                records.append(r)
    if not records:
        raise ValueError(f"no records in {paths}")
    os.makedirs(out_dir, exist_ok=True)
    stem = files.stem(out_dir, records[0]["gpu"], records[0]["date"], tag)
    Results(stem, files, records).write()
    return stem


# ---------------------------------------------------------------------------------------------
# rows


def free(device: torch.device) -> None:
    """Give back what the last row left behind (collected tensors; CUDA's cached blocks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def row_runner(res: Results, meta: dict, device: torch.device,
               report: Callable[[dict, float], None], *, t_start: float, budget_s: float = 0.0,
               oom_status: str = "failed", finish: Callable[[dict], None] | None = None):
    """`guarded(base, fn) -> record`: runs one row. `fn()` returns the row's fields; the record
    {**meta, **base, "status", **fields, "row_s"} is completed by `finish(record)` (if given),
    added to `res` (so written) and printed by `report(record, seconds since t_start)`.

    `Skip` gives status "skipped" with the reason; any other exception "failed" (an out-of-memory
    error: `oom_status`) with the error, its traceback printed and the memory freed: a failed row
    is a result, not the end of the run. Once `budget_s` seconds (0: no limit) have passed since
    `t_start`, the next row raises `OutOfTime` before it starts.
    """

    def guarded(base: dict, fn) -> dict:
        if budget_s and time.perf_counter() - t_start > budget_s:
            raise OutOfTime
        t0 = time.perf_counter()
        try:
            fields = {"status": "ok", **fn()}
        except Skip as e:
            fields = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - any failure is a result to record
            status = oom_status if isinstance(e, torch.OutOfMemoryError) else "failed"
            fields = {"status": status, "error": f"{type(e).__name__}: {e}"[:1000]}
            print("".join(traceback.format_exc(limit=-3)), flush=True)
            free(device)
        rec = {**meta, **base, **fields, "row_s": time.perf_counter() - t0}
        if finish is not None:
            finish(rec)
        res.add(rec)
        report(rec, time.perf_counter() - t_start)
        return rec

    return guarded


@contextlib.contextmanager
def stop_when_out_of_time(budget_s: float):
    """Ends the rows quietly on `OutOfTime` (the records so far are written already)."""
    try:
        yield
    except OutOfTime:
        print(f"time budget of {budget_s:.0f} s spent: stopped; results so far kept", flush=True)
