"""Reading prompt tables: formats, row identity, and damage confined to its row."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import InputError
from pipeline.spec.schema import INPUT_ROW, INPUT_SOURCE, READ_ERROR
from pipeline.storage.tables import read_file


def read(data: bytes, fmt: str, chunk_rows=4096) -> pa.Table:
    return pa.concat_tables(list(read_file(io.BytesIO(data), fmt, "src", chunk_rows=chunk_rows)))


def test_partiprompts_tsv_all_rows_as_text_with_the_quote_kept(prompts):
    table = read((prompts / "partiprompts" / "PartiPrompts.tsv").read_bytes(), "tsv")
    assert table.num_rows == 1632
    prompts = table.column("Prompt").to_pylist()
    assert any(p.startswith('"G I G G L E"') for p in prompts)
    assert all(isinstance(p, str) for p in prompts)  # "42"-like prompts stay text
    assert table.column(INPUT_ROW).to_pylist() == list(range(1632))


def test_row_positions_continue_across_chunks():
    data = b"prompt\n" + b"".join(f"p{i}\n".encode() for i in range(10))
    chunks = list(read_file(io.BytesIO(data), "csv", "f.csv", chunk_rows=3))
    assert [c.num_rows for c in chunks] == [3, 3, 3, 1]
    assert pa.concat_tables(chunks).column(INPUT_ROW).to_pylist() == list(range(10))
    assert set(pa.concat_tables(chunks).column(INPUT_SOURCE).to_pylist()) == {"f.csv"}


def test_csv_quotes_and_invalid_utf8_confined_to_row():
    data = b'prompt,seed\n"a, quoted, prompt",1\nbad \xff\xfe bytes,2\nfine,3\n'
    table = read(data, "csv")
    assert table.column("prompt").to_pylist()[0] == "a, quoted, prompt"
    assert table.column(READ_ERROR).to_pylist() == [None, "column 'prompt' is not valid UTF-8 text", None]


def test_jsonl_mixed_types_and_broken_lines():
    lines = [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": "abc"}, "not json {", {"prompt": "c", "meta": {"k": [1]}}]
    data = "\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines).encode()
    table = read(data, "jsonl")
    assert table.num_rows == 4
    assert table.column("seed").to_pylist()[:2] == ["1", "abc"]  # mixed -> text; validation decides per row
    assert "line 3 is not valid JSON" in table.column(READ_ERROR).to_pylist()[2]


def test_geneval_jsonl_keeps_nested_metadata(prompts):
    table = read((prompts / "geneval" / "evaluation_metadata.jsonl").read_bytes(), "jsonl")
    assert table.num_rows == 553
    assert pa.types.is_list(table.schema.field("exclude").type)  # one shape: stays nested
    # `include` mixes shapes (`position: ["left of", 0]`): kept as JSON text, nothing lost.
    originals = [json.loads(line)["include"] for line in (prompts / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()]
    assert [json.loads(x) for x in table.column("include").to_pylist()] == originals


def test_json_array_and_wrong_shapes(prompts):
    table = read((prompts / "imagereward-diffusiondb" / "refl_data.json").read_bytes(), "json")
    assert table.num_rows == 10000 and "text" in table.column_names
    with pytest.raises(InputError, match="array of objects"):
        read(b'{"prompt": "a"}', "json")
    with pytest.raises(InputError, match="not a readable JSON file"):
        read(b"[{", "json")


def test_parquet_and_corrupt_parquet():
    buffer = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["a", "b"], "seed": [1, 2]}), buffer)
    table = read(buffer.getvalue(), "parquet")
    assert table.column("seed").to_pylist() == [1, 2]
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read(b"PAR1 this is not parquet", "parquet")


def test_text_formats_stay_text_with_a_byte_order_mark():
    # Excel's "CSV UTF-8" starts with a BOM; the first column must not be type-guessed.
    csv_table = read(b"\xef\xbb\xbfid,prompt,guidance_scale\n007,a cat,2.50\n7,a dog,1\n", "csv")
    assert csv_table.column("id").to_pylist() == ["007", "7"]
    assert csv_table.column("guidance_scale").to_pylist() == ["2.50", "1"]
    tsv_table = read(b"\xef\xbb\xbfprompt\tid\n1e5\t007\n", "tsv")
    assert tsv_table.column("prompt").to_pylist() == ["1e5"]
    assert tsv_table.column("id").to_pylist() == ["007"]


def test_tsv_written_by_pandas_and_csv_reads_back_as_written(tmp_path):
    import csv

    import pandas as pd

    prompts = ['a "red" car', "a tab\there", "two\nlines", '"G I G G L E" painted on a wall', "plain", '"quoted whole"']
    written = pd.DataFrame({"prompt": prompts, "n": range(len(prompts))}).to_csv(sep="\t", index=False).encode()
    assert b'"a ""red"" car"' in written  # pandas quotes a field holding a quote
    table = read(written, "tsv")
    assert table.column("prompt").to_pylist() == prompts
    assert table.column("n").to_pylist() == [str(i) for i in range(len(prompts))]
    with open(tmp_path / "w.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator="\r\n").writerows([["prompt"], *([p] for p in prompts)])
    assert read((tmp_path / "w.tsv").read_bytes(), "tsv").column("prompt").to_pylist() == prompts


def test_tsv_quotes_that_do_not_enclose_a_whole_field_are_text():
    data = b'prompt\tnote\n"G I G G L E" painted\tDescription of "Dogs Playing Poker"\nsay "hi"\t"x\n'
    table = read(data, "tsv")
    assert table.column("prompt").to_pylist() == ['"G I G G L E" painted', 'say "hi"']
    assert table.column("note").to_pylist() == ['Description of "Dogs Playing Poker"', '"x']


def test_pandas_index_column_is_not_data():
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a", "b"]}, index=[5, 9])
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    assert "__index_level_0__" in pq.read_schema(io.BytesIO(buffer.getvalue())).names
    table = read(buffer.getvalue(), "parquet")
    assert table.column_names == ["prompt", INPUT_SOURCE, INPUT_ROW]
    named = io.BytesIO()
    frame.rename_axis("key").to_parquet(named)  # a named index is the user's column
    assert read(named.getvalue(), "parquet").column("key").to_pylist() == [5, 9]


def test_quoted_tsv_keeps_invalid_utf8_to_its_row():
    data = b'prompt\tn\n"a ""red"" car"\t1\nbad \xff bytes\t2\n'
    table = read(data, "tsv")
    assert table.column("prompt").to_pylist()[0] == 'a "red" car'
    assert table.column(READ_ERROR).to_pylist() == [None, "column 'prompt' is not valid UTF-8 text"]


def _prompts(n: int) -> list[str]:
    # Quoted fields with a newline or a doubled quote, and for TSV a quote that encloses
    # nothing (read as text from there on), spread over many blocks.
    special = ['two\nlines, "quoted"', 'a "red" car', "plain, with a comma"]
    return [special[i % 3] if i % 997 == 5 else f"prompt number {i} " + "x" * (i % 50) for i in range(n)]


def _written(fmt: str, prompts: list[str]) -> bytes:
    import csv

    out = io.StringIO(newline="")
    if fmt == "jsonl":
        return "".join(json.dumps({"prompt": p, "n": i}) + "\n" for i, p in enumerate(prompts)).encode()
    writer = csv.writer(out, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
    writer.writerow(["prompt", "n"])
    for i, p in enumerate(prompts):
        writer.writerow([p, i])
    if fmt == "tsv":  # a field that starts with a quote it does not close, near the end
        out.write('"G I G G L E" painted\t-1\n')
    return out.getvalue().encode()


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_a_big_text_file_is_read_a_block_at_a_time(fmt, monkeypatch):
    from pipeline.storage import text_blocks

    monkeypatch.setattr(text_blocks, "TEXT_BLOCK_BYTES", 8 << 10)
    prompts = _prompts(30_000)
    data = _written(fmt, prompts)
    assert len(data) > 150 * text_blocks.TEXT_BLOCK_BYTES
    stream = io.BytesIO(data)
    chunks = read_file(stream, fmt, "big", chunk_rows=1000)
    first = next(chunks)
    # The first rows come after some blocks (pyarrow's CSV reader reads 32 ahead), not the
    # whole file: a read task's memory and its first block do not grow with the file.
    assert 0 < first.num_rows <= 1000 and stream.tell() <= 40 * text_blocks.TEXT_BLOCK_BYTES
    table = pa.concat_tables([first, *chunks], promote_options="permissive")
    expected = prompts + (['"G I G G L E" painted'] if fmt == "tsv" else [])
    assert table.column("prompt").to_pylist() == expected
    assert [str(n) for n in table.column("n").to_pylist()] == [str(i) for i in range(len(prompts))] + (["-1"] if fmt == "tsv" else [])
    assert table.column(INPUT_ROW).to_pylist() == list(range(len(expected)))


def multiline_prompts(n: int) -> list[str]:
    """Prompts as LLMs write them: many lines, ended by LF, CRLF or CR, with commas and
    quotes, so a block cut at a line end lands inside a quoted field almost always."""
    ends = ["\n", "\r\n", "\r", "\n\n"]
    return [
        "".join(f'line {k} of prompt {i}, a "quoted" word{ends[(i + k) % 4]}' for k in range(i % 90)) + f"prompt {i}"
        for i in range(n)
    ]


def csv_bytes(rows: list[list[str]], lineterminator: str = "\r\n") -> bytes:
    """A CSV as Python's csv.writer writes it (CRLF row ends by default)."""
    import csv

    out = io.StringIO(newline="")
    csv.writer(out, lineterminator=lineterminator).writerows(rows)
    return out.getvalue().encode()


@pytest.mark.parametrize("block_bytes", [1 << 20, 8 << 10])
def test_csv_with_quoted_newlines_reads_back_as_written_wherever_a_block_ends(block_bytes, monkeypatch):
    from pipeline.storage import text_blocks

    monkeypatch.setattr(text_blocks, "TEXT_BLOCK_BYTES", block_bytes)
    prompts = multiline_prompts(1200)
    data = csv_bytes([["prompt", "n"], *([p, str(i)] for i, p in enumerate(prompts))])
    assert len(data) > 2 << 20  # more than one of the reader's 1 MB blocks
    table = read(data, "csv")
    assert table.column("prompt").to_pylist() == prompts
    assert table.column("n").to_pylist() == [str(i) for i in range(len(prompts))]


def test_a_file_that_is_not_line_based_text_is_one_input_error():
    with pytest.raises(InputError, match=r"lines end in CR alone \(classic Mac OS"):
        read(b"prompt,n\ra cat,1\ra dog,2\r", "csv")
    with pytest.raises(InputError, match="not a text file: it holds NUL bytes"):
        read(bytes(range(256)) * 40, "csv")
    with pytest.raises(InputError, match="not a text file"):
        read(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "tsv")


def test_a_json_id_is_text_decided_by_its_own_value_not_its_neighbours(tmp_path):
    from pipeline.spec.cells import id_text
    from pipeline.spec.config import InputConfig
    from pipeline.storage.units import plan_units, read_unit

    def ids(name: str, data: bytes) -> list:
        (tmp_path / name).write_bytes(data)
        inp = InputConfig(url=str(tmp_path / name), id_column="id")
        table = pa.concat_tables([t for unit in plan_units(inp).units for t in read_unit(inp, unit)], promote_options="permissive")
        return [id_text(v) if v is not None else None for v in table.column("id").to_pylist()]

    floats = b'{"id": 1.0, "prompt": "a"}\n{"id": 2.0, "prompt": "b"}\n'
    grown = floats + b'{"id": "x", "prompt": "c"}\n{"id": 7, "prompt": "d"}\n{"id": "1.0", "prompt": "e"}\n'
    assert ids("floats.jsonl", floats) == ["1", "2"]
    assert ids("grown.jsonl", grown) == ["1", "2", "x", "7", "1.0"]  # a string stays the string it is
    array = json.dumps([{"id": 1.0, "prompt": "a"}, {"id": "x", "prompt": "b"}, {"id": 2.0**60, "prompt": "c"}]).encode()
    table = pa.concat_tables(list(read_file(io.BytesIO(array), "json", "f.json", id_column="id")))
    assert table.column("id").to_pylist()[:2] == ["1", "x"]
    assert "at or above 2**53" in table.column(READ_ERROR).to_pylist()[2]  # refused, as a float id in Parquet is


def test_a_lone_surrogate_is_a_read_error_row_not_a_crash():
    lines = [b'{"prompt": "x\\ud800y"}', b'{"prompt": "a smiling face \\ud83d\\ude00"}', b'{"prompt": "ok", "note": "\\udfff"}']
    table = read(b"\n".join(lines) + b"\n", "jsonl")
    errors = table.column(READ_ERROR).to_pylist()
    assert errors[0] == "line 1 holds a lone surrogate U+D800, which is not text (no encoder can write it)"
    assert errors[1] is None and table.column("prompt").to_pylist()[1] == "a smiling face \U0001f600"
    assert "U+DFFF" in errors[2]
    array = read(b'[{"prompt": "x\\ud800y"}, {"prompt": "fine"}]', "json")
    assert array.column(READ_ERROR).to_pylist()[0].startswith("object 0 holds a lone surrogate")
    pq.write_table(table, io.BytesIO())  # every cell encodable: the row can be written
