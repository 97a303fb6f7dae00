"""alignclip-kernels: fused Triton ops for AlignCLIP training (the contract: docs/contract.md).

Every op runs its Triton kernels on CUDA and under `TRITON_INTERPRET=1` on the CPU, and a
PyTorch path with the same semantics anywhere else; `backend(device)` says which.
"""
from ._runtime import backend
from .aal import aal_kl_loss, aal_loss
from .attention import dual_attention, fused_alignclip_attention, split_qkv
from .attention_choice import attention_choices
from .pixels import pixel_transform
from .similarity_align import similarity_align_loss
from .sls_mms import class_distribution, sls_mms_loss
from .token_text_target import token_text_target

__all__ = [
    "aal_kl_loss",
    "aal_loss",
    "attention_choices",
    "backend",
    "class_distribution",
    "dual_attention",
    "fused_alignclip_attention",
    "pixel_transform",
    "similarity_align_loss",
    "sls_mms_loss",
    "split_qkv",
    "token_text_target",
]
