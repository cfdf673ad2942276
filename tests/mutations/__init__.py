"""Mutation suites: tamperings of audited records (``tamper/``), each required to be caught."""
