"""The one flag parser of every script: a dataclass's fields are its flags (names, types, defaults, help), parsed strictly.

Light on purpose (the standard library only), so that a script can parse its flags before importing anything else
of this project (bench.py's measuring process imports `models` from another work tree).
"""
import argparse
import dataclasses
import sys
from typing import Any, Optional, Sequence, Type, TypeVar, Union, get_args, get_origin

__all__ = ['flag', 'GROUPS', 'parse_dataclass', 'str2bool']


def str2bool(v: Union[str, bool]) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ('1', 'true', 'yes', 'y', 'on'):
        return True
    if s in ('0', 'false', 'no', 'n', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected a boolean (1/0, true/false), got {v!r}')


T = TypeVar('T')

# --help lists a script's flags under these headings, in this order (a field's metadata 'group')
GROUPS = ('data', 'model', 'optimisation', 'schedule', 'checkpoints and resume', 'distributed', 'logging', 'sampling',
          'evaluation', 'environment')


def flag(default: Any = dataclasses.MISSING, help: str = '', *, group: str = '', **metadata: Any) -> Any:
    """A dataclass field that is a flag: its default, its one line of --help (allowed values included) and its group.

    The help text lives here, with the declaration, and nowhere else; parse_dataclass prints it with the default.
    Further metadata: 'choices', 'metavar', 'positional'. A mutable default (a list, a dict) is not supported.
    """
    if group and group not in GROUPS:
        raise ValueError(f'flag group {group!r} is not one of {GROUPS}')
    return dataclasses.field(default=default, metadata={'help': help, 'group': group, **metadata})


def _field_type(tp):
    if get_origin(tp) is Union:
        inner = [a for a in get_args(tp) if a is not type(None)]
        return inner[0]
    return tp


class _FlagParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a bad value, a missing argument) are one line on stderr and exit code 2."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (--help lists the flags)\n')


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field) -> None:
    """One dataclass field as one argument: metadata may give 'help', 'choices', 'metavar' and 'positional'.

    A flag without a default is required; a bool flag also takes a bare --name (= true).
    """
    kw = {k: f.metadata[k] for k in ('help', 'choices', 'metavar') if k in f.metadata}
    tp = _field_type(f.type)
    if f.metadata.get('positional'):
        parser.add_argument(f.name, type=tp, **kw)
        return
    if f.default is not dataclasses.MISSING:
        kw['default'] = f.default
    elif f.default_factory is not dataclasses.MISSING:
        kw['default'] = f.default_factory()
    else:
        kw['required'] = True
    if tp is bool:
        parser.add_argument(f'--{f.name}', type=str2bool, nargs='?', const=True, **kw)
    else:
        parser.add_argument(f'--{f.name}', type=tp, **kw)


def parse_dataclass(cls: Type[T], argv: Optional[Sequence[str]] = None, description: str = '') -> T:
    """Parse --name=value / --name value flags into a dataclass; bool flags also take a bare --name.

    Unknown flags are an error (one line, exit code 2). Fields with metadata {'derived': True} are not flags;
    {'positional': True} makes a field a positional argument, in field order (see _add_field for the rest).
    """
    parser = _FlagParser(description=description, allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        if not f.metadata.get('derived'):
            _add_field(parser, f)
    ns = parser.parse_args(argv)
    out = cls(**vars(ns))
    if any(f.name == 'cmd' for f in dataclasses.fields(cls)):
        out.cmd = ' '.join(sys.argv[1:] if argv is None else argv)
    return out
