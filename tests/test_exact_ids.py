"""No decision rests on a shortened hash: ids whose 8-byte prefixes collide (crafted here:
request ids that share their first 16 hex digits, what the skip filter and the record
conflicts used to go by) are told apart by their whole id wherever a record, a skipped
row, an occurrence or a warning depends on it."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.spec import schema as S
from pipeline.storage import commit_protocol, filesystem, part_files, repair
from pipeline.storage.skip_filter import id_keys, key_prefixes

from test_durability import stream_block


def twin(prefix: str, i: int) -> str:
    """Request ids that all share their first 16 hex digits: one 8-byte hash, many ids."""
    return prefix * 16 + f"{i:016x}"


def with_ids(table: pa.Table, ids: list[str]) -> pa.Table:
    return table.set_column(table.schema.get_field_index(S.REQUEST_ID), S.REQUEST_ID, pa.array(ids))


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    if request.param == "local":
        return filesystem.open_url(str(tmp_path / "out"))
    fs, bucket, _ = request.getfixturevalue("s3")
    return fs, f"{bucket}/out"


def test_two_records_whose_ids_share_a_hash_but_not_an_id_are_both_kept(output):
    fs, root = output
    assert len(set(key_prefixes(id_keys([twin("a", 1), twin("a", 2)])))) == 1  # the prefixes collide
    first = part_files.write_block(fs, root, "r000000000001-x", with_ids(stream_block(range(0, 3)), [twin("b", 0), twin("a", 1), twin("c", 2)]))
    later = part_files.write_block(fs, root, "r000000000002-y", with_ids(stream_block(range(3, 5), failed={4}), [twin("a", 2), twin("d", 3)]))
    found = commit_protocol.read_commits(fs, root)
    assert not found.superseded and not found.orphans, (found.superseded, found.orphans)
    assert sorted(r.name for r in found.records) == sorted(first.records + later.records)
    recovery = repair.repair(fs, root, found)
    assert not recovery.removed_parts and not recovery.superseded_records
    # A true repeat (a write retried with another composition) still counts once.
    part_files.write_block(fs, root, "r000000000002-y", with_ids(stream_block(range(5, 7)), [twin("a", 2), twin("e", 9)]))
    again = commit_protocol.read_commits(fs, root)
    assert len(again.superseded) == 1 and sorted(r.name for r in again.records) == sorted(first.records + later.records)


def test_ids_of_32_digits_sharing_their_first_16_are_different_owners(tmp_path):
    """Input ids such as zero-padded numbers of 32 digits look like request ids: read by
    their first 16 digits they were one id, and an image of a removed row went unreported."""
    from pipeline.output.ownership import unowned_images
    from pipeline.spec.load import parse_spec

    kept, removed = f"{1:032d}", f"{2:032d}"
    (tmp_path / "in.csv").write_text(f"key,prompt\n{kept},a kite\n")
    spec = parse_spec({"input": {"url": str(tmp_path / "in.csv"), "id_column": "key"}, "model": {"ref": "tiny"}, "output": {"url": str(tmp_path / "out")}})
    fs, root = filesystem.open_url(spec.output.url)
    block = stream_block(range(0, 2))
    block = block.set_column(block.schema.get_field_index(S.ID), S.ID, pa.array([kept, removed]))
    report = part_files.write_block(fs, root, "r000000000001-x", block)
    part_files.write_manifest(fs, root, "r000000000001-x", {"run_id": "r000000000001-x", "status": "complete", "parts": report.parts})
    assert unowned_images(spec, fs, root).images == 1


def test_two_ids_whose_short_hashes_collide_are_not_taken_for_repeats(monkeypatch):
    """A digest crafted to collide in the 8 bytes that used to decide: the rest of it tells
    the ids apart; a true repeat is still one."""
    from pipeline.spec import duplicate_ids
    from pipeline.spec.duplicate_ids import SeenIds, unit_ids

    real = duplicate_ids.id_hash
    monkeypatch.setattr(duplicate_ids, "id_hash", lambda text: b"collides" + real(text)[8:])
    table = pa.table({"id": ["a", "b", "a"], S.INPUT_SOURCE: ["t.csv"] * 3, S.INPUT_ROW: [0, 1, 2]})
    assert SeenIds().register(*unit_ids([table], "id")) == {"t.csv#2": "t.csv#0"}


def test_a_row_whose_request_id_shares_a_committed_ids_prefix_is_made_not_skipped(output, monkeypatch):
    """Skipping is decided on the whole id: request ids crafted to share their first 8
    bytes (what the skip filter used to hold) with committed ones are not taken for made."""
    import dataclasses

    from pipeline.spec import validate
    from test_validate import row, validator

    real = validate.request_id
    monkeypatch.setattr(validate, "request_id", lambda *a: "ab" * 8 + real(*a)[16:])
    table = pa.Table.from_pylist([row(i, prompt=f"prompt {i}") for i in range(4)])
    made = validator().validate_table(table)
    ids = made.column(S.REQUEST_ID).to_pylist()
    assert len({i[:16] for i in ids}) == 1 and len(set(ids)) == 4  # one prefix, four ids
    fs, root = output
    part_files.write_block(fs, root, "r000000000001-x", with_ids(stream_block(range(0, 2)), ids[:2]))
    skip = commit_protocol.read_commits(fs, root).skip_filter(release=True)
    out, skipped = dataclasses.replace(validator(), skip=skip).validate_table_skipping(table)
    assert skipped.to_pylist() == ids[:2]
    assert out.column(S.REQUEST_ID).to_pylist() == ids[2:]


def test_occurrences_of_contents_whose_digests_share_a_prefix_are_counted_apart():
    from pipeline.spec.occurrences import Occurrences, content_keys

    a, b = "cd" * 8 + "0" * 16, "cd" * 8 + "1" * 16
    counter = Occurrences()
    assert counter.number(content_keys([a, b, a])).tolist() == [0, 0, 1]
    assert counter.present([f"{b}#0", f"{b}#1", f"{a}#1"]) == [True, False, True]


def first_format(record: bytes) -> bytes:
    """A record of the current format written again as the first format wrote it: the
    ids' 8-byte hashes (their keys' first 8 bytes) as little-endian uint64."""
    import hashlib

    import numpy as np

    from pipeline.storage.skip_filter import key_prefixes

    body = record.split(b"\n", 1)[1]
    line, _, keys = body.partition(b"\n")
    old = line + b"\n" + key_prefixes(np.frombuffer(keys, "S16")).astype("<u8").tobytes()
    return b"IGCOMMIT1 " + hashlib.sha256(old).hexdigest().encode() + b"\n" + old


def test_records_of_the_first_format_get_their_keys_from_their_parts_and_are_rewritten(output):
    fs, root = output
    report = part_files.write_block(fs, root, "r000000000001-x", stream_block(range(0, 6), failed={5}, stage=S.STAGE_VALIDATE))
    damaged = part_files.write_block(fs, root, "r000000000001-x", stream_block(range(6, 9)))
    for name in report.records + damaged.records:
        path = filesystem.join(root, name)
        filesystem.atomic_write(fs, path, first_format(filesystem.read_bytes(fs, path)))
    # A part of the second block that no longer reads, at its recorded size: its rows only are lost.
    broken = filesystem.join(root, damaged.parts[0]["path"])
    filesystem.atomic_write(fs, broken, b"x" * len(filesystem.read_bytes(fs, broken)))
    found = commit_protocol.read_commits(fs, root)
    assert [p for p, _ in found.damaged] == [damaged.parts[0]["path"]]
    ids = found.ids()
    assert len(ids) == 6 and all(rid in ids for rid in [stream_block(range(0, 6)).column(S.REQUEST_ID)[i].as_py() for i in range(6)])
    repair.repair(fs, root, found)
    for name in report.records:
        assert filesystem.read_bytes(fs, filesystem.join(root, name)).startswith(b"IGCOMMIT2 ")
    again = commit_protocol.read_commits(fs, root)
    assert not again.outdated and not again.damaged and len(again.ids()) == 6


def test_the_skip_filter_lets_go_of_the_records_ids_as_it_takes_them(output):
    """What keeps the resume's peak at the records' size: each record's keys are dropped
    once copied into the filter."""
    fs, root = output
    for start in (0, 10, 20):
        part_files.write_block(fs, root, f"r00000000000{start // 10 + 1}-x", stream_block(range(start, start + 10)))
    found = commit_protocol.read_commits(fs, root)
    skip = found.skip_filter(interrupted=["r000000000002-x"], release=True)
    assert len(skip) == 30 and all(len(p.final) == 0 for r in found.records for p in r.parts)
    assert skip.adopted(stream_block(range(5, 25)).column(S.REQUEST_ID)) == 10
