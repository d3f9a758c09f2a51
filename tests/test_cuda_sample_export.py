"""sample.py's export on CUDA: --writers defaults to a pool of PNG-writing processes started beside a process that holds
a CUDA context; the PNGs and the npz are those of encoding inline (--writers=0)."""
from conftest import run_script
from cuda_util import CUDA_MARKS
from test_sample_export import PNGS, SET, npz_members, sample_flags, tiny_ckpts  # noqa: F401 (tiny_ckpts is a fixture)

pytestmark = CUDA_MARKS


def test_the_export_on_cuda_is_the_inline_one(tiny_ckpts, tmp_path):  # noqa: F811 (the fixture)
    runs = {}
    for name, extra in (('pool', []), ('inline', ['--writers=0'])):
        runs[name] = tmp_path / name
        res = run_script(sample_flags(tiny_ckpts, runs[name], *SET, *extra))
        assert 'single process on cuda' in res.stdout + res.stderr
        assert 'written as the images were made (0 read back from their PNGs)' in res.stdout + res.stderr
    for n in PNGS:
        assert (runs['pool'] / n).read_bytes() == (runs['inline'] / n).read_bytes(), n
    assert npz_members(str(runs['pool']) + '.npz')[0] == npz_members(str(runs['inline']) + '.npz')[0]
