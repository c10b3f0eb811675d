import pytest

from snapkv.core.files import atomic_path, atomic_write_text


def test_a_file_lands_complete_with_readable_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "deep" / "results.json", "{}\n")
    assert path.read_text() == "{}\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(path) as partial:
        partial.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_the_temporary_keeps_the_suffix_and_is_unique(tmp_path):
    with atomic_path(tmp_path / "figure.png") as first, atomic_path(tmp_path / "figure.png") as second:
        assert first.suffix == second.suffix == ".png"
        assert first != second
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert (tmp_path / "figure.png").read_bytes() == b"1"  # the last writer to finish wins


def test_a_folder_replaces_an_existing_one_whole(tmp_path):
    path = tmp_path / "trace"
    path.mkdir()
    (path / "old.txt").write_text("old")
    with atomic_path(path, folder=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in path.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["trace"]
    assert path.stat().st_mode & 0o777 == 0o755


def test_without_replace_a_folder_written_first_wins(tmp_path):
    path = tmp_path / "cache"
    with atomic_path(path, folder=True, replace=False) as staging:
        (staging / "mine.txt").write_text("mine")
        path.mkdir()
        (path / "theirs.txt").write_text("theirs")
    assert [p.name for p in path.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
