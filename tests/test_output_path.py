"""Output paths are checked before any work: existing results are never silently replaced."""
import os

import pytest

from accountant.output_path import OutputPathError, check_output_dir, check_output_file


def test_new_file_in_existing_folder_is_accepted(tmp_path):
    assert check_output_file(tmp_path / "t.npz") == tmp_path / "t.npz"
    assert not list(tmp_path.iterdir())          # the write probe leaves nothing behind


def test_existing_file_needs_overwrite(tmp_path):
    target = tmp_path / "t.npz"
    target.write_bytes(b"x")
    with pytest.raises(OutputPathError, match="--overwrite"):
        check_output_file(target)
    check_output_file(target, overwrite=True)
    assert target.read_bytes() == b"x"           # checking never touches the file


@pytest.mark.parametrize("make", ["missing_parent", "parent_is_file", "is_folder"])
def test_unusable_file_paths_are_refused(tmp_path, make):
    f = tmp_path / "file"
    f.write_text("x")
    path = {"missing_parent": tmp_path / "nope" / "t.npz", "parent_is_file": f / "t.npz",
            "is_folder": tmp_path}[make]
    with pytest.raises(OutputPathError) as err:
        check_output_file(path, overwrite=True)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0 and not os.path.isdir("/proc/self"), reason="needs /proc")
def test_unwritable_folder_is_refused():
    with pytest.raises(OutputPathError, match="cannot write"):
        check_output_file("/proc/t.npz")


def test_output_dir_rules(tmp_path):
    check_output_dir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    with pytest.raises(OutputPathError, match="--overwrite"):
        check_output_dir(tmp_path / "run")
    check_output_dir(tmp_path / "run", overwrite=True)
    check_output_dir(tmp_path / "run", allow_existing=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        check_output_dir(tmp_path / "afile", overwrite=True)
