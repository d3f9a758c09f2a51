"""VAR models: the multi-scale VQVAE tokenizer, the VAR transformer, their configs and builders, and the pieces of sampling."""
from .build import build_vae_var, build_var, build_vqvae
from .config import PATCH_NUMS_256, PATCH_NUMS_512, VARConfig, VQVAEConfig
from .helpers import make_edit_mask
from .pretrained import HubPushError, PretrainedError, load_pretrained
from .quant import VectorQuantizer2
from .sampling import GumbelSmoothing, KeepInputTokens, LinearGuidance, ScaleDraw, TokenDraw, TopKTopP, sample_next_scale
from .state_dict import CheckpointMismatchError
from .var import VAR
from .vqvae import VQVAE

__all__ = ['build_vae_var', 'VQVAEConfig', 'VARConfig', 'build_vqvae', 'build_var', 'PATCH_NUMS_256', 'PATCH_NUMS_512',
           'VQVAE', 'VAR', 'VectorQuantizer2', 'make_edit_mask', 'CheckpointMismatchError', 'sample_next_scale',
           'LinearGuidance', 'TopKTopP', 'GumbelSmoothing', 'KeepInputTokens', 'ScaleDraw', 'TokenDraw',
           'load_pretrained', 'PretrainedError', 'HubPushError']
