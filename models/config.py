"""Typed model configs: the one description of a tokenizer's and a transformer's shape, and the published models.

    vae = build_vqvae(VQVAEConfig())                        # the published tokenizer (PUBLISHED_VAE)
    var = build_var(VARConfig.published(16), vae)           # var_d16.pth; d36 needs VQVAEConfig(patch_nums=PATCH_NUMS_512)
    (builders in models/build.py, also `from models import build_vqvae, build_var`)

A config is a frozen dataclass; `to_dict()` / `from_dict()` give plain JSON (what a checkpoint stores under
'model_config'), and `from_dict` refuses unknown or missing keys. Every other form of a model's shape maps onto the
configs through one table, read both ways:
  - the classes' build arguments (VQVAE(...), VAR(...); a saved folder's config.json): VQVAE_BUILD_ARGS, VAR_BUILD_ARGS;
  - build_vae_var's keywords: VAE_VAR_KWARGS;
  - the command-line flags and a checkpoint's args: utils/arg_util.py VQVAE_FLAGS, VAR_FLAGS.
PUBLISHED is the one table of the published weights (HF_REPO's files, their kind and configs).
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Type, TypeVar

__all__ = ['ConfigError', 'PATCH_NUMS_256', 'PATCH_NUMS_512', 'VQVAEConfig', 'VARConfig', 'check_scales', 'configs_to_dict', 'configs_from_dict',
           'VQVAE_BUILD_ARGS', 'VAR_BUILD_ARGS', 'vqvae_build_args', 'var_build_args', 'vqvae_config_from_build_args',
           'var_config_from_build_args', 'VAE_VAR_KWARGS', 'VAE_VAR_RUNTIME_KWARGS', 'vae_var_kwargs', 'configs_from_vae_var_kwargs',
           'HF_REPO', 'Published', 'PUBLISHED', 'PUBLISHED_VAE', 'PUBLISHED_DEPTHS', 'published_var_file', 'published_configs',
           'published_build_kwargs']

# the side of every scale's token map: 10 scales for 256 px and for 512 px images (the tokenizer downsamples by 16)
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


class ConfigError(ValueError):
    """A model config with an unknown or missing key, or a value that cannot build a model; the message names it.

    field and reason: the field whose value is wrong and what it must be (for naming the CLI flag instead).
    """

    def __init__(self, message: str, field: Optional[str] = None, reason: str = ''):
        super().__init__(message)
        self.field, self.reason = field, reason


def _check_patch_nums(owner: str, patch_nums) -> Tuple[int, ...]:
    pn = tuple(patch_nums) if isinstance(patch_nums, (list, tuple)) else None
    if not pn or any(type(p) is not int or p < 1 for p in pn) or list(pn) != sorted(set(pn)):
        reason = f'must list increasing positive integer sides, e.g. {PATCH_NUMS_256}'
        raise ConfigError(f'{owner}.patch_nums={patch_nums!r} {reason}', 'patch_nums', reason)
    return pn


def _check_field(owner: str, f: dataclasses.Field, value) -> None:
    want = {int: (int,), float: (int, float), bool: (bool,)}.get(f.type)
    if want is not None and (type(value) not in want or (f.type is not bool and isinstance(value, bool))):
        raise ConfigError(f'{owner}.{f.name}={value!r} must be {f.type.__name__}', f.name, f'must be {f.type.__name__}')


C = TypeVar('C', bound='_Config')


class _Config:
    """to_dict / from_dict / validation shared by both configs."""

    def __post_init__(self):
        owner = type(self).__name__
        for f in dataclasses.fields(self):
            if f.name != 'patch_nums':
                _check_field(owner, f, getattr(self, f.name))
        object.__setattr__(self, 'patch_nums', _check_patch_nums(owner, self.patch_nums))
        self._check()

    def _check(self) -> None:
        pass

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON values (the scale list as a list), in field order."""
        return {f.name: list(v) if isinstance(v, tuple) else v for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_dict(cls: Type[C], d: Mapping[str, Any]) -> C:
        """The config of `d` (as written by to_dict); every field must be there and nothing else."""
        if not isinstance(d, Mapping):
            raise ConfigError(f'{cls.__name__}: expected a dict of its fields, got {type(d).__name__}')
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        missing = [k for k in names if k not in d]
        if unknown or missing:
            parts = ([f'unknown keys {unknown}'] if unknown else []) + ([f'missing keys {missing}'] if missing else [])
            raise ConfigError(f'{cls.__name__}: {" and ".join(parts)}; its keys are {names}')
        return cls(**d)


def _require(owner: str, name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ConfigError(f'{owner}.{name}={value!r}: {allowed}', name, allowed)


@dataclass(frozen=True)
class VQVAEConfig(_Config):
    """The multi-scale VQVAE tokenizer; the defaults are the published tokenizer (PUBLISHED_VAE) at 256 px."""
    V: int = 4096                  # codebook size (vocabulary of VAR)
    Cvae: int = 32                 # latent channels
    ch: int = 160                  # base width of the encoder and decoder
    share_quant_resi: int = 4      # number of φ convs shared across the scales (0: one per scale)
    quant_resi: float = 0.5        # φ(x) = quant_resi·conv(x) + (1 - quant_resi)·x
    using_znorm: bool = False      # nearest code by cosine similarity instead of L2 distance
    patch_nums: Tuple[int, ...] = PATCH_NUMS_256   # side of every scale's token map

    def _check(self) -> None:
        me = type(self).__name__
        for name in ('V', 'Cvae'):
            _require(me, name, getattr(self, name), getattr(self, name) >= 1, 'must be >= 1')
        _require(me, 'ch', self.ch, self.ch >= 32 and self.ch % 32 == 0, 'must be a positive multiple of 32 (GroupNorm with 32 groups)')
        _require(me, 'share_quant_resi', self.share_quant_resi, self.share_quant_resi >= 0, 'must be >= 0')


@dataclass(frozen=True)
class VARConfig(_Config):
    """The VAR transformer: width 64·depth, depth heads, stochastic depth 0.1·depth/24 (the reference's rules)."""
    depth: int = 16
    num_classes: int = 1000
    shared_aln: bool = False       # one AdaLN projection shared by all blocks (the 512 px d36)
    attn_l2_norm: bool = True      # L2-normalised queries and keys with a learned scale
    patch_nums: Tuple[int, ...] = PATCH_NUMS_256   # must equal the tokenizer's

    @classmethod
    def published(cls, depth: int) -> 'VARConfig':
        """The config of var_d{depth}.pth (PUBLISHED): d16, d20, d24 and d30 at 256 px; d36 at 512 px with a shared AdaLN."""
        if depth not in PUBLISHED_DEPTHS:
            raise ConfigError(f'there is no published VAR of depth {depth}: the published depths are {list(PUBLISHED_DEPTHS)}')
        return PUBLISHED[published_var_file(depth)].var

    def _check(self) -> None:
        me = type(self).__name__
        _require(me, 'depth', self.depth, self.depth >= 1, 'must be >= 1')
        _require(me, 'num_classes', self.num_classes, self.num_classes >= 1, 'must be >= 1')

    @property
    def width(self) -> int:
        return 64 * self.depth

    @property
    def num_heads(self) -> int:
        return self.depth

    @property
    def drop_path_rate(self) -> float:
        return 0.1 * self.depth / 24



def check_scales(var: VARConfig, tokenizer_patch_nums) -> None:
    """A VAR's scales must be its tokenizer's; ConfigError otherwise."""
    if tuple(var.patch_nums) != tuple(tokenizer_patch_nums):
        raise ConfigError(f'VARConfig.patch_nums={var.patch_nums} differ from the tokenizer\'s {tuple(tokenizer_patch_nums)}')


def configs_to_dict(vqvae: VQVAEConfig, var: VARConfig) -> Dict[str, Dict[str, Any]]:
    """What a checkpoint stores under 'model_config': {'vqvae': {...}, 'var': {...}}."""
    return {'vqvae': vqvae.to_dict(), 'var': var.to_dict()}


def configs_from_dict(d: Mapping[str, Any]) -> Tuple[VQVAEConfig, VARConfig]:
    """The two configs of a checkpoint's 'model_config' (configs_to_dict's layout, strictly)."""
    if not isinstance(d, Mapping) or set(d) != {'vqvae', 'var'}:
        got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
        raise ConfigError(f"model_config must have exactly the keys ['var', 'vqvae'], got {got}")
    return VQVAEConfig.from_dict(d['vqvae']), VARConfig.from_dict(d['var'])


# ------------------------------------------------------------------ the classes' build arguments (config.json)
# config field -> argument of VQVAE(...) / VAR(...), the names PyTorchModelHubMixin records in a saved folder's config.json
VQVAE_BUILD_ARGS = {'V': 'vocab_size', 'Cvae': 'z_channels', 'ch': 'ch', 'share_quant_resi': 'share_quant_resi',
                    'quant_resi': 'quant_resi', 'using_znorm': 'using_znorm', 'patch_nums': 'v_patch_nums'}
VAR_BUILD_ARGS = {'depth': 'depth', 'num_classes': 'num_classes', 'shared_aln': 'shared_aln', 'attn_l2_norm': 'attn_l2_norm',
                  'patch_nums': 'patch_nums'}


def vqvae_build_args(cfg: VQVAEConfig) -> Dict[str, Any]:
    """VQVAE(**these) is the tokenizer of `cfg` (its other arguments keep their defaults)."""
    return {arg: getattr(cfg, field) for field, arg in VQVAE_BUILD_ARGS.items()}


def var_build_args(cfg: VARConfig) -> Dict[str, Any]:
    """VAR(vae_local, **these) is the transformer of `cfg`: the table's fields, and what the reference derives from the
    depth (width, heads, stochastic depth) with its fixed rates; the kernel switches keep their defaults."""
    return {**{arg: getattr(cfg, field) for field, arg in VAR_BUILD_ARGS.items()},
            'embed_dim': cfg.width, 'num_heads': cfg.num_heads, 'drop_rate': 0., 'attn_drop_rate': 0.,
            'drop_path_rate': cfg.drop_path_rate, 'norm_eps': 1e-6, 'cond_drop_rate': 0.1}


def _config_from_args(cls: Type[C], table: Mapping[str, str], args: Mapping[str, Any]) -> C:
    missing = [arg for arg in table.values() if arg not in args]
    if missing:
        raise ConfigError(f'{cls.__name__}: the build arguments lack {missing}')
    return cls(**{field: tuple(args[arg]) if field == 'patch_nums' else args[arg] for field, arg in table.items()})


def vqvae_config_from_build_args(args: Mapping[str, Any]) -> VQVAEConfig:
    """The config of VQVAE build arguments (every argument of VQVAE_BUILD_ARGS given; others are not read)."""
    return _config_from_args(VQVAEConfig, VQVAE_BUILD_ARGS, args)


def var_config_from_build_args(args: Mapping[str, Any]) -> VARConfig:
    """The config of VAR build arguments (every argument of VAR_BUILD_ARGS given; the derived ones are not read: whoever
    needs them to match compares with var_build_args of the result)."""
    return _config_from_args(VARConfig, VAR_BUILD_ARGS, args)


# ------------------------------------------------------------------ build_vae_var's keywords (models/build.py)
# the reference's builder: keyword -> (config, field). It builds the tokenizer with the default quant_resi and using_znorm.
VAE_VAR_KWARGS = {'patch_nums': ('var', 'patch_nums'), 'V': ('vqvae', 'V'), 'Cvae': ('vqvae', 'Cvae'), 'ch': ('vqvae', 'ch'),
                  'share_quant_resi': ('vqvae', 'share_quant_resi'), 'num_classes': ('var', 'num_classes'),
                  'depth': ('var', 'depth'), 'shared_aln': ('var', 'shared_aln'), 'attn_l2_norm': ('var', 'attn_l2_norm')}
# its other keywords (besides device): which kernels run and how fresh weights are drawn, not the model's shape
VAE_VAR_RUNTIME_KWARGS = ('flash_if_available', 'fused_if_available', 'init_adaln', 'init_adaln_gamma', 'init_head', 'init_std')


def vae_var_kwargs(vqvae: VQVAEConfig, var: VARConfig) -> Dict[str, Any]:
    """The build_vae_var keywords (besides device and the runtime ones) of these two configs."""
    plain = VQVAEConfig()
    if (vqvae.quant_resi, vqvae.using_znorm) != (plain.quant_resi, plain.using_znorm):
        raise ConfigError(f'build_vae_var builds the tokenizer with quant_resi={plain.quant_resi}, using_znorm={plain.using_znorm}; '
                          f'this one has quant_resi={vqvae.quant_resi}, using_znorm={vqvae.using_znorm}: build it with build_vqvae')
    if vqvae.patch_nums != var.patch_nums:
        raise ConfigError(f'the tokenizer\'s patch_nums {vqvae.patch_nums} differ from the VAR\'s {var.patch_nums}')
    both = {'vqvae': vqvae, 'var': var}
    return {kw: getattr(both[owner], field) for kw, (owner, field) in VAE_VAR_KWARGS.items()}


def configs_from_vae_var_kwargs(kwargs: Mapping[str, Any]) -> Tuple[VQVAEConfig, VARConfig]:
    """(tokenizer, VAR) configs of build_vae_var keywords (the shape ones; absent ones keep the configs' defaults, the
    scales go to both)."""
    unknown = sorted(set(kwargs) - set(VAE_VAR_KWARGS))
    if unknown:
        raise ConfigError(f'{", ".join(unknown)}: not build_vae_var keywords of the model\'s shape (known: {", ".join(VAE_VAR_KWARGS)})')
    fields = {'vqvae': {}, 'var': {}}
    for kw, value in kwargs.items():
        owner, field = VAE_VAR_KWARGS[kw]
        fields[owner][field] = tuple(value) if field == 'patch_nums' else value
    if 'patch_nums' in fields['var']:
        fields['vqvae']['patch_nums'] = fields['var']['patch_nums']
    return VQVAEConfig(**fields['vqvae']), VARConfig(**fields['var'])


# ------------------------------------------------------------------ the published models
HF_REPO = 'FoundationVision/var'   # the Hugging Face repo of the published weights


@dataclass(frozen=True)
class Published:
    """One published weights file of HF_REPO: its kind ('vae': the tokenizer, 'var': a transformer) and the configs it
    is built with (the tokenizer's file goes with the 256 px d16)."""
    filename: str
    kind: str
    vqvae: VQVAEConfig
    var: VARConfig


def published_var_file(depth: int) -> str:
    """The published file of the VAR of `depth`: var_d{depth}.pth."""
    return f'var_d{depth}.pth'


def _published_var(depth: int) -> Published:
    patch_nums = PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256   # d36 is the 512 px model, with a shared AdaLN
    return Published(published_var_file(depth), 'var', VQVAEConfig(patch_nums=patch_nums),
                     VARConfig(depth=depth, shared_aln=depth == 36, patch_nums=patch_nums))


PUBLISHED_VAE = 'vae_ch160v4096z32.pth'   # the tokenizer of all five VARs
PUBLISHED: Dict[str, Published] = {
    PUBLISHED_VAE: Published(PUBLISHED_VAE, 'vae', VQVAEConfig(), VARConfig()),
    **{p.filename: p for p in map(_published_var, (16, 20, 24, 30, 36))},
}
PUBLISHED_DEPTHS = tuple(p.var.depth for p in PUBLISHED.values() if p.kind == 'var')


def published_configs(filename: str) -> Tuple[VQVAEConfig, VARConfig]:
    """(tokenizer, VAR) configs of a published file (PUBLISHED's name)."""
    return PUBLISHED[filename].vqvae, PUBLISHED[filename].var


def published_build_kwargs(filename: str) -> Dict[str, Any]:
    """build_vae_var keywords (besides device) of a published file, tokenizer and 1000 classes included."""
    return vae_var_kwargs(*published_configs(filename))
