"""Data folders: a class folder without images is an error that names it, in every script that reads images."""
import pytest
from PIL import Image

from conftest import TINY_TRAIN_FLAGS, run_script


def make_folder(root, train_classes, val_classes, empty):
    for split, classes in (('train', train_classes), ('val', val_classes)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            if (split, c) not in empty:
                Image.new('RGB', (16, 16), (200, 10, 10)).save(root / split / c / '0.png')
                (root / split / c / 'notes.txt').write_text('not an image')


@pytest.mark.parametrize('empty', [
    [('train', 'b')],
    [('val', 'a'), ('val', 'c')],
])
def test_empty_class_folders_are_named(tmp_path, empty):
    from utils.data import DataFolderError, check_data_path
    make_folder(tmp_path, 'abc', 'abc', empty)
    (tmp_path / 'train' / 'b' / 'nested').mkdir()            # a sub-folder holding nothing is no image either
    with pytest.raises(DataFolderError) as e:
        check_data_path(str(tmp_path))
    split = empty[0][0]
    assert f'{len(empty)} of the 3 class folders of {tmp_path / split} hold no images' in str(e.value)
    for s, c in empty:
        assert str(tmp_path / s / c) in str(e.value)
    assert 'add images to them or remove them' in str(e.value)


def test_an_empty_class_folder_stops_train_py_with_its_name(tmp_path, tiny_vae_ckpt):
    make_folder(tmp_path / 'data', 'ab', 'ab', [('train', 'a')])
    res = run_script(['train.py', f'--data_path={tmp_path / "data"}', f'--vae_ckpt={tiny_vae_ckpt}',
                      f'--local_out_dir_path={tmp_path / "out"}', *TINY_TRAIN_FLAGS, '--ep=1'], check=False)
    assert res.returncode == 1 and 'hold no images' in res.stderr and str(tmp_path / 'data' / 'train' / 'a') in res.stderr, res.stderr[-2000:]
    assert 'Traceback' not in res.stderr
