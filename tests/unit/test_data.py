"""File readers: every supported format, and errors that point at the line."""

from __future__ import annotations

import json

import pytest

from taskfit import TaskfitError
from taskfit.data import read_records

ROWS = [
    {"id": "a", "text": "first, with a comma", "label": "yes"},
    {"id": "b", "text": 'second "quoted"', "label": "no"},
    {"id": "c", "text": "third", "label": "yes"},
]


def error_of(path) -> str:
    with pytest.raises(TaskfitError) as info:
        read_records(path)
    return str(info.value)


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + json.dumps(ROWS[2]), encoding="utf-8")
    records = read_records(path)
    assert [row for _, row in records] == ROWS
    # blank lines are skipped but still counted, so locations are the real line numbers
    assert [loc for loc, _ in records] == ["d.jsonl:1", "d.jsonl:3", "d.jsonl:4"]


def test_jsonl_keeps_types(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"choices": ["x", "y"], "answer": 1, "ok": True}) + "\n", encoding="utf-8")
    [(_, row)] = read_records(path)
    assert row == {"choices": ["x", "y"], "answer": 1, "ok": True}


def test_mc_asset(project):
    records = read_records(project / "mc_small.jsonl")
    assert len(records) == 8
    assert records[0][1]["choices"] == ["sad", "excited", "proud"]
    assert records[6][1]["answer"] == 2


@pytest.mark.parametrize("wrapped", [False, True])
def test_json(tmp_path, wrapped):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": ROWS} if wrapped else ROWS), encoding="utf-8")
    records = read_records(path)
    assert [row for _, row in records] == ROWS
    assert records[0][0].startswith("d.json:")


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        'id,text,label\na,"first, with a comma",yes\nb,"second ""quoted""",no\nc,third,yes\n', encoding="utf-8"
    )
    records = read_records(path)
    assert [row for _, row in records] == ROWS
    assert [loc for loc, _ in records] == ["d.csv:2", "d.csv:3", "d.csv:4"]


def test_tsv(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text(
        'id\ttext\tlabel\na\tfirst, with a comma\tyes\nb\t"second ""quoted"""\tno\nc\tthird\tyes\n', encoding="utf-8"
    )
    assert [row for _, row in read_records(path)] == ROWS


def test_cls_asset(project):
    records = read_records(project / "cls_small.csv")
    assert len(records) == 8
    assert records[3][1] == {
        "id": "c4",
        "text": "Great fit, comfortable fabric, and fast shipping. I'm very happy.",
        "label": "positive",
    }


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [
        {"id": "p1", "question": "q?", "choices": ["a", "b"], "answer": 1},
        {"id": "p2", "question": "r?", "choices": ["c", "d"], "answer": 0},
    ]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records = read_records(path)
    assert [row for _, row in records] == rows
    assert len({loc for loc, _ in records}) == 2


def test_uppercase_suffix_is_accepted(tmp_path):
    path = tmp_path / "D.JSONL"
    path.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    assert read_records(path)[0][1] == ROWS[0]


def test_malformed_jsonl_line_reports_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + '\n{"id": "c", oops}\n', encoding="utf-8")
    message = error_of(path)
    assert f"{path}, line 3" in message
    assert "not valid JSON" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n", encoding="utf-8")
    message = error_of(path)
    assert "line 2" in message
    assert "list" in message


def test_malformed_json_reports_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"id": "a"},\n {"id": }\n]\n', encoding="utf-8")
    assert "line 3" in error_of(path)


def test_json_that_is_not_a_list_of_objects(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": ROWS}), encoding="utf-8")
    assert "expected a JSON list of objects" in error_of(path)


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.csv", "empty.tsv", "empty.json"])
def test_empty_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("[]" if name.endswith(".json") else "", encoding="utf-8")
    message = error_of(path)
    assert "no examples" in message
    assert name in message


def test_csv_with_header_only_is_empty(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,text,label\n", encoding="utf-8")
    assert "no examples" in error_of(path)


def test_jsonl_with_only_blank_lines_is_empty(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n  \n\n", encoding="utf-8")
    assert "no examples" in error_of(path)


@pytest.mark.parametrize("name", ["d.txt", "d.xlsx", "d"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("id,text\n1,x\n", encoding="utf-8")
    message = error_of(path)
    assert "unsupported file type" in message
    assert ".jsonl" in message and ".parquet" in message


def test_missing_file(tmp_path):
    message = error_of(tmp_path / "absent.jsonl")
    assert "absent.jsonl" in message
    assert "not found" in message
    (tmp_path / "folder.jsonl").mkdir()
    assert "a folder, not a data file" in error_of(tmp_path / "folder.jsonl")


def test_csv_header_naming_a_column_twice(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,text,text,label\na,x,y,yes\n", encoding="utf-8")
    assert "line 1: the header names column 'text' more than once" in error_of(path)


@pytest.mark.parametrize(("row", "word"), [("b,x,no,extra", "more"), ("b,x", "fewer")])
def test_csv_row_with_wrong_number_of_columns(tmp_path, row, word):
    path = tmp_path / "d.csv"
    path.write_text(f"id,text,label\na,y,yes\n{row}\nc,z,yes\n", encoding="utf-8")
    message = error_of(path)
    assert f"{path}, line 3" in message
    assert f"{word} columns than the header (3)" in message


def test_damaged_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    assert "cannot read this parquet file" in error_of(path)


def test_csv_with_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a BOM; the first column must keep its plain name."""
    path = tmp_path / "d.csv"
    path.write_bytes("id,text,label\na,x,yes\nb,y,no\n".encode("utf-8-sig"))
    records = read_records(path)
    assert list(records[0][1]) == ["id", "text", "label"]
    assert records[0][1]["id"] == "a"


def test_file_not_in_utf8_is_a_taskfit_error(tmp_path):
    """A Latin-1 CSV (common from spreadsheets) must give a TaskfitError naming the file, not a crash."""
    path = tmp_path / "d.csv"
    path.write_bytes("id,text,label\na,caf\xe9 au lait,yes\nb,ok,no\n".encode("latin-1"))
    message = error_of(path)
    assert "d.csv" in message


# --------------------------------------------------------------------------- JSONL read lazily


def test_jsonl_is_read_from_disk_on_each_pass(tmp_path):
    """Only offsets are kept: every pass, index and slice reads the same rows again."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    records = read_records(path)
    assert not isinstance(records, list)
    assert list(records) == list(records) == [(f"d.jsonl:{i}", r) for i, r in enumerate(ROWS, 1)]
    assert records[1] == ("d.jsonl:2", ROWS[1]) and records[-1] == ("d.jsonl:3", ROWS[2])
    assert list(records[1:]) == [("d.jsonl:2", ROWS[1]), ("d.jsonl:3", ROWS[2])]
    assert len(records[:2]) == 2
    with pytest.raises(IndexError):
        records[3]


def test_jsonl_with_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(("\r\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\r\n").encode("utf-8-sig"))
    assert [row for _, row in read_records(path)] == ROWS


def test_jsonl_line_not_in_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(ROWS[0]).encode() + b'\n{"id": "b", "text": "caf\xe9"}\n')
    message = error_of(path)
    assert "d.jsonl, line 2" in message and "UTF-8" in message


def test_jsonl_changed_during_a_run_is_an_error_not_other_data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    records = read_records(path)
    path.write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    with pytest.raises(TaskfitError, match="changed while the run was using it"):
        list(records)
