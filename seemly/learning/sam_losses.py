"""SAM's training losses on the decoder's low-resolution output.

SAM supervises masks with focal + dice loss (20 : 1) and its IoU head with the mean squared error
between the predicted and the actual IoU of each mask (Kirillov et al. 2023, appendix A). Here they
are taken on the decoder's own low-resolution logits (4 x the embedding grid: 256 x 256 for every
official SAM), against the ground truth area-averaged into that frame, and only over the pixels of
the image (SAM pads its square input frame; the padding is never served). MedSAM does the same: it
costs a fraction of up-sampling every mask to the image's resolution.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch.nn import functional as F

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0


def low_res_target(gt: np.ndarray, img_size: int, low_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(target, valid)`` ``h x w`` float32 maps in the decoder's output frame for a mask of the
    resized image (top-left of SAM's padded ``img_size`` square): the object's share of each output
    pixel, and 1 where the output pixel lies (mostly) on the image rather than on the padding."""
    height, width = gt.shape
    frame = np.zeros((img_size, img_size), dtype=np.float32)
    frame[:height, :width] = gt
    target = cv2.resize(frame, (low_size[1], low_size[0]), interpolation=cv2.INTER_AREA)
    frame[:] = 0.0
    frame[:height, :width] = 1.0
    valid = cv2.resize(frame, (low_size[1], low_size[0]), interpolation=cv2.INTER_AREA) > 0.5
    return target.astype(np.float32), valid.astype(np.float32)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sigmoid focal loss (RetinaNet's alpha 0.25, gamma 2) per mask, averaged over valid pixels.

    ``logits`` ``S x C x h x w``; ``target`` ``S x 1 x h x w`` (soft); ``valid`` ``1 x 1 x h x w``."""
    prob = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits), reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)
    loss = alpha_t * ce * (1 - p_t) ** FOCAL_GAMMA
    return (loss * valid).sum(dim=(2, 3)) / valid.sum().clamp_min(1.0)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``1 - soft Dice`` per mask over valid pixels (shapes as :func:`focal_loss`)."""
    prob = torch.sigmoid(logits) * valid
    t = target * valid
    inter = (prob * t).sum(dim=(2, 3))
    return 1.0 - (2 * inter + 1.0) / (prob.sum(dim=(2, 3)) + t.sum(dim=(2, 3)) + 1.0)


def mask_iou(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """IoU of each thresholded mask (logit > 0) with the ground truth (share > 0.5), per mask."""
    pred = (logits > 0).float() * valid
    gt = (target > 0.5).float() * valid
    inter = (pred * gt).sum(dim=(2, 3))
    union = (pred + gt - pred * gt).sum(dim=(2, 3))
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def sam_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    *,
    focal_weight: float = 20.0,
    dice_weight: float = 1.0,
    iou_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, actual IoU S x C)``: the best of the ``C`` outputs' mask losses (SAM's min over its
    three candidates; ``C = 1`` for a single output) averaged over the batch, plus ``iou_weight`` x
    the MSE of every output's predicted IoU against its actual IoU."""
    per_mask = focal_weight * focal_loss(logits, target, valid) + dice_weight * dice_loss(
        logits, target, valid
    )
    actual = mask_iou(logits.detach(), target, valid)
    best = per_mask.argmin(dim=1, keepdim=True)
    loss = per_mask.gather(1, best).mean()
    if iou_weight > 0:
        loss = loss + iou_weight * F.mse_loss(iou_pred, actual)
    return loss, actual
