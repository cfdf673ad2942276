"""The data layer's user errors: wrong data, too few patients, a leaking split - one line, exit status 2.

Every class here is a ``ValueError`` (so callers that already treat ``ValueError`` as bad input keep working) and
carries ``exit_status = 2``: the job stops with one line naming the file, row, flag or locked key, before any
backbone or token work.
"""
from __future__ import annotations

__all__ = ["DataError", "DatasetIdentityError", "TooFewPatientsError"]


class DataError(ValueError):
    """Input data the kit refuses (a user error: one line, exit status 2)."""

    exit_status = 2


class DatasetIdentityError(DataError):
    """The content does not match what the catalog entry says the dataset is (modality, channels, names, count)."""


class TooFewPatientsError(DataError):
    """A judged split has fewer patients (split units) than the locked minimum for a CI-judged criterion."""
