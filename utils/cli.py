"""Entry-point wrapper of the scripts: user errors end in one clear line on stderr, not a traceback."""
import logging
import sys
from typing import Callable

__all__ = ['UserError', 'TrainingStopped', 'run_main']


class UserError(Exception):
    """Raised for input a user can fix (flags, folders, files); the message says what and how."""


class TrainingStopped(UserError, RuntimeError):
    """Training cannot continue (e.g. the loss diverged); nothing broken was written."""


def run_main(main: Callable, *args) -> None:
    import dist   # here, not at the top: this module stays light (the PNG writer processes import it)
    from models.errors import ModelInputError   # a wrong folder, file or build argument found by models/
    code = 0
    try:
        main(*args)
    except (UserError, ModelInputError) as e:
        logging.getLogger().handlers.clear()
        print(f'error: {e}', file=sys.stderr, flush=True)
        code = 1
    finally:
        grouped = dist.initialized() and dist.get_world_size() > 1
        dist.finalize()
    if grouped:   # see _exit_now
        _exit_now(code)
    if code:
        sys.exit(code)


def _exit_now(code: int) -> None:
    """End a process that was in a process group, once its work is written and the group destroyed, without the
    interpreter's teardown. Twice in this project's test runs a two-process gloo run aborted there after a complete,
    correct run ('terminate called without an active exception', exit -6): most likely a C++ object of c10d or gloo
    (a work handle, the store's thread) destroyed during that teardown. Unexpected errors still end the usual way."""
    import os
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
