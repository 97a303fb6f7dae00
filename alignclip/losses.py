"""The AlignCLIP objective: SLS+MMS + aloss · (AAL + similarity alignment).

    total = sls_mms(CLS of the original path) + aloss · (AAL(cls_attn, G) + similarity_align)

with G computed from the second path's patch tokens inside the fused AAL. `align=False` drops
the alignment terms (SLS+MMS only), `sls=False` the label smoothing (MMS with hard labels);
both off is CLIPood.
"""
from typing import NamedTuple

import torch

import alignclip_kernels
from alignclip_kernels import _checks
from alignclip_kernels.paper import ALIGN_WEIGHT, LABEL_EPSILON, LOGIT_SCALE, MARGIN_ALPHA, SMOOTHING, TEMPERATURE


class LossTerms(NamedTuple):
    total: torch.Tensor
    sls: torch.Tensor
    aal: torch.Tensor
    sim_align: torch.Tensor
    logits: torch.Tensor


class AlignCLIPLoss(torch.nn.Module):
    """The loss terms with the authors' defaults; `text` [K, E] are the normalised class text
    features (`class_dist` is computed from them once). `sls=False` drops the semantic label
    smoothing: hard labels (epsilon 1, no mass on other classes), CLIPood's margin metric
    softmax. `ops` is any module with the public op names (`alignclip_kernels`, or its
    `reference`)."""

    def __init__(self, text, *, alpha=MARGIN_ALPHA, logit_scale=LOGIT_SCALE, epsilon=LABEL_EPSILON,
                 smoothing=SMOOTHING, aloss=ALIGN_WEIGHT, temperature=TEMPERATURE, align=True, sls=True,
                 ops=alignclip_kernels):
        super().__init__()
        self.ops = ops
        text = _checks.tensor("text", text, 2, "[K, E]", floating=False)
        self.register_buffer("text", text.detach().float(), persistent=False)
        sls = _checks.flag("sls", sls)
        dist = ops.class_distribution(self.text, smoothing=smoothing)
        self.register_buffer("class_dist", dist if sls else torch.zeros_like(dist), persistent=False)
        self.alpha = _checks.finite("alpha", alpha)
        self.epsilon = _checks.finite("epsilon", epsilon) if sls else 1.0
        self.logit_scale = _checks.positive_finite("logit_scale", logit_scale)
        self.aloss = _checks.finite("aloss", aloss)
        self.temperature = _checks.positive_finite("temperature", temperature)
        self.align = _checks.flag("align", align)
        self._text_cast = {}

    def _text_as(self, dtype):
        """The text features in the tokens' dtype, cast once per dtype, not every step."""
        key = (dtype, self.text.device)
        if key not in self._text_cast:
            self._text_cast = {key: self.text.to(dtype)}
        return self._text_cast[key]

    def forward(self, out, labels):
        # The SLS logits are scaled by 100: keep them in fp32 (a [B, E] cast), whatever autocast did.
        image_features = out.tokens[:, 0].float()
        sls, logits = self.ops.sls_mms_loss(image_features, self.text, labels, self.class_dist,
                                            alpha=self.alpha, logit_scale=self.logit_scale,
                                            epsilon=self.epsilon)
        zero = sls.new_zeros(())
        if not self.align:
            return LossTerms(sls, sls, zero, zero, logits)
        patches, patches_dv = out.tokens[:, 1:], out.tokens_dv[:, 1:]
        text = self._text_as(patches.dtype)
        sim = self.ops.similarity_align_loss(patches, patches_dv, text)
        aal = zero
        if out.cls_attn is not None:
            aal = self.ops.aal_loss(out.cls_attn, patches_dv, text, labels, temperature=self.temperature)
        return LossTerms(sls + self.aloss * (aal + sim), sls, aal, sim, logits)
