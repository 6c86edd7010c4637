"""hydravit: one Vision Transformer, many sizes (HydraViT, NeurIPS'24), built on timm."""
from .export import export_subnetwork, save_subnetwork, subnetwork_state_dict, subnetwork_vit_args
from .model import HydraViT, hydravit_dyn_patch4_32, hydravit_dyn_patch16_224

__version__ = '0.1.0'

__all__ = [
    'HydraViT', 'export_subnetwork', 'save_subnetwork', 'subnetwork_state_dict', 'subnetwork_vit_args',
    'hydravit_dyn_patch16_224', 'hydravit_dyn_patch4_32',
]
