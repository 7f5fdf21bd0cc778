"""Which of an output's commit records a request id conflict retires, decided on full ids.

Records are taken in order (:mod:`pipeline.storage.commit_protocol`); one holding a request
id an earlier accepted record holds is superseded whole (a write Ray retried with another
block composition). Records hold their ids' whole 16-byte keys; a repeated 8-byte prefix
only points at the records involved, which are then compared on whole keys, so two ids
that share a prefix cost a comparison, never a record. Pure: no Ray.
"""

from __future__ import annotations

import hashlib

import numpy as np

from pipeline.storage.record_format import PartEntry, Record
from pipeline.storage.skip_filter import gathered, key_prefixes


def superseded(candidates: list[Record]) -> set[int]:
    """Indices of candidates that hold a request id an earlier kept candidate holds.

    One in-place sort of the 8-byte prefixes of all final ids (and one of the retry ids',
    salted by run: those repeat harmlessly across runs, each run tried them once) finds
    whether any id may repeat at all, at 8 bytes an id beside the records (the resume's
    peak); only the records holding a repeated prefix are then resolved one by one, in
    order, on their whole keys.
    """
    seen: set[str] = set()
    finals: list[tuple[int, PartEntry]] = []
    retries: list[tuple[int, PartEntry]] = []
    for i, r in enumerate(candidates):
        for p in r.parts:
            if p.path not in seen:
                seen.add(p.path)
                finals.append((i, p))
                if len(p.retry):
                    retries.append((i, p))
    repeats = {
        "final": _repeated(gathered((key_prefixes(p.final) for _, p in finals), sum(len(p.final) for _, p in finals), np.dtype(np.uint64))),
        "retry": _repeated(gathered((_salted(p.retry, candidates[i].run_id) for i, p in retries), sum(len(p.retry) for _, p in retries), np.dtype(np.uint64))),
    }
    involved = {i for i, p in finals if len(repeats["final"]) and np.isin(key_prefixes(p.final), repeats["final"]).any()}
    involved |= {i for i, p in retries if len(repeats["retry"]) and np.isin(_salted(p.retry, candidates[i].run_id), repeats["retry"]).any()}
    losers: set[int] = set()
    held: set[tuple] = set()
    for i in sorted(involved):
        mine = exact_keys(candidates[i], repeats)
        if mine & held:
            losers.add(i)
        else:
            held |= mine
    return losers


def _repeated(prefixes: np.ndarray) -> np.ndarray:
    prefixes.sort()  # in place: the array is this call's own
    return prefixes[1:][prefixes[1:] == prefixes[:-1]]


def run_salt(run_id: str) -> np.uint64:
    return np.uint64(int(hashlib.blake2b(run_id.encode(), digest_size=8).hexdigest(), 16))


def _salted(keys: np.ndarray, run_id: str) -> np.ndarray:
    return key_prefixes(keys) ^ run_salt(run_id)


def exact_keys(record: Record, repeats: dict[str, np.ndarray]) -> set[tuple]:
    """The whole keys of ``record``'s ids whose prefix repeats in another record: finals
    as ``(key,)``, retries as ``(run, key)`` (numpy's ``S16`` scalars: equal only when all
    16 bytes are)."""
    keys: set[tuple] = set()
    for p in record.parts:
        if len(repeats["final"]):
            keys |= {(k,) for k in p.final[np.isin(key_prefixes(p.final), repeats["final"])]}
        if len(repeats["retry"]) and len(p.retry):
            keys |= {(record.run_id, k) for k in p.retry[np.isin(_salted(p.retry, record.run_id), repeats["retry"])]}
    return keys
