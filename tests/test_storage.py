"""Run storage (`catrs.storage`): the same calls on a local disk and in an S3-compatible object store, and no
reader ever sees part of a write."""

from __future__ import annotations

import pytest

from catrs.errors import UserError
from catrs.storage import stored


class Interrupted(Exception):
    pass


def interrupted_write(stream) -> None:
    stream.write(b"half of the new")
    raise Interrupted


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path):
    if request.param == "local":
        return stored(tmp_path / "runs")
    return stored(request.getfixturevalue("object_store").uri(f"storage-{tmp_path.name}"))


def test_a_write_cut_short_leaves_the_old_content_and_no_visible_leftover(folder):
    target = folder.child("table.bin").write_bytes(b"old content")
    with pytest.raises(Interrupted):
        target.write(interrupted_write)
    assert target.read() == b"old content"
    assert [f.name for f in folder.files()] == ["table.bin"]  # the temporary copy is gone (and hidden anyway)
    with pytest.raises(Interrupted):
        folder.child("new.bin").write(interrupted_write)
    assert not folder.child("new.bin").exists()


def test_files_upload_download_and_delete_round_trip(folder, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(range(256)) * 1000)
    copy = folder.child("sub").child("copy.bin").upload(source)
    assert copy.exists() and not folder.child("absent.bin").exists()
    assert copy.download(tmp_path / "back.bin").read_bytes() == source.read_bytes()
    assert [f.name for f in folder.child("sub").files()] == ["copy.bin"]
    copy.delete()
    assert folder.child("sub").files() == []
    with pytest.raises(UserError, match="not found in storage"):
        copy.read()


def test_a_uri_of_an_unknown_scheme_is_a_clear_error():
    with pytest.raises(UserError, match="cannot open storage nosuch://bucket/x"):
        stored("nosuch://bucket/x").exists()
