"""User errors survive a trip between processes (a Ray task's error reaches the driver whole)."""

from __future__ import annotations

import pickle
from pathlib import Path

from pipeline.errors import InputFileError, UserError


def test_an_input_file_error_pickles_to_the_same_message_and_path() -> None:
    error = InputFileError(Path("/data/day-1.csv"), "not ascii text at byte 18")
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is InputFileError and isinstance(back, UserError)
    assert str(back) == "/data/day-1.csv: not ascii text at byte 18"
    assert back.path == Path("/data/day-1.csv")
