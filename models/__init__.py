"""The pure-PyTorch core: configs, networks, the Disentangler inference API and checkpoint IO.

Imports nothing from `app` or `training`; both of those build on this package.
"""
from .checkpoint import CheckpointError, load, read_card, resolve_device, save
from .config import PRESETS, ModelConfig, preset
from .disentangler import SPACES, Codes, Disentangler, Edit
from .networks import Decoder, Encoder, LatentDiscriminator

__all__ = [
    "CheckpointError", "Codes", "Decoder", "Disentangler", "Edit", "Encoder", "LatentDiscriminator", "ModelConfig",
    "PRESETS", "SPACES", "load", "preset", "read_card", "resolve_device", "save",
]
