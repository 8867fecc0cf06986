"""A setting: a dataclass field that carries what every consumer of it needs to know.

A leaf module (no pkdpipe imports beyond errors), so that the stage configs (`pkdpipe.config`)
and the strategies (`pkdpipe.strategies`, each with a settings dataclass of its own) declare their
settings alike. From a field declared with `setting(...)` and nothing else, pkdpipe derives:

- the CLI option (its default, its help text, how a list is typed: `pkdpipe_cli.common`);
- whether `sweep` and `sweep --search asha` may vary it (`sweep=True`), and how its values are
  typed there (`kind`: int, float or str, from the field's type);
- the run's name in a sweep (`tag`: `a0.5` for alpha; `pkdpipe.sweep.run_name`);
- whether it changes what is trained (`changes_result`): the settings a rerun must match to resume
  or reuse a run (`pkdpipe.loop.resume_settings`), and so what a model card records.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, field

from pkdpipe.errors import ConfigError

IF_CHANGED = "if-changed"  # a `tag` for a setting named in a run only away from its default, by its value


def setting(
    default=MISSING,
    help: str = "",  # noqa: A002
    cli: str | bool = True,
    words: tuple[str, ...] = (),
    *,
    sweep: bool = False,
    changes_result: bool = True,
    tag: str | None = None,
    default_factory=MISSING,
):
    """A config field with its help text: the CLI builds each option from the field's default and
    this text, so neither is written twice. `cli` says how a list is typed on the command line
    ("ints": 2,4,6; "names": train,dev; "ints-or-all"; "number": one float or one of `words`), or
    False for a field that is not an option; `words` are values taken as they are ("auto").

    `sweep`: a sweep or search may vary it (comma-separated values, or a range for a number).
    `changes_result`: False for where a run is written, how loudly, on which device: a rerun that
    differs there is still the same run. `tag`: how a sweep's run folder names it (`a` gives `a0.5`;
    None: the field's name as an option, `my-weight0.3`; "" leaves it out; IF_CHANGED names it by
    its value, at the end, only when it differs from its default)."""
    metadata = {"help": help, "cli": cli, "words": words, "sweep": sweep,
                "changes_result": changes_result, "tag": tag}  # fmt: skip
    return field(default=default, default_factory=default_factory, metadata=metadata)


def fields_of(config_class) -> list[dataclasses.Field]:
    return list(dataclasses.fields(config_class))


def help_of(config_class, name: str) -> str:
    return next(f.metadata.get("help", "") for f in dataclasses.fields(config_class) if f.name == name)


def default_of(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def sweepable(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("sweep"))


def changes_result(f: dataclasses.Field) -> bool:
    return f.metadata.get("changes_result", True)


def type_name(f: dataclasses.Field) -> str:
    """The first type of the field's annotation, by name ("float" for `float | str`), whether the
    annotation is written as a string (`from __future__ import annotations`) or as a type."""
    name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return name.split("|")[0].strip()


def kind_of(f: dataclasses.Field) -> str:
    """How a swept value is typed: "int", "float", "bool" or "str"."""
    kind = type_name(f)
    return kind if kind in ("int", "float", "bool") else "str"


def flag(name: str) -> str:
    """The command line's spelling of the setting `name`: `pt_space` -> `--pt-space`."""
    return "--" + name.replace("_", "-")


def tag_of(f: dataclasses.Field) -> str:
    tag = f.metadata.get("tag")
    return flag(f.name)[2:] if tag is None else tag


def parse_bool(text: str, flag: str) -> bool:
    """A swept yes/no setting's value as typed: true or false (also 1/0, yes/no)."""
    word = text.strip().lower()
    if word not in ("true", "false", "1", "0", "yes", "no"):
        raise ConfigError(f"{flag} takes true or false; got {text!r}")
    return word in ("true", "1", "yes")


# -- checks a settings dataclass runs in its __post_init__ ------------------------------------------
def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def check_positive(**values: float) -> None:
    for name, value in values.items():
        if value is None or value <= 0:
            raise ConfigError(f"{name.replace('_', '-')} must be positive; got {value}")
