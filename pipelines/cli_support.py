"""What the three console scripts share: error reporting without tracebacks, and a `--debug` switch."""

from __future__ import annotations

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

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as exc:  # the single place where errors meet the user
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if isinstance(exc, StxdError):
                message = str(exc)
            else:
                message = (f"internal error ({type(exc).__name__}): {exc}. This is a bug in stxd or an "
                           "input it does not recognise; re-run with --debug for the traceback.")
            click.echo(textwrap.fill(f"error: {message}", width=100, break_long_words=False,
                                     break_on_hyphens=False), err=True)
            sys.exit(2)


def debug_option(fn: Any) -> Any:
    """The `--debug` flag of a group: store it on the context for `StxdGroup.invoke`."""

    def store(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
        ctx.ensure_object(dict)["debug"] = value
        return value

    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=store,
                        help="Show full Python tracebacks instead of one-paragraph errors.")(fn)
