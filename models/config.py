"""Typed model configs: the tokenizer's and the transformer's shape, their published presets, and one builder each.

    vae = build_vqvae(VQVAEConfig())                        # the published tokenizer (vae_ch160v4096z32.pth)
    var = build_var(VARConfig.published(16), vae)           # var_d16.pth; d36 needs VQVAEConfig(patch_nums=PATCH_NUMS_512)

A config is a frozen dataclass; `to_dict()` / `from_dict()` give plain JSON (what a checkpoint stores under
'model_config'), and `from_dict` refuses unknown or missing keys. The CLI flags map onto these fields in
utils/arg_util.py (`var_config_from_flags` and its three siblings), nowhere else.
"""
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Type, TypeVar, Union

import torch

__all__ = ['ConfigError', 'PATCH_NUMS_256', 'PATCH_NUMS_512', 'PUBLISHED_DEPTHS', 'VQVAEConfig', 'VARConfig',
           'build_vqvae', 'build_var', 'vae_var_kwargs', 'configs_to_dict', 'configs_from_dict']

# the side of every scale's token map: 10 scales for 256 px and for 512 px images (the tokenizer downsamples by 16)
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
PUBLISHED_DEPTHS = (16, 20, 24, 30, 36)   # var_d{depth}.pth in FoundationVision/var; d36 is the 512 px model


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
    """The multi-scale VQVAE tokenizer; the defaults are the published vae_ch160v4096z32.pth at 256 px."""
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
        """var_d{depth}.pth: d16, d20, d24 and d30 at 256 px; d36 at 512 px with a shared AdaLN."""
        if depth not in PUBLISHED_DEPTHS:
            raise ConfigError(f'there is no published VAR of depth {depth}: the published depths are {list(PUBLISHED_DEPTHS)}')
        return cls(depth=depth, shared_aln=depth == 36, patch_nums=PATCH_NUMS_512 if depth == 36 else PATCH_NUMS_256)

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


def _on(device: Optional[Union[str, torch.device]]):
    return contextlib.nullcontext() if device is None else torch.device(device)


def build_vqvae(cfg: VQVAEConfig, device: Optional[Union[str, torch.device]] = None, test_mode: bool = True,
                beta: float = 0.25):
    """The tokenizer of `cfg` on `device` (None: the default device). test_mode: frozen, in eval mode (for VAR);
    beta: the commitment weight of its training loss."""
    from .vqvae import VQVAE
    with _on(device):
        return VQVAE(vocab_size=cfg.V, z_channels=cfg.Cvae, ch=cfg.ch, beta=beta, using_znorm=cfg.using_znorm, quant_resi=cfg.quant_resi,
                     share_quant_resi=cfg.share_quant_resi, v_patch_nums=cfg.patch_nums, test_mode=test_mode)


def build_var(cfg: VARConfig, vae, device: Optional[Union[str, torch.device]] = None,
              flash_if_available: bool = True, fused_if_available: bool = True,
              init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1):
    """The VAR of `cfg` over the tokenizer `vae`, on `device` (None: the tokenizer's), initialised (init_std < 0:
    automated) unless on the meta device. Its scales must be the tokenizer's."""
    from .var import VAR
    if tuple(cfg.patch_nums) != tuple(vae.quantize.v_patch_nums):
        raise ConfigError(f'VARConfig.patch_nums={cfg.patch_nums} differ from the tokenizer\'s {tuple(vae.quantize.v_patch_nums)}')
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    with torch.device(device):
        var = VAR(vae_local=vae, num_classes=cfg.num_classes, depth=cfg.depth, embed_dim=cfg.width, num_heads=cfg.num_heads,
                  drop_rate=0., attn_drop_rate=0., drop_path_rate=cfg.drop_path_rate, norm_eps=1e-6, shared_aln=cfg.shared_aln,
                  cond_drop_rate=0.1, attn_l2_norm=cfg.attn_l2_norm, patch_nums=cfg.patch_nums,
                  flash_if_available=flash_if_available, fused_if_available=fused_if_available)
    if device.type != 'meta':
        var.init_weights(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head, init_std=init_std)
    return var


def vae_var_kwargs(vqvae: VQVAEConfig, var: VARConfig) -> Dict[str, Any]:
    """The build_vae_var arguments (besides device and kernels) of these two configs."""
    plain = VQVAEConfig()
    if (vqvae.quant_resi, vqvae.using_znorm) != (plain.quant_resi, plain.using_znorm):
        raise ConfigError(f'build_vae_var builds the tokenizer with quant_resi={plain.quant_resi}, using_znorm={plain.using_znorm}; '
                          f'this one has quant_resi={vqvae.quant_resi}, using_znorm={vqvae.using_znorm}: build it with build_vqvae')
    if vqvae.patch_nums != var.patch_nums:
        raise ConfigError(f'the tokenizer\'s patch_nums {vqvae.patch_nums} differ from the VAR\'s {var.patch_nums}')
    return dict(patch_nums=var.patch_nums, V=vqvae.V, Cvae=vqvae.Cvae, ch=vqvae.ch, share_quant_resi=vqvae.share_quant_resi,
                num_classes=var.num_classes, depth=var.depth, shared_aln=var.shared_aln, attn_l2_norm=var.attn_l2_norm)


def configs_to_dict(vqvae: VQVAEConfig, var: VARConfig) -> Dict[str, Dict[str, Any]]:
    """What a checkpoint stores under 'model_config': {'vqvae': {...}, 'var': {...}}."""
    return {'vqvae': vqvae.to_dict(), 'var': var.to_dict()}


def configs_from_dict(d: Mapping[str, Any]) -> Tuple[VQVAEConfig, VARConfig]:
    """The two configs of a checkpoint's 'model_config' (configs_to_dict's layout, strictly)."""
    if not isinstance(d, Mapping) or set(d) != {'vqvae', 'var'}:
        got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
        raise ConfigError(f"model_config must have exactly the keys ['var', 'vqvae'], got {got}")
    return VQVAEConfig.from_dict(d['vqvae']), VARConfig.from_dict(d['var'])
