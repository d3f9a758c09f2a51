"""Hugging Face Hub glue for VQVAE and VAR: save_pretrained, from_pretrained and push_to_hub, in safetensors.

from_pretrained reads two layouts, from a local folder or from a Hub repo (downloaded into the Hugging Face cache):
  - this project's (save_pretrained): config.json (the class's build arguments) and model.safetensors; a VAR's
    folder also holds its tokenizer in vae/ (the same two files);
  - the published one (FoundationVision/var): vae_ch160v4096z32.pth and var_d{16,20,24,30,36}.pth, built with the
    published arguments of the depth given.
PyTorchModelHubMixin records the build arguments, writes the folder, the model card, and pushes. Loading is this
file's own: the mixin loads non-strictly by default (a missing weight would stay random, silently), and knows
neither the published layout nor a VAR's tokenizer.

Class names travel with a VAR's weights (id k = position k): `var.class_names` after from_pretrained (the 1000 ImageNet
names of the published models, a saved folder's classes.json, else None), written by save_pretrained as classes.json;
class_names(depth_or_path) reads them without loading any weights.
"""
import inspect
import json
import logging
import os
import re
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import huggingface_hub
import PIL.Image
import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from huggingface_hub.errors import RemoteEntryNotFoundError

from .config import (HF_REPO, PUBLISHED_DEPTHS, PUBLISHED_VAE, VAE_VAR_KWARGS, VAE_VAR_RUNTIME_KWARGS, ConfigError, check_scales,
                     configs_from_vae_var_kwargs, published_build_kwargs, published_var_file, var_build_args,
                     var_config_from_build_args, vqvae_build_args, vqvae_config_from_build_args)
from .errors import ModelInputError
from .hub import CheckpointUnavailableError
from .weights import load_weights, save_weights, write_atomic

__all__ = ['HubMixin', 'load_pretrained', 'PretrainedError', 'HubPushError', 'CONFIG_NAME', 'WEIGHTS_NAME', 'VAE_SUBFOLDER',
           'GRID_NAME', 'hub_push_problem', 'configs_from_saved', 'saved_var_files',
           'looks_like_repo_id', 'CLASSES_NAME', 'class_names', 'imagenet_class_names', 'read_class_names', 'write_class_names',
           'check_class_names']

logger = logging.getLogger(__name__)

CONFIG_NAME, WEIGHTS_NAME, VAE_SUBFOLDER, GRID_NAME = 'config.json', 'model.safetensors', 'vae', 'samples.png'
CLASSES_NAME = 'classes.json'   # a VAR folder's class names: a JSON list, id = position
# the published models' classes: ImageNet's, in the order of the sorted synset folders n01440764 ... n15075141
_IMAGENET_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imagenet_classes.txt')
CARD_MARK = '<!-- model card written by save_pretrained -->'


class PretrainedError(ModelInputError, ValueError):
    """A folder or repo that does not hold what from_pretrained needs, or arguments that do not fit it."""


class HubPushError(ModelInputError, RuntimeError):
    """push_to_hub could not reach or write the Hub repo."""


class _Source:
    """Files of a local folder, or of a Hub repo downloaded once into the Hugging Face cache."""

    def __init__(self, name_or_path: str, hub_kwargs: Dict[str, Any]):
        self.name = str(name_or_path)
        self.local = os.path.isdir(self.name)
        self.hub_kwargs = hub_kwargs
        if not self.local and (os.path.exists(self.name) or self.name.startswith(('.', '/', '~')) or self.name.count('/') > 1):
            kind = 'a file, not a folder' if os.path.isfile(self.name) else 'not a folder'
            raise PretrainedError(f'{self.name} is {kind}: pass a folder written by save_pretrained, a folder holding the '
                                  f'published files ({PUBLISHED_VAE}, {published_var_file(16)}, ...), or a Hub repo id such as {HF_REPO}')

    def get(self, filename: str) -> Optional[str]:
        """Local path of `filename`; None when the folder or repo does not have it."""
        if self.local:
            path = os.path.join(self.name, filename)
            return path if os.path.isfile(path) else None
        try:   # looked up here, not imported by name: tests answer it from a folder
            return huggingface_hub.hf_hub_download(repo_id=self.name, filename=filename, **self.hub_kwargs)
        except RemoteEntryNotFoundError:
            return None
        except Exception as e:  # offline and not cached, unreachable, no such repo, no access
            first = str(e).splitlines()[0][:200] if str(e) else ''
            url = f'https://huggingface.co/{self.name}/resolve/main/{filename}'
            raise CheckpointUnavailableError(
                f'{filename} of the Hugging Face repo {self.name} is not in the local cache and could not be downloaded '
                f'({type(e).__name__}: {first}). On a machine that is online, run `hf download {self.name} {filename} '
                f'--local-dir DIR` (or fetch {url}), copy DIR here and pass its path instead of {self.name}') from None

    def require(self, filename: str, what: str) -> str:
        path = self.get(filename)
        if path is None:
            raise PretrainedError(f'{self.name} has no {filename} ({what})')
        return path


def _read_config(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise PretrainedError(f'{path} is not a readable JSON file ({type(e).__name__}: {e})') from None
    if not isinstance(config, dict):
        raise PretrainedError(f'{path} holds {type(config).__name__}, not the JSON object of build arguments save_pretrained writes')
    return config


def _check_keys(cls, kwargs: Dict[str, Any], origin: str) -> None:
    known = set(cls._hub_mixin_init_parameters) - {'self', 'vae_local'}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise PretrainedError(f'{origin}: {", ".join(unknown)} {"is not a build argument" if len(unknown) == 1 else "are not build arguments"} '
                              f'of {cls.__name__} (known: {", ".join(sorted(known))})')


def _build_and_load(cls, config: Dict[str, Any], weights: str, device, vae_local=None):
    """Build `cls` from its build arguments on `device`, load the weights file strictly, eval mode."""
    extra = {} if vae_local is None else {'vae_local': vae_local}
    with torch.device(device):
        model = cls(**extra, **config)
    model.load_state_dict(load_weights(weights, device=str(device)), strict=True)
    return model.eval()


def _published_build_args(depth: Optional[int], overrides: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(VQVAE build arguments, VAR build arguments) of the published VAR of `depth` (None: 16), build_vae_var keywords
    replacing its own (the kernel switches included; the init_* keywords draw no weights here: they are loaded)."""
    if depth is not None and depth not in PUBLISHED_DEPTHS:
        raise PretrainedError(f'depth={depth}: the published VARs have depth {", ".join(map(str, PUBLISHED_DEPTHS))}')
    allowed = set(VAE_VAR_KWARGS) | set(VAE_VAR_RUNTIME_KWARGS)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise PretrainedError(f'{", ".join(unknown)}: not build_vae_var arguments (known: {", ".join(sorted(allowed))})')
    shape = {**published_build_kwargs(published_var_file(depth or 16)), **{k: v for k, v in overrides.items() if k in VAE_VAR_KWARGS}}
    vqvae, var = configs_from_vae_var_kwargs(shape)
    kernels = {k: overrides[k] for k in ('flash_if_available', 'fused_if_available') if k in overrides}
    return vqvae_build_args(vqvae), {**var_build_args(var), **kernels}


class HubMixin(PyTorchModelHubMixin, library_name='var', paper_url='https://arxiv.org/abs/2404.02905', license='mit',
               tags=['image-generation', 'class-conditional', 'var', 'visual-autoregressive']):
    """save_pretrained / from_pretrained / push_to_hub for VQVAE (weights_kind='vae') and VAR (weights_kind='var').

    The build arguments given to the class are recorded by PyTorchModelHubMixin and written as config.json.
    """
    _weights_kind = ''
    # the class of each weights kind ('vae': VQVAE, 'var': VAR), recorded as they are defined: a VAR's loading builds
    # its tokenizer, and they import this module
    _kinds: Dict[str, type] = {}
    class_names: Optional[List[str]] = None   # a VAR's class names (id = position): set by from_pretrained, saved as classes.json

    def __init_subclass__(cls, weights_kind: str = '', **kwargs):
        super().__init_subclass__(**kwargs)
        cls._weights_kind = weights_kind or cls._weights_kind
        if weights_kind:
            HubMixin._kinds[weights_kind] = cls

    # ------------------------------------------------------------------ saving
    def _hub_config(self) -> Dict[str, Any]:
        return dict(self._hub_mixin_config or {})

    def _save_pretrained(self, save_directory) -> None:
        """config.json and model.safetensors, each written atomically; a VAR adds its tokenizer in vae/ and, when its
        class_names are known, classes.json (a stale one of an earlier save is removed)."""
        names = None
        if self._weights_kind == 'var' and self.class_names is not None:
            names = check_class_names(self.class_names, self.num_classes, 'var.class_names')   # before any file is written
        _write_folder(self, str(save_directory))
        if self._weights_kind == 'var':
            _write_folder(self.vae_proxy[0], os.path.join(str(save_directory), VAE_SUBFOLDER))
            classes = os.path.join(str(save_directory), CLASSES_NAME)
            if names is not None:
                write_class_names(str(save_directory), names)
            elif os.path.isfile(classes):
                os.remove(classes)

    def save_pretrained(self, save_directory, *, model_card_kwargs: Optional[Dict[str, Any]] = None, **kwargs):
        """Write config.json, model.safetensors (a VAR: and vae/) and README.md, the model card.

        model_card_kwargs (all optional): command, dataset, epochs, metrics (a dict), repo_id, and sample_grid
        (a uint8 (H, W, 3) array such as utils.imgs.make_grid's), written as samples.png.
        """
        card = dict(model_card_kwargs or {})
        os.makedirs(save_directory, exist_ok=True)
        grid = card.pop('sample_grid', None)
        if grid is not None:
            write_atomic(os.path.join(str(save_directory), GRID_NAME), lambda tmp: PIL.Image.fromarray(grid).save(tmp, format='PNG'))
            card['sample_grid'] = GRID_NAME
        readme = os.path.join(str(save_directory), 'README.md')
        if os.path.isfile(readme) and CARD_MARK in open(readme, encoding='utf-8').read():
            os.remove(readme)   # a card of ours from an earlier save: written again
        return super().save_pretrained(save_directory, model_card_kwargs=card, **kwargs)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        return ModelCard(_card_text(self, **kwargs))

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: Optional[Dict[str, Any]] = None, **kwargs) -> str:
        """Create the repo if needed and upload save_pretrained's folder in one commit (token: HF_TOKEN or `hf auth login`)."""
        card = {'repo_id': repo_id, **(model_card_kwargs or {})}
        try:
            return super().push_to_hub(repo_id, model_card_kwargs=card, **kwargs)
        except (PretrainedError, CheckpointUnavailableError):
            raise
        except Exception as e:  # offline, unreachable, not logged in, no write access
            first = str(e).splitlines()[0][:300] if str(e) else ''
            raise HubPushError(f'could not push to the Hugging Face repo {repo_id} ({type(e).__name__}: {first}). Check the network '
                               f'(HF_HUB_OFFLINE, HF_ENDPOINT) and the login (HF_TOKEN or `hf auth login`); a folder written by '
                               f'save_pretrained can be pushed later with `hf upload {repo_id} FOLDER .`') from None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, depth: Optional[int] = None, device='cpu',
                        build_kwargs: Optional[Dict[str, Any]] = None, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                        force_download: bool = False, local_files_only: bool = False, token=None, **overrides):
        """The model of a folder or Hub repo, loaded strictly, in eval mode on `device`.

        pretrained_model_name_or_path: a folder written by save_pretrained (or a Hub repo pushed by push_to_hub), or
            the published repo FoundationVision/var (or a folder holding its file names) with `depth` (16, 20, 24, 30 or
            36; the tokenizer alone needs no depth, except 36 for its 512 px scales).
        build_kwargs: published layout only: build_vae_var arguments replacing the published ones of `depth`.
        overrides: saved folders only: the class's build arguments replacing config.json's (e.g. flash_if_available=False).
        A VAR's tokenizer is `var.vae_proxy[0]` (load_pretrained returns both).
        """
        hub_kwargs = dict(revision=revision, cache_dir=cache_dir, force_download=force_download,
                          local_files_only=local_files_only, token=token)
        src = _Source(pretrained_model_name_or_path, hub_kwargs)
        config_path = None if src.name == HF_REPO else src.get(CONFIG_NAME)
        if config_path is None:
            if src.name != HF_REPO and src.get(PUBLISHED_VAE) is None:
                raise PretrainedError(f'{src.name} holds neither {CONFIG_NAME} (a folder written by save_pretrained) nor the '
                                      f'published files ({PUBLISHED_VAE}, {published_var_file(16)}, ...)')
            if overrides:
                raise PretrainedError(f'{", ".join(sorted(overrides))}: {src.name} has the published layout, whose build '
                                      f'arguments are replaced with build_kwargs={{...}} (build_vae_var arguments)')
            return cls._from_published(src, depth, device, dict(build_kwargs or {}))
        if depth is not None or build_kwargs:
            raise PretrainedError(f'depth= and build_kwargs= are for the published layout; {src.name} was written by '
                                  f'save_pretrained and its {CONFIG_NAME} defines the model (replace entries with keyword arguments)')
        return cls._from_saved(src, _read_config(config_path), device, overrides)

    @classmethod
    def _from_saved(cls, src: _Source, config: Dict[str, Any], device, overrides: Dict[str, Any]):
        holds_var = 'depth' in config
        if cls._weights_kind == 'vae':
            if holds_var:   # a VAR's folder: its tokenizer is in vae/
                sub = f'{VAE_SUBFOLDER}/{CONFIG_NAME}'
                config = _read_config(src.require(sub, 'the tokenizer of this VAR'))
                return cls._load_saved_vae(src, config, f'{VAE_SUBFOLDER}/{WEIGHTS_NAME}', device, overrides)
            return cls._load_saved_vae(src, config, WEIGHTS_NAME, device, overrides)
        if not holds_var:
            raise PretrainedError(f'{src.name} holds a tokenizer (VQVAE), not a VAR: load it with VQVAE.from_pretrained')
        vae_config = _read_config(src.require(f'{VAE_SUBFOLDER}/{CONFIG_NAME}', 'the tokenizer of this VAR'))
        vae = HubMixin._kinds['vae']._load_saved_vae(src, vae_config, f'{VAE_SUBFOLDER}/{WEIGHTS_NAME}', device, {})
        config = {**config, **overrides}
        _check_keys(cls, config, f'{src.name}/{CONFIG_NAME}' if not overrides else f'{src.name}/{CONFIG_NAME} or the overrides')
        var = _build_and_load(cls, config, src.require(WEIGHTS_NAME, 'the VAR weights'), device, vae_local=vae)
        names = _saved_class_names(src)
        var.class_names = None if names is None else check_class_names(names, var.num_classes, f'{src.name}/{CLASSES_NAME}')
        logger.info('VAR d%d from %s (%s)', var.depth, src.name, 'local folder' if src.local else 'Hugging Face repo')
        return var

    @classmethod
    def _load_saved_vae(cls, src: _Source, config: Dict[str, Any], weights_name: str, device, overrides: Dict[str, Any]):
        config = {**config, **overrides}
        _check_keys(cls, config, f'{src.name}/{CONFIG_NAME}')
        return _build_and_load(cls, config, src.require(weights_name, 'the tokenizer weights'), device)

    @classmethod
    def _from_published(cls, src: _Source, depth: Optional[int], device, overrides: Dict[str, Any]):
        if cls._weights_kind == 'var' and depth is None:
            raise PretrainedError(f'{src.name} has the published layout: pass depth= one of {", ".join(map(str, PUBLISHED_DEPTHS))}')
        vae_args, var_args = _published_build_args(depth, overrides)
        var_name = published_var_file(depth)
        vae_file = src.require(PUBLISHED_VAE, 'the published tokenizer')
        vae = _build_and_load(HubMixin._kinds['vae'], vae_args, vae_file, device)
        if cls._weights_kind == 'vae':
            return vae
        var = _build_and_load(HubMixin._kinds['var'], var_args, src.require(var_name, f'the published VAR d{depth}'), device, vae_local=vae)
        if var.num_classes == len(_imagenet_names()):
            var.class_names = imagenet_class_names()
        else:   # build_kwargs changed the class count: the ImageNet names are not this model's
            logger.info('%s of %s built with %d classes: its classes have no names', var_name, src.name, var.num_classes)
        logger.info('VAR d%d from the published %s of %s', depth, var_name, src.name)
        return var


# build arguments that do not change what a trained model computes in eval mode (training regularisers, the
# commitment weight of the tokenizer's loss, frozen or not, which kernels run): not part of VQVAEConfig / VARConfig
_EVAL_ONLY_ARGS = {'beta', 'test_mode', 'drop_rate', 'attn_drop_rate', 'drop_path_rate', 'cond_drop_rate', 'flash_if_available',
                   'fused_if_available'}


def configs_from_saved(vae_config: Dict[str, Any], var_config: Dict[str, Any], origin: str):
    """(VQVAEConfig, VARConfig) of the build arguments that save_pretrained wrote (vae/config.json, config.json).

    The configs are read off the arguments by name, then built on the meta device: every build argument that shapes
    the model must come out as written, so an architecture the configs cannot express is refused, never approximated.
    """
    vae_cls, var_cls = HubMixin._kinds['vae'], HubMixin._kinds['var']
    _check_keys(vae_cls, vae_config, f'{origin}/{VAE_SUBFOLDER}/{CONFIG_NAME}')
    _check_keys(var_cls, var_config, f'{origin}/{CONFIG_NAME}')
    vae_args = {**_init_defaults(vae_cls), **vae_config}
    var_args = {**_init_defaults(var_cls), **var_config}
    try:
        vqvae, var = vqvae_config_from_build_args(vae_args), var_config_from_build_args(var_args)
        check_scales(var, vqvae.patch_nums)
        with torch.device('meta'):
            vae_meta = vae_cls(**vqvae_build_args(vqvae))
            var_meta = var_cls(vae_local=vae_meta, **var_build_args(var), flash_if_available=False, fused_if_available=False)
    except (ConfigError, TypeError, ValueError) as e:
        raise PretrainedError(f'{origin}: its build arguments do not make a model ({e})') from None
    for path, written, built in ((f'{VAE_SUBFOLDER}/{CONFIG_NAME}', vae_args, vae_meta._hub_config()),
                                 (CONFIG_NAME, var_args, var_meta._hub_config())):
        diffs = [f'{k}={written[k]!r} (the configs build {built[k]!r})' for k in sorted(built)
                 if k not in _EVAL_ONLY_ARGS and _plain(written[k]) != _plain(built[k])]
        if diffs:
            raise PretrainedError(f'{origin}/{path}: {"; ".join(diffs)}: an architecture that VQVAEConfig / VARConfig cannot '
                                  f'express, which sample.py and edit.py do not build; load it in Python with load_pretrained')
    return vqvae, var


def _init_defaults(cls) -> Dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items() if p.default is not inspect.Parameter.empty}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def looks_like_repo_id(s: str) -> bool:
    """`owner/name` that is not a local path nor a weight file's name: a Hugging Face repo id."""
    return (not os.path.exists(s) and re.fullmatch(r'[A-Za-z0-9][\w.-]*/[\w.-]+', s) is not None
            and not s.endswith(('.pth', '.pt', '.bin', '.ckpt', '.safetensors')))


def saved_var_files(name_or_path: str):
    """What sample.py needs of a VAR folder or Hub repo written by save_pretrained, before building anything:
    (VQVAEConfig, VARConfig, path of the tokenizer's weights, path of the VAR's weights)."""
    src = _Source(name_or_path, {})
    config_path = src.get(CONFIG_NAME)
    if config_path is None:
        hint = (f'; it has the published layout: pass --depth and the file {os.path.join(src.name, published_var_file(16))} (say)'
                if src.get(PUBLISHED_VAE) is not None else '')
        raise PretrainedError(f'{src.name} has no {CONFIG_NAME}: it is not a folder written by save_pretrained '
                              f'(or train.py --save_pretrained){hint}')
    var_config = _read_config(config_path)
    if 'depth' not in var_config:
        raise PretrainedError(f'{src.name} holds a tokenizer (VQVAE), not a VAR: pass it as the tokenizer, or a VAR folder')
    vae_config = _read_config(src.require(f'{VAE_SUBFOLDER}/{CONFIG_NAME}', 'the tokenizer of this VAR'))
    vqvae, var = configs_from_saved(vae_config, var_config, src.name)
    return (vqvae, var, src.require(f'{VAE_SUBFOLDER}/{WEIGHTS_NAME}', 'the tokenizer weights'),
            src.require(WEIGHTS_NAME, 'the VAR weights'))


def _write_folder(model: HubMixin, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    save_weights(model.state_dict(), os.path.join(folder, WEIGHTS_NAME))
    text = json.dumps(model._hub_config(), indent=2, sort_keys=True)
    write_atomic(os.path.join(folder, CONFIG_NAME), lambda tmp: _write_text(tmp, text))


def _write_text(path: str, text: str) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        f.write(text)


def _card_text(model: HubMixin, command: str = '', dataset: str = '', epochs=None, metrics: Optional[Dict[str, float]] = None,
               sample_grid: str = '', repo_id: str = '', **extra) -> str:
    cfg = model._hub_config()
    where = repo_id or 'FOLDER_OR_REPO_ID'
    if model._weights_kind == 'var':
        pn = cfg.get('patch_nums', ())
        title = f'VAR d{cfg.get("depth")}: {cfg.get("num_classes")} classes, {pn[-1] * 16 if pn else "?"} px'
        usage = (f"from models import load_pretrained\nvae, var = load_pretrained('{where}')\n"
                 f"img_B3HW = var.autoregressive_infer_cfg(B=4, label_B=0, g_seed=0)   # in [0, 1]")
        if model.class_names:
            usage += f"\nprint(var.class_names[0])   # {model.class_names[0]!r}: class 0 (the names are in {CLASSES_NAME})"
    else:
        title = f'VQVAE tokenizer: {cfg.get("vocab_size")} codes, {cfg.get("z_channels")} channels'
        usage = f"from models import VQVAE\nvae = VQVAE.from_pretrained('{where}')"
    lines = ['---', model._hub_mixin_info.model_card_data.to_yaml(), '---', CARD_MARK, '', f'# {title}', '',
             'Visual AutoRegressive modeling (VAR, https://arxiv.org/abs/2404.02905). Weights in model.safetensors, build '
             'arguments in config.json' + (', the tokenizer in vae/.' if model._weights_kind == 'var' else '.'), '',
             '## Load', '', '```python', usage, '```', '']
    train = [(k, v) for k, v in (('command', f'`{command}`' if command else ''), ('dataset', dataset),
                                 ('epochs', '' if epochs is None else str(epochs))) if v]
    train += [(k, str(v)) for k, v in extra.items()]
    if train:
        lines += ['## Training', ''] + [f'- {k}: {v}' for k, v in train] + ['']
    if metrics:
        lines += ['## Measured', '', '| metric | value |', '| --- | --- |']
        lines += [f'| {k} | {v:.5g} |' if isinstance(v, float) else f'| {k} | {v} |' for k, v in metrics.items()] + ['']
    if sample_grid:
        lines += ['## Samples', '', f'![samples of fixed classes and seeds]({sample_grid})', '']
    return '\n'.join(lines)


def hub_push_problem(repo_id: str) -> Optional[str]:
    """Why pushing to `repo_id` would fail (no network, offline mode, not logged in), or None.

    Asks the Hub who is logged in, so that a long run does not find out at its end; nothing is created on the Hub
    before the push itself (push_to_hub creates the repo then, public unless it exists already).
    """
    try:
        huggingface_hub.HfApi().whoami()
    except Exception as e:
        first = str(e).splitlines()[0][:300] if str(e) else ''
        return (f'the Hugging Face Hub cannot be reached or no one is logged in ({type(e).__name__}: {first}). Check the network '
                f'(HF_HUB_OFFLINE, HF_ENDPOINT) and the login (HF_TOKEN or `hf auth login`), or train without --push_to_hub and '
                f'push local_out_dir_path/pretrained later with `hf upload {repo_id} FOLDER .`')
    return None


# ---------------------------------------------------------------------- class names
@lru_cache(maxsize=1)
def _imagenet_names() -> Tuple[str, ...]:
    with open(_IMAGENET_FILE, encoding='utf-8') as f:
        names = tuple(line.rstrip('\n') for line in f if line.strip())
    if len(names) != 1000:
        raise RuntimeError(f'{_IMAGENET_FILE} holds {len(names)} names instead of ImageNet\'s 1000')
    return names


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet class names of the published models, id = position (980: 'volcano')."""
    return list(_imagenet_names())


def check_class_names(names, num_classes: Optional[int] = None, origin: str = 'the class names') -> List[str]:
    """`names` as a list: strings (id = position), at most num_classes of them (a model may have unnamed classes after
    them, never names for classes it lacks); PretrainedError otherwise."""
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise PretrainedError(f'{origin} must be a list of class names (strings, id = position), not {type(names).__name__}')
    if num_classes is not None and len(names) > num_classes:
        raise PretrainedError(f'{origin}: {len(names)} names for a model of {num_classes} classes')
    return list(names)


def read_class_names(path: str) -> List[str]:
    """The names of a classes.json file (a JSON list, id = position)."""
    try:
        with open(path, encoding='utf-8') as f:
            names = json.load(f)
    except (OSError, ValueError) as e:
        raise PretrainedError(f'{path} is not a JSON list of class names ({type(e).__name__}: {e}); delete it or write it again') from None
    return check_class_names(names, origin=path)


def write_class_names(folder: str, names: Sequence[str]) -> str:
    """folder/classes.json (one name a line, id = position), written atomically; returns its path."""
    path = os.path.join(folder, CLASSES_NAME)
    text = json.dumps(check_class_names(names, origin='the class names'), indent=0, ensure_ascii=False) + '\n'
    write_atomic(path, lambda tmp: _write_text(tmp, text))
    return path


def _saved_class_names(src: _Source) -> Optional[List[str]]:
    """classes.json of a saved folder or Hub repo; None when it has none (or, offline, when only the weights are cached)."""
    try:
        path = src.get(CLASSES_NAME)
    except CheckpointUnavailableError as e:
        logger.warning('the class names of %s are unknown: %s', src.name, str(e).split(' (')[0])
        return None
    return None if path is None else read_class_names(path)


def _names_published(depth_or_path) -> bool:
    """A published depth (16, 'd16'), FoundationVision/var, or a published VAR file's name (var_d16.pth, as a path too)."""
    s = str(depth_or_path)
    if isinstance(depth_or_path, int) or (not os.path.exists(s) and s.lower().lstrip('d').isdigit()):
        return int(s.lower().lstrip('d')) in PUBLISHED_DEPTHS
    return s == HF_REPO or os.path.basename(s) in {published_var_file(d) for d in PUBLISHED_DEPTHS}


def class_names(depth_or_path, **hub_kwargs) -> Optional[List[str]]:
    """The class names (id = position) of the VAR that load_pretrained(depth_or_path) loads, read without loading it.

    The 1000 ImageNet names for the published models (a depth, FoundationVision/var, var_d16.pth, a folder of the
    published files); classes.json of a save_pretrained folder or Hub repo; None when the weights record none.
    hub_kwargs: revision, cache_dir, token, ... as for from_pretrained.
    """
    s = str(depth_or_path)
    if _names_published(depth_or_path):
        return imagenet_class_names()
    if os.path.isdir(s):
        if os.path.isfile(os.path.join(s, CLASSES_NAME)):
            return read_class_names(os.path.join(s, CLASSES_NAME))
        published = not os.path.isfile(os.path.join(s, CONFIG_NAME)) and os.path.isfile(os.path.join(s, PUBLISHED_VAE))
        return imagenet_class_names() if published else None
    if looks_like_repo_id(s):
        return _saved_class_names(_Source(s, hub_kwargs))
    return None


def load_pretrained(depth_or_path, device='cpu', **kwargs) -> Tuple[Any, Any]:
    """(tokenizer, VAR) in eval mode: a published depth (16, 'd16') from FoundationVision/var, or a folder / repo id.
    The VAR's class names (id = position) are `var.class_names` (None when the weights record none)."""
    var_cls = HubMixin._kinds['var']
    s = str(depth_or_path)
    if isinstance(depth_or_path, int) or (not os.path.exists(s) and s.lower().lstrip('d').isdigit()):
        var = var_cls.from_pretrained(HF_REPO, depth=int(s.lower().lstrip('d')), device=device, **kwargs)
    else:
        var = var_cls.from_pretrained(s, device=device, **kwargs)
    return var.vae_proxy[0], var
