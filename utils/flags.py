"""The one flag parser of every script: a dataclass's fields are its flags (names, types, defaults, help), parsed strictly.

Light on purpose (the standard library only), so that a script can parse its flags before importing anything else
of this project (bench.py's measuring process imports `models` from another work tree).
"""
import argparse
import dataclasses
import sys
import textwrap
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

# --help lists a script's flags under these headings, in this order (a field's metadata 'group'); a field without one is
# listed under argparse's own heading, beside --help
GROUPS = ('data', 'model', 'losses', 'optimisation', 'schedule', 'checkpoints and resume', 'distributed', 'logging', 'sampling',
          'evaluation', 'benchmark', 'output', 'environment')


def flag(default: Any = dataclasses.MISSING, help: str = '', *, group: str = '', default_factory: Any = dataclasses.MISSING,
         **metadata: Any) -> Any:
    """A dataclass field that is a flag: its default, its one line of --help (allowed values included) and its group.

    The help text lives here, with the declaration, and nowhere else; parse_dataclass prints it with the default.
    Further metadata: 'choices', 'metavar', 'positional'. A mutable default (a list, a dict) is not supported;
    default_factory computes a default when the flags are parsed (e.g. from the machine).
    """
    if group and group not in GROUPS:
        raise ValueError(f'flag group {group!r} is not one of {GROUPS}')
    if '\n' in help:
        raise ValueError(f'the help of a flag is one line (no newline): {help!r}')
    return dataclasses.field(default=default, default_factory=default_factory, metadata={'help': help, 'group': group, **metadata})


def _field_type(tp):
    if get_origin(tp) is Union:
        inner = [a for a in get_args(tp) if a is not type(None)]
        return inner[0]
    return tp


# the placeholder of a flag's value in --help, by type (metadata 'metavar' overrides it; choices list themselves)
_METAVARS = {int: 'INT', float: 'FLOAT', str: 'STR', bool: 'BOOL'}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with the default after every optional flag's text (a required one has none); an empty string reads as ''."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=28)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required:
            return action.help
        text = super()._get_help_string(action)
        return text.replace('%(default)s', "''") if action.default == '' else text

    def _split_lines(self, text: str, width: int):
        # whole words only: a path, a URL or a flag like --eval_only is never broken at a hyphen or an underscore
        return textwrap.wrap(' '.join(text.split()), width, break_on_hyphens=False, break_long_words=False)


class _FlagParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a bad value, a missing argument) are one line on stderr and exit code 2."""

    def error(self, message: str):
        self.exit(2, f'{self.prog}: error: {message} (--help lists the flags)\n')


def _add_field(parser, f: dataclasses.Field) -> None:
    """One dataclass field as one argument (of a parser or an argument group): metadata may give 'help', 'choices', 'metavar'
    and 'positional'.

    A flag without a default is required; a bool flag also takes a bare --name (= true).
    """
    kw = {k: f.metadata[k] for k in ('help', 'choices', 'metavar') if k in f.metadata}
    if 'help' in kw:
        kw['help'] = kw['help'].replace('%', '%%')   # argparse formats the text with %(default)s and the like
    tp = _field_type(f.type)
    if 'metavar' not in kw and 'choices' not in kw and not f.metadata.get('positional'):
        kw['metavar'] = _METAVARS.get(tp, tp.__name__.upper())
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
    --help lists the positional arguments first, then the flags under the headings of GROUPS, in that order (a field's
    metadata 'group'; argparse's own heading for a flag without one), each group's flags in field order.
    """
    parser = _FlagParser(description=description, allow_abbrev=False, formatter_class=_HelpFormatter)
    headings = {g: parser.add_argument_group(g) for g in GROUPS}   # argparse leaves out a heading with no flags
    for f in dataclasses.fields(cls):
        if not f.metadata.get('derived'):
            positional = f.metadata.get('positional')
            _add_field(parser if positional else headings.get(f.metadata.get('group', ''), parser), f)
    ns = parser.parse_args(argv)
    out = cls(**vars(ns))
    if any(f.name == 'cmd' for f in dataclasses.fields(cls)):
        out.cmd = ' '.join(sys.argv[1:] if argv is None else argv)
    return out
