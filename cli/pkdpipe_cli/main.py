"""The `pkdpipe` app: registers each command group and turns library errors into one line."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from pkdpipe.errors import Interrupted, PkdError


class PkdGroup(TyperGroup):
    """Shows a PkdError as one line on stderr (`error: ...`, exit 1): no traceback for a user's mistake."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PkdError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None
        except PermissionError as err:  # an unreadable data file, task file, shard or folder: one line
            where = err.filename or "a file pkdpipe needs"
            typer.echo(f"error: permission denied: {where} (pkdpipe must read it, or write there)", err=True)
            raise typer.Exit(1) from None
        except Interrupted as err:  # a run that knows what it kept says so
            typer.echo(f"interrupted: {err}", err=True)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: run the same command again; it goes on from whatever it had finished",
                       err=True)  # fmt: skip
            raise typer.Exit(130) from None


app = typer.Typer(
    name="pkdpipe",
    cls=PkdGroup,
    help="Patient Knowledge Distillation for BERT-style models: "
    "cache the teacher once, distill many students.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: "pkdpipe[demo]" must not read as markup
)


def _version(value: bool) -> None:
    if value:
        from pkdpipe import __version__

        typer.echo(f"pkdpipe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
):
    """Patient Knowledge Distillation for BERT-style models: cache the teacher once, distill many students."""


def _load_plugins() -> None:
    """The user's strategies ($PKDPIPE_PLUGINS, `pkdpipe.strategies.load_plugins`), registered before
    the commands take their options from the registry; a module that fails is one line, exit 1."""
    from pkdpipe.strategies import load_plugins

    try:
        load_plugins()
    except PkdError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)


_load_plugins()

from pkdpipe_cli import cache_cmd, demo_cmd, eval_cmd, sweep_cmd, train_cmd  # noqa: E402  (they register on `app`)

demo_cmd.register(app)
train_cmd.register(app)
cache_cmd.register(app)
eval_cmd.register(app)
sweep_cmd.register(app)


def run() -> None:
    """Console-script entry point (also `python -m pkdpipe`, which torchrun runs on every rank)."""
    try:
        app()
        code = 0
    except SystemExit as done:
        if isinstance(done.code, str):  # sys.exit("message"): shown, status 1, as Python does
            print(done.code, file=sys.stderr)
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    # a rank of a torchrun job leaves through pkdpipe.distributed (its teardown can abort at exit);
    # a plain process (and any command that never loaded torch) exits as usual
    distributed = sys.modules.get("pkdpipe.distributed")
    if distributed is not None:
        distributed.exit_rank(code)
    sys.exit(code)
