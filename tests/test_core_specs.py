"""Parameter coercion and the CLI's own surface."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from compressor import Param, UsageError, __version__
from compressor.cli import cli
from compressor.errors import EXIT_CODES


@pytest.mark.parametrize(
    ("param", "raw", "expected"),
    [
        (Param(bool), "yes", True),
        (Param(bool), "off", False),
        (Param(bool), True, True),
        (Param(int), "12", 12),
        (Param(int), 3.0, 3),
        (Param(float, minimum=0, maximum=1), "0.25", 0.25),
        (Param(str, choices=("minmax", "entropy")), "entropy", "entropy"),
    ],
)
def test_values_are_coerced_to_the_declared_type(param: Param, raw: object, expected: object) -> None:
    assert param.coerce("key", raw) == expected


@pytest.mark.parametrize(
    ("param", "raw", "message"),
    [
        (Param(bool), "maybe", "not a valid bool"),
        (Param(int), "1.5", "not a valid int"),
        (Param(int), 1.5, "not a valid int"),
        (Param(int), True, "not a valid int"),
        (Param(float, minimum=0, maximum=1), "1.5", "above the maximum 1"),
        (Param(float, minimum=0), "-1", "below the minimum 0"),
        (Param(str, choices=("minmax", "entropy")), "median", "not one of: minmax, entropy"),
    ],
)
def test_bad_values_name_the_key_and_the_problem(param: Param, raw: object, message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        param.coerce("key", raw)
    assert str(caught.value).startswith("key=")


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_ranges_hold_for_any_float(value: float) -> None:
    param = Param(float, minimum=0, maximum=1)
    if 0 <= value <= 1:
        assert param.coerce("s", str(value)) == value
    else:
        with pytest.raises(UsageError):
            param.coerce("s", str(value))


def test_version_and_help_list_every_exit_code() -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["--version"]).output.strip() == f"compressor, version {__version__}"
    text = runner.invoke(cli, ["--help"]).output
    for code, meaning in EXIT_CODES.items():
        assert f"{code}  {meaning}" in text
    for command in ("run", "measure", "backends", "plugins", "demo"):
        assert command in text
