"""A symlink planted in the run's artefact folder."""
import os

EXPECT = "symlink"


def tamper(ws):
    os.symlink("/etc/hostname", ws.art("extra-link"))
