"""Submission CSV: exact header, row count, values, row-major order, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from marsseg.errors import InputError
from marsseg.submission import (
    SubmissionWriter,
    format_rows,
    header,
    read_submission,
    validate_submission,
)


def write_submission(path, ids, masks):
    """A whole submission at once, in id order, through the streaming writer."""
    order = np.argsort(np.asarray(ids), kind="stable")
    with SubmissionWriter(path, expected_rows=len(ids)) as w:
        w.write(np.asarray(ids)[order], np.asarray(masks)[order])
    return w.path


def test_known_mask_exact_bytes(tmp_path):
    # mask[r, c] = (r + 2c) % 5 -> row-major flattening is checkable by hand
    r, c = np.mgrid[0:64, 0:128]
    m = ((r + 2 * c) % 5).astype(np.uint8)
    masks = np.stack([m, 4 - m])
    path = write_submission(tmp_path / "sub.csv", np.array([7, 3]), masks)
    lines = path.read_bytes().split(b"\n")
    assert lines[0] == b"id," + b",".join(str(i).encode() for i in range(8192))
    assert lines[-1] == b""  # trailing newline, nothing after it
    assert len(lines) == 4  # header + 2 rows + the empty piece after the final newline
    # rows in id order: id 3 (= 4 - m) first
    first = lines[1].split(b",")
    assert first[0] == b"3" and len(first) == 8193
    vals = np.array([int(v) for v in first[1:]]).reshape(64, 128)
    np.testing.assert_array_equal(vals, 4 - m)
    assert first[1:4] == [b"4", b"2", b"0"]   # (0,0)=0 -> 4, (0,1)=2 -> 2, (0,2)=4 -> 0
    assert first[1 + 128] == b"3"              # (1,0) = 1 -> 3: second image row follows the first
    second = lines[2].split(b",")
    assert second[0] == b"7"
    np.testing.assert_array_equal(np.array(second[1:], dtype=int).reshape(64, 128), m)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub.csv"]


def test_roundtrip_and_mixed_id_widths(tmp_path):
    rng = np.random.default_rng(0)
    ids = np.array([0, 5, 9, 10, 99, 100, 12345])
    masks = rng.integers(0, 5, (len(ids), 64, 128), dtype=np.uint8)
    write_submission(tmp_path / "s.csv", ids, masks)
    got_ids, got = read_submission(tmp_path / "s.csv")
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got, masks)
    assert validate_submission(tmp_path / "s.csv", expected_rows=7) == 7


def test_format_rows_matches_python_formatting():
    rng = np.random.default_rng(1)
    masks = rng.integers(0, 5, (3, 4, 6)).astype(np.int64)
    ids = np.array([1, 22, 333])
    want = "".join(f"{i}," + ",".join(map(str, m.ravel())) + "\n" for i, m in zip(ids, masks, strict=True))
    assert format_rows(ids, masks) == want.encode()
    assert header(3) == b"id,0,1,2\n"


def test_streaming_writer_is_atomic_on_error(tmp_path):
    out = tmp_path / "s.csv"
    m = np.zeros((2, 64, 128), np.uint8)
    with pytest.raises(KeyboardInterrupt):
        with SubmissionWriter(out) as w:
            w.write(np.array([0, 1]), m)
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_out_of_order_and_bad_values(tmp_path):
    m = np.zeros((2, 64, 128), np.uint8)
    with pytest.raises(ValueError, match="increasing"):
        with SubmissionWriter(tmp_path / "s.csv") as w:
            w.write(np.array([3, 4]), m)
            w.write(np.array([4, 5]), m)
    with pytest.raises(ValueError, match="0..4"):
        write_submission(tmp_path / "s.csv", np.array([0, 1]), m + 5)
    assert list(tmp_path.iterdir()) == []


def test_expected_rows_checked(tmp_path):
    with pytest.raises(InputError, match="expected 3"):
        with SubmissionWriter(tmp_path / "s.csv", expected_rows=3) as w:
            w.write(np.array([0, 1]), np.zeros((2, 64, 128), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_is_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        SubmissionWriter(tmp_path / "nope" / "s.csv")


@pytest.mark.parametrize("mutate, msg", [
    (lambda b: b.replace(b"id,0,1", b"id,1,0", 1), "header"),
    (lambda b: b[:-2] + b"7\n", "label"),
    (lambda b: b[:-1], "values"),
])
def test_validator_catches_corruption(tmp_path, mutate, msg):
    p = tmp_path / "s.csv"
    write_submission(p, np.array([0, 1]), np.ones((2, 64, 128), np.uint8))
    p.write_bytes(mutate(p.read_bytes()))
    with pytest.raises(InputError, match=msg):
        validate_submission(p)
