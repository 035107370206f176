"""The error family: one exit code and one help text per kind, and nothing left out of ALL_ERRORS."""

from __future__ import annotations

import inspect

import pytest

import eclm.errors as errors
from eclm.errors import ALL_ERRORS, EclmError


def test_exit_codes_are_distinct() -> None:
    codes = [cls.exit_code for cls in ALL_ERRORS]
    assert len(set(codes)) == len(codes), {cls.__name__: cls.exit_code for cls in ALL_ERRORS}
    for cls in ALL_ERRORS:
        assert isinstance(cls.exit_code, int) and 0 < cls.exit_code < 126, cls.__name__


def test_every_error_has_help() -> None:
    for cls in ALL_ERRORS:
        assert isinstance(cls.help, str) and cls.help.strip(), cls.__name__
    subclasses = [cls for cls in ALL_ERRORS if cls is not EclmError]
    helps = [cls.help for cls in subclasses]
    assert len(set(helps)) == len(helps), "each kind of error explains itself, not the root's text"
    assert all(cls.help != EclmError.help for cls in subclasses)


def test_all_errors_is_complete() -> None:
    defined = {
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, EclmError) and obj.__module__ == errors.__name__
    }
    missing = sorted(c.__name__ for c in defined - set(ALL_ERRORS))
    assert defined == set(ALL_ERRORS), f"missing from ALL_ERRORS: {missing}"
    assert len(ALL_ERRORS) == len(set(ALL_ERRORS))
    assert all(issubclass(cls, EclmError) for cls in ALL_ERRORS)


def test_readme_exit_codes() -> None:
    """The README promises these codes to scripts."""
    assert errors.UnknownProfileError.exit_code == 10
    assert errors.InfeasibleBudgetError.exit_code == 12
    assert errors.BankError.exit_code == 13
    assert errors.BundleError.exit_code == 14
    assert errors.ExportValidationError.exit_code == 15
    assert errors.DataError.exit_code == 16
    assert errors.ConfigError.exit_code == 17


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_message_and_hint(cls: type[EclmError]) -> None:
    plain = cls("it broke")
    assert str(plain) == "it broke" and plain.message == "it broke" and plain.hint is None
    hinted = cls("it broke", hint="do this")
    assert str(hinted) == "it broke\n  -> do this"
    assert hinted.hint == "do this"
    with pytest.raises(EclmError):
        raise hinted
