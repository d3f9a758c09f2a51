"""Published weights: a local path first, the Hugging Face Hub second, a clear error offline."""
import logging
import os
from typing import Optional

import huggingface_hub

from .config import HF_REPO, PUBLISHED
from .errors import ModelInputError

__all__ = ['HF_REPO', 'resolve_checkpoint', 'CheckpointUnavailableError']

logger = logging.getLogger(__name__)


class CheckpointUnavailableError(ModelInputError, FileNotFoundError):
    """A weights file that is neither local nor downloadable."""


def resolve_checkpoint(path_or_name: str, repo_id: str = HF_REPO, downloadable: Optional[bool] = None) -> str:
    """Local path of a weights file.

    An existing file is returned as is. Otherwise, if it is the bare name of a published file (no folder:
    a path that names a folder means a local file, and a missing one is an error, not a download) or
    `downloadable` is True, it is downloaded once into the Hugging Face cache (HF_HOME) and that path
    returned; offline or unreachable, the error says where to put the file.
    """
    if os.path.isfile(path_or_name):
        return path_or_name
    name = os.path.basename(path_or_name)
    if downloadable is None:
        downloadable = name in PUBLISHED and name == path_or_name
    if not downloadable:
        hint = (f'; to download the published {name}, give its bare name ({name}) instead of a path' if name in PUBLISHED
                else f' (the published files that can be downloaded by their bare name are {", ".join(PUBLISHED)})')
        raise CheckpointUnavailableError(f'{path_or_name} does not exist{hint}')
    url = f'https://huggingface.co/{repo_id}/resolve/main/{name}'
    try:
        local = huggingface_hub.hf_hub_download(repo_id=repo_id, filename=name)   # looked up here: tests replace it
    except Exception as e:  # offline, unreachable, not found, no permission
        raise CheckpointUnavailableError(
            f'{name} is not at {path_or_name} and could not be downloaded from the Hugging Face repo {repo_id} '
            f'({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}). If this machine is offline, download {url} '
            f'on one that is online and pass its path (or put it at {os.path.abspath(path_or_name)})') from None
    logger.info('using %s from the Hugging Face cache: %s', name, local)
    return local
