"""The AlignCLIP objective (SPEC.md section 8): SLS+MMS + aloss · (AAL + similarity alignment)."""
from typing import NamedTuple

import torch

import alignclip_kernels


class LossTerms(NamedTuple):
    total: torch.Tensor
    sls: torch.Tensor
    aal: torch.Tensor
    sim_align: torch.Tensor
    logits: torch.Tensor


class AlignCLIPLoss(torch.nn.Module):
    """Combines the terms with the authors' defaults; `align=False` is CLIPood (SLS+MMS only).

    `text` [K, E] are the normalised class text features; `class_dist` is computed from them once.
    `ops` is any module with the public op names (`alignclip_kernels`, or its `reference`).
    """

    def __init__(self, text, *, alpha=0.3, logit_scale=100.0, epsilon=0.9, smoothing=35.0,
                 aloss=10.0, temperature=1.0, align=True, ops=alignclip_kernels):
        super().__init__()
        self.ops = ops
        self.register_buffer("text", text.detach().float(), persistent=False)
        self.register_buffer("class_dist", ops.class_distribution(self.text, smoothing=smoothing),
                             persistent=False)
        self.alpha, self.logit_scale, self.epsilon = alpha, logit_scale, epsilon
        self.aloss, self.temperature, self.align = aloss, temperature, align

    def _text_as(self, dtype):
        """The text features in the tokens' dtype, cast once per dtype and device, not per step."""
        key = (dtype, self.text.device)
        if getattr(self, "_cast", (None, None))[0] != key:
            self._cast = (key, self.text.to(dtype))
        return self._cast[1]

    def forward(self, out, labels):
        # The SLS logits are scaled by 100: keep them in fp32 (a [B, E] cast), whatever autocast did.
        image_features = out.tokens[:, 0].float()
        sls, logits = self.ops.sls_mms_loss(image_features, self.text, labels, self.class_dist,
                                   alpha=self.alpha, logit_scale=self.logit_scale, epsilon=self.epsilon)
        zero = sls.new_zeros(())
        if not self.align:
            return LossTerms(sls, sls, zero, zero, logits)
        patches, patches_dv = out.tokens[:, 1:], out.tokens_dv[:, 1:]
        text = self._text_as(patches.dtype)
        sim = self.ops.similarity_align_loss(patches, patches_dv, text)
        aal = zero
        if out.cls_attn is not None:
            target = self.ops.token_text_target(patches_dv, text, labels, temperature=self.temperature)
            aal = self.ops.aal_kl_loss(out.cls_attn, target)
        return LossTerms(sls + self.aloss * (aal + sim), sls, aal, sim, logits)
