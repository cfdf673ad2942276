"""``covtoken paper build | verify``."""
from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from .build import PaperError, build_paper, verify_paper

__all__ = ["register_cli"]

console = Console(stderr=True)


def _lock(args: argparse.Namespace) -> Path:
    from ..runner import default_lock_path

    return Path(args.lock) if args.lock else default_lock_path()


def cmd_build(args: argparse.Namespace) -> int:
    try:
        built = build_paper(args.draft, root=args.root, out_dir=args.out, lock_path=_lock(args))
    except PaperError as exc:
        console.print(f"[red]paper build failed:[/red] {exc}", soft_wrap=True)
        return 1
    console.print(f"built {built}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        problems = verify_paper(args.draft, root=args.root, out_dir=args.out, lock_path=_lock(args))
    except PaperError as exc:
        console.print(f"[red]paper verify failed:[/red] {exc}", soft_wrap=True)
        return 1
    for p in problems:
        console.print(f"[red]FAIL[/red] {p}", soft_wrap=True)
    if problems:
        console.print(f"[red]paper verify failed: {len(problems)} problem(s)[/red]")
        return 1
    console.print(f"{args.out}: every number and figure matches its record")
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``covtoken paper`` to the command line."""
    p = sub.add_parser("paper", help="build or verify the paper from gate records")
    psub = p.add_subparsers(dest="paper_command", required=True)
    for name, fn, helptext in (("build", cmd_build, "render the draft and draw the figures"),
                               ("verify", cmd_verify, "fail unless the built paper matches the records")):
        q = psub.add_parser(name, help=helptext)
        q.add_argument("--draft", default="paper/working_draft.md")
        q.add_argument("--out", default="paper/build")
        q.add_argument("--root", default=".", help="repository root the draft's record paths are relative to")
        q.add_argument("--lock", help="threshold lock (default configs/thresholds.lock.json)")
        q.set_defaults(fn=fn)
