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
    import dist
    from models.state_dict import CheckpointMismatchError
    try:
        main(*args)
    except (UserError, CheckpointMismatchError) as e:
        logging.getLogger().handlers.clear()
        print(f'error: {e}', file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        dist.finalize()
