"""What the three console scripts share: error reporting without tracebacks, and a `--debug` switch."""

from __future__ import annotations

import re
import sys
import textwrap
from typing import Any

import click

from pipelines.errors import StxdError


class StxdGroup(click.Group):
    """A Click group that turns project errors into a one-paragraph message and exit code 2.

    Unexpected exceptions are reported the same way, with a hint to re-run with `--debug`, which lets
    every traceback through.
    """

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        """Every subcommand also takes `--debug`, so that it works before or after the subcommand's name."""
        if not any(p.name == "debug" for p in cmd.params):
            cmd.params.append(_debug_param())
        super().add_command(cmd, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # the single place where errors meet the user
            if ctx.obj and ctx.obj.get("debug"):
                raise
            text, worker = worker_message(exc)
            if isinstance(exc, StxdError):
                message = text
            else:
                message = (f"internal error ({type(exc).__name__}): {text}. This is a bug in stxd or an "
                           "input it does not recognise; re-run with --debug for the traceback.")
            if worker:
                message += f" (raised in {worker})"
            click.echo(textwrap.fill(f"error: {message}", width=100, break_long_words=False,
                                     break_on_hyphens=False), err=True)
            sys.exit(2)


_WORKER = re.compile(r"\ACaught \w+ (in DataLoader worker process \d+|in pin memory thread[^.]*)\.\n"
                     r"Original Traceback \(most recent call last\):\n")


def worker_message(exc: BaseException) -> tuple[str, str | None]:
    """(message, where) of an exception, with the traceback that a DataLoader worker folds into the message of
    the exception it re-raises taken out again: the original message, and e.g. "DataLoader worker process 0"
    (None for an exception raised in this process)."""
    text = str(exc)
    match = _WORKER.match(text)
    if match is None:
        return text, None
    kind = type(exc)
    # The traceback ends with the exception's `module.QualName: message` line (multi-line messages included).
    for name in (f"{kind.__module__}.{kind.__qualname__}", kind.__qualname__):
        cut = text.rfind(f"\n{name}: ")
        if cut >= 0:
            return text[cut + len(name) + 3:].strip(), match.group(1).removeprefix("in ")
    lines = [line for line in text.splitlines() if line and not line.startswith((" ", "\t"))]
    return lines[-1].strip(), match.group(1).removeprefix("in ")


def _store_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    # The group's and the subcommand's contexts share one dict (`ensure_object` finds the group's); a flag left out
    # on one of them never clears the other.
    flags = ctx.ensure_object(dict)
    flags["debug"] = flags.get("debug", False) or value
    return value


def _debug_param() -> click.Option:
    return click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True, callback=_store_debug,
                        help="Show full Python tracebacks instead of one-paragraph errors.")


def debug_option(fn: Any) -> Any:
    """The `--debug` flag of a group: store it on the context for `StxdGroup.invoke`."""
    fn.__click_params__ = [*getattr(fn, "__click_params__", []), _debug_param()]
    return fn
