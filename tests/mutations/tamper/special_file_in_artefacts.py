"""A FIFO (special file) planted in the run's artefact folder."""
import os

EXPECT = "special file"


def tamper(ws):
    os.mkfifo(ws.art("pipe"))
