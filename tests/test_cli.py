"""utils.cli.run_main: a user's mistake ends in one 'error:' line and exit code 1; a bug in the code keeps its traceback."""
import pytest


def test_user_errors_end_in_one_line_and_exit_code_1(capsys):
    from utils.arg_util import FlagError
    from utils.cli import run_main

    def main(value):
        raise FlagError(f'--top_k={value} is outside [0, 64]')

    with pytest.raises(SystemExit) as e:
        run_main(main, 65)
    assert e.value.code == 1
    assert capsys.readouterr().err == 'error: --top_k=65 is outside [0, 64]\n'


@pytest.mark.parametrize('bug', [ValueError, KeyError, RuntimeError, TypeError])
def test_bugs_are_not_hidden_as_user_errors(bug):
    from utils.cli import run_main

    def main():
        raise bug('a bug in the code, not in the input')

    with pytest.raises(bug):
        run_main(main)
