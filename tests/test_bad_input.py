"""Every public loss op refuses bad input at its boundary with a ValueError/TypeError naming the
argument (the attention ops' cases are in test_attention.py). Each row: call, error, message."""
import pytest
import torch
import torch.nn.functional as F

import alignclip_kernels as ak

B, P, E, K = 2, 5, 8, 3
tok = torch.randn(B, P, E)
text = F.normalize(torch.randn(K, E), dim=-1)
labels = torch.tensor([0, 2])
cls = torch.softmax(torch.randn(2, B, 2, P + 1), -1)
target = torch.softmax(torch.randn(B, P), -1)
dist = ak.class_distribution(text)
meta = torch.empty(B, P, E, device="meta")

CASES = {
    # token_text_target
    "target tokens rank": (lambda: ak.token_text_target(tok[0], text, labels), ValueError, "tokens must have shape \\[B, P, E\\]"),
    "target text rank": (lambda: ak.token_text_target(tok, text[None], labels), ValueError, "text must have shape \\[K, E\\]"),
    "target width": (lambda: ak.token_text_target(tok, text[:, :4], labels), ValueError, "text: width E"),
    "target int tokens": (lambda: ak.token_text_target(tok.long(), text, labels), TypeError, "tokens must be a floating"),
    "target dtype mix": (lambda: ak.token_text_target(tok, text.half(), labels), TypeError, "text has dtype"),
    "target device mix": (lambda: ak.token_text_target(meta, text, labels), ValueError, "text is on cpu but tokens is on meta"),
    "target float labels": (lambda: ak.token_text_target(tok, text, labels.float()), TypeError, "labels must be an integer"),
    "target labels list": (lambda: ak.token_text_target(tok, text, [0, 1]), TypeError, "labels must be an int64 torch.Tensor"),
    "target label range": (lambda: ak.token_text_target(tok, text, torch.tensor([0, 3])), ValueError, "labels must hold class indices in \\[0, 3\\)"),
    "target negative label": (lambda: ak.token_text_target(tok, text, torch.tensor([-1, 0])), ValueError, "labels must hold class indices"),
    "target labels length": (lambda: ak.token_text_target(tok, text, labels[:1]), ValueError, "labels must have shape \\[B\\]"),
    "target temperature 0": (lambda: ak.token_text_target(tok, text, labels, temperature=0.0), ValueError, "temperature must be finite and > 0"),
    "target temperature inf": (lambda: ak.token_text_target(tok, text, labels, temperature=float("inf")), ValueError, "temperature"),
    "target temperature nan": (lambda: ak.token_text_target(tok, text, labels, temperature=float("nan")), ValueError, "temperature"),
    "target temperature str": (lambda: ak.token_text_target(tok, text, labels, temperature="1"), TypeError, "temperature must be a real number"),
    # aal_kl_loss
    "aal rank": (lambda: ak.aal_kl_loss(cls[0], target), ValueError, "cls_attn must have shape \\[L, B, H, N\\]"),
    "aal target shape": (lambda: ak.aal_kl_loss(cls, torch.softmax(torch.randn(B, P + 1), -1)), ValueError, "target must have shape \\[B, N-1\\]"),
    "aal batch mismatch": (lambda: ak.aal_kl_loss(cls, target[:1]), ValueError, "target must have shape"),
    "aal no patches": (lambda: ak.aal_kl_loss(cls[..., :1], target[:, :0]), ValueError, "N >= 2"),
    "aal int attn": (lambda: ak.aal_kl_loss(cls.long(), target), TypeError, "cls_attn must be a floating"),
    "aal device mix": (lambda: ak.aal_kl_loss(cls, target.to("meta")), ValueError, "target is on meta"),
    # similarity_align_loss
    "sim tokens_dv shape": (lambda: ak.similarity_align_loss(tok, tok[:, :3], text), ValueError, "tokens_dv must have the shape of tokens"),
    "sim text width": (lambda: ak.similarity_align_loss(tok, tok, text[:, :4]), ValueError, "text: width E"),
    "sim no classes": (lambda: ak.similarity_align_loss(tok, tok, text[:0]), ValueError, "must be non-empty"),
    "sim dtype mix": (lambda: ak.similarity_align_loss(tok, tok.double(), text), TypeError, "tokens_dv has dtype"),
    "sim rank": (lambda: ak.similarity_align_loss(tok[0], tok[0], text), ValueError, "tokens must have shape"),
    "sim not a tensor": (lambda: ak.similarity_align_loss(tok, tok.tolist(), text), TypeError, "tokens_dv must be a torch.Tensor"),
    # sls_mms_loss
    "sls features rank": (lambda: ak.sls_mms_loss(tok, text, labels, dist), ValueError, "image_features must have shape \\[B, E\\]"),
    "sls dist shape": (lambda: ak.sls_mms_loss(tok[:, 0], text, labels, dist[:2]), ValueError, "class_dist must have shape \\[K, K\\]"),
    "sls label range": (lambda: ak.sls_mms_loss(tok[:, 0], text, torch.tensor([5, 0]), dist), ValueError, "labels must hold class indices"),
    "sls int labels dtype": (lambda: ak.sls_mms_loss(tok[:, 0], text, labels.to(torch.uint8), dist), TypeError, "labels must be an integer"),
    "sls logit_scale 0": (lambda: ak.sls_mms_loss(tok[:, 0], text, labels, dist, logit_scale=0.0), ValueError, "logit_scale must be finite and > 0"),
    "sls logit_scale inf": (lambda: ak.sls_mms_loss(tok[:, 0], text, labels, dist, logit_scale=float("inf")), ValueError, "logit_scale"),
    "sls alpha nan": (lambda: ak.sls_mms_loss(tok[:, 0], text, labels, dist, alpha=float("nan")), ValueError, "alpha must be finite"),
    "sls epsilon inf": (lambda: ak.sls_mms_loss(tok[:, 0], text, labels, dist, epsilon=float("inf")), ValueError, "epsilon must be finite"),
    "sls width": (lambda: ak.sls_mms_loss(tok[:, 0], text[:, :4], labels, dist), ValueError, "text: width E"),
    "sls dtype mix": (lambda: ak.sls_mms_loss(tok[:, 0].half(), text, labels, dist), TypeError, "text has dtype"),
    # class_distribution
    "dist rank": (lambda: ak.class_distribution(text[0]), ValueError, "text must have shape \\[K, E\\]"),
    "dist smoothing": (lambda: ak.class_distribution(text, smoothing=0.0), ValueError, "smoothing must be finite and > 0"),
    "dist int": (lambda: ak.class_distribution(text.long()), TypeError, "text must be a floating"),
    "dist empty": (lambda: ak.class_distribution(text[:0]), ValueError, "K, E >= 1"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_by_name(case):
    call, exc, match = CASES[case]
    with pytest.raises(exc, match=match):
        call()
