""".ci/run: the reference tests fail instead of skipping, and pytest's "no tests collected" is a failure."""
import subprocess

from conftest import REPO, script_env

NEEDS_REFERENCE = '''
from conftest import reference_file

def test_needs_the_reference():
    reference_file('golden_small.pt')
'''


def ci_run(args, tmp_path, **env):
    """.ci/run with `make venv` replaced by `true` (the venv is there), on a test file written here, in pytest's own
    process (TEST_WORKERS=0: no xdist workers to start for one test)."""
    test = tmp_path / 'test_needs_ref.py'
    test.write_text(NEEDS_REFERENCE)
    env = script_env(MAKE='true', PYTHONPATH=f'{REPO}:{REPO / "tests"}', TEST_WORKERS='0', **env)
    env.pop('VAR_REQUIRE_REFERENCE', None)
    return subprocess.run([str(REPO / '.ci' / 'run'), '-p', 'no:cacheprovider', str(test), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_reference_tests_skip_locally_but_fail_under_ci(tmp_path):
    empty = tmp_path / 'reference'
    empty.mkdir()
    test = tmp_path / 'test_needs_ref.py'
    test.write_text(NEEDS_REFERENCE)
    env = script_env(PYTHONPATH=f'{REPO}:{REPO / "tests"}', VAR_REFERENCE_DIR=empty)
    env.pop('VAR_REQUIRE_REFERENCE', None)
    local = subprocess.run([str(REPO / '.venv' / 'bin' / 'python'), '-m', 'pytest', '-q', '-p', 'no:cacheprovider', str(test)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=120)
    assert local.returncode == 0 and '1 skipped' in local.stdout, local.stdout
    ci = ci_run([], tmp_path, VAR_REFERENCE_DIR=empty)
    assert ci.returncode == 1 and '1 failed' in ci.stdout, ci.stdout + ci.stderr
    assert f'{empty / "golden_small.pt"} is absent' in ci.stdout and 'VAR_REQUIRE_REFERENCE=1 makes that a failure' in ci.stdout


def test_ci_run_needs_the_reference_folder_and_fails_when_nothing_is_collected(tmp_path):
    res = ci_run([], tmp_path, VAR_REFERENCE_DIR=tmp_path / 'missing')
    assert res.returncode == 1 and f'the reference data folder {tmp_path / "missing"} is missing' in res.stderr
    (tmp_path / 'reference').mkdir()
    res = ci_run(['-k', 'no_such_test'], tmp_path, VAR_REFERENCE_DIR=tmp_path / 'reference')
    assert res.returncode == 1 and 'pytest collected no tests (exit code 5)' in res.stderr, res.stdout + res.stderr
