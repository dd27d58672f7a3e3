"""What train-sam's engine wraps: SAM's prompt encoder and mask decoder (and its image encoder
unless the embeddings are cached), MONAI's DiceCELoss on the low-res logits, the Dice metric,
and the peft LoRA adapters of mode lora."""

from __future__ import annotations

import torch

from sonosynth.trainers.sam.config import SamLoraConfig, SamLossConfig
from sonosynth.trainers.sam.models import embed, sam_forward


def batch_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image Dice [B] of the thresholded logits (MONAI ``compute_dice``; both empty: 1)."""
    from monai.metrics import compute_dice

    pred = (logits.float() > 0).float()
    return compute_dice(pred, target.float(), include_background=True, ignore_empty=False)[:, 0]


class SamTrainModule(torch.nn.Module):
    """What DeepSpeed wraps: SAM's prompt encoder and mask decoder, and the image encoder unless
    the embeddings are cached. Its state dict has ``Sam``'s key names."""

    def __init__(self, sam, *, with_encoder: bool, encoder_grad: bool, loss: SamLossConfig):
        from monai.losses import DiceCELoss

        super().__init__()
        self.image_encoder = sam.image_encoder if with_encoder else None
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder
        self.encoder_grad = encoder_grad
        self.loss = DiceCELoss(sigmoid=True, squared_pred=True, lambda_dice=loss.dice_weight,
                               lambda_ce=loss.ce_weight)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Low-res mask logits [B, 1, L, L]."""
        emb = batch.get("embedding")
        if emb is None:
            if self.image_encoder is None:
                raise ValueError("this module was built for cached embeddings and the batch has none")
            dtype = self.image_encoder.patch_embed.proj.weight.dtype
            emb = embed(self, batch["image"].to(dtype), grad=self.encoder_grad)
        return sam_forward(self, None, batch["box"], image_embeddings=emb)

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        logits = self.logits(batch).float()
        target = batch["target"].float()
        loss = self.loss(logits, target)
        with torch.no_grad():
            dice = batch_dice(logits, target).mean()
        return loss, {"dice": dice}


def add_encoder_lora(image_encoder: torch.nn.Module, cfg: SamLoraConfig, seed: int) -> None:
    """peft LoRA adapters on the image encoder's attention, in place; only they train in it."""
    from peft import LoraConfig, inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the same adapters on every rank and every run
        inject_adapter_in_model(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha or cfg.rank, lora_dropout=cfg.dropout,
                                           target_modules=list(cfg.target_modules)), image_encoder)
    for name, p in image_encoder.named_parameters():
        p.requires_grad_("lora_" in name)
