"""No decision rests on a shortened hash: ids whose 8-byte hashes collide (crafted here:
request ids that share their first 16 hex digits, which is what the hash is made of) are
told apart by their full text wherever a record, a row or a warning depends on it."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.spec import schema as S
from pipeline.storage import commit_protocol, filesystem, part_files
from pipeline.storage.skip_filter import id_hashes

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
    assert len(set(id_hashes([twin("a", 1), twin("a", 2)]))) == 1  # the collision is real
    first = part_files.write_block(fs, root, "r000000000001-x", with_ids(stream_block(range(0, 3)), [twin("b", 0), twin("a", 1), twin("c", 2)]))
    later = part_files.write_block(fs, root, "r000000000002-y", with_ids(stream_block(range(3, 5), failed={4}), [twin("a", 2), twin("d", 3)]))
    found = commit_protocol.read_commits(fs, root)
    assert not found.superseded and not found.orphans, (found.superseded, found.orphans)
    assert sorted(r.name for r in found.records) == sorted(first.records + later.records)
    recovery = commit_protocol.repair(fs, root, found)
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
