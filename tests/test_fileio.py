"""Atomic writes: a failed write leaves the previous file intact and says why in one line."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from lungsight.errors import OutputError
from lungsight.examples import EXAMPLE_CT
from lungsight.fileio import atomic_write, atomic_write_text


def _fails_with(exc: BaseException):
    def write(tmp):
        tmp.write_bytes(b"half a checkpoint")
        raise exc

    return write


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
        # what torch.save raises when the disk fills during a checkpoint
        (
            RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 198777728 vs 198777616"),
            "unexpected pos",
        ),
    ],
)
def test_a_failed_write_names_the_file_keeps_the_old_one_and_leaves_no_temp(tmp_path, exc, reason):
    target = atomic_write_text(tmp_path / "state.pt", "previous")
    with pytest.raises(OutputError) as info:
        atomic_write(target, _fails_with(exc))
    message = str(info.value)
    assert str(target) in message and reason in message and "MiB free on that disk" in message
    assert "\n" not in message
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_an_interrupt_is_not_turned_into_an_output_error(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x", _fails_with(KeyboardInterrupt()))
    assert not list(tmp_path.iterdir())


def test_an_output_folder_that_is_a_file_is_refused_without_touching_it(tmp_path, capsys):
    from lungsight.cli import main

    taken = atomic_write_text(tmp_path / "notes.txt", "the user's notes")
    assert main(["predict", str(EXAMPLE_CT), "--out", str(taken)]) == OutputError.exit_code == 4
    err = capsys.readouterr().err.strip()
    assert err == f"lungsight: error: {taken}: exists and is not a folder; give a folder for the output"
    assert main(["predict", str(EXAMPLE_CT), "--out", str(taken / "sub")]) == 4
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lungsight: error: {taken / 'sub'}: cannot create the output folder") and "\n" not in err
    # said before the input is read (a missing input would otherwise be the first error)
    assert main(["predict", str(tmp_path / "missing.nii.gz"), "--out", str(taken)]) == 4
    assert "exists and is not a folder" in capsys.readouterr().err
    assert taken.read_text() == "the user's notes"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_failed_overlay_write_stops_the_prediction_with_its_reason(tmp_path, monkeypatch):
    """The overlays are encoded in parallel; an error in any of them still reaches the caller as one line, and no
    result.json claims the prediction was written."""
    import lungsight

    pred = lungsight.Detector.from_pretrained("ct-default").predict(lungsight.load_study(EXAMPLE_CT), top_k=3)
    real = Path.write_bytes
    calls = []

    def write_bytes(self, data):
        if ".png." in self.name:  # the overlays' temporary files
            calls.append(self)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(OutputError, match="No space left"):
        pred.save(tmp_path / "out")
    assert len(calls) == 3 and not (tmp_path / "out" / "result.json").exists()
