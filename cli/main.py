"""The `pkdpipe` app: registers each command group and turns library errors into one line."""

from __future__ import annotations

import sys

import click
import typer
from typer.core import TyperGroup

from pkdpipe.errors import PkdError


class UserError(click.ClickException):
    """A PkdError as click shows errors: `error: ...` on stderr, exit code 1, no traceback."""

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class PkdGroup(TyperGroup):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PkdError as err:
            raise UserError(str(err)) from None
        except KeyboardInterrupt:
            click.echo("interrupted: finished work is kept; run the same command again to resume", err=True)
            raise click.exceptions.Exit(130) from None


app = typer.Typer(
    name="pkdpipe",
    cls=PkdGroup,
    help="Patient Knowledge Distillation for BERT-style models: cache the teacher once, distill many students.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from pkdpipe_cli import cache_cmd, eval_cmd, train_cmd  # noqa: E402  (they register on `app`)

cache_cmd.register(app)
train_cmd.register(app)
eval_cmd.register(app)


def run() -> None:
    """Console-script entry point."""
    sys.exit(app())
