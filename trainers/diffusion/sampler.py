"""The sampler: base model + fused LoRA (+ a ControlNet), turning batches of sample specs into images.

``Sampler`` loads everything once (a Ray actor builds one in ``__init__``) and is called
with a batch of ``SampleSpec``; each spec carries its own seed, so an image depends on its
spec alone, never on which batch or worker drew it. The LoRA comes from a folder (local or
``s3://``) or MLflow (``models:/sonosynth-lora@champion``, ``models:/sonosynth-lora/3``,
``runs:/<run id>/model``); its ``lineage.json`` supplies the mode, prompts, resolution and
clip-skip it was trained with. Its weights are checked to be safetensors before use
(``check_lora_weights``) and loaded as safetensors only: a pickle is never unpickled.

With a ControlNet (mask mode: the folder ``train-controlnet`` exports, fetched the same ways)
the same base components, LoRA fused, become a ``StableDiffusionControlNetPipeline`` and each
spec carries its conditioning mask (HxW uint8 at the sampling resolution), turned into the
conditioning image by ``trainers.controlnet.conditioning.mask_to_condition``, the trainer's own
function. The ControlNet's lineage.json gives the resolution, prompt and clip skip it was
trained with (they win over the LoRA's).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import model_validator

from sonosynth.infra.config import Config
from sonosynth.trainers.diffusion.lora import LORA_FOLDER, WEIGHTS_NAME, LoraFileError, check_lora_weights
from sonosynth.trainers.diffusion.models import DiffusionModelConfig, build_pipeline
from sonosynth.trainers.precision import resolve_precision

SCHEDULERS = {
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
}


class SamplerConfig(Config):
    """Base model, LoRA and sampling settings of the generation workers."""

    model: DiffusionModelConfig = DiffusionModelConfig()
    """Base model: must be the one the LoRA was trained on (lineage.json says which)."""
    lora: str | None = None
    """LoRA folder (local or s3://) or MLflow URI (models:/sonosynth-lora@champion). Null: base model."""
    lora_scale: float = 1.0
    """Strength of the fused LoRA (paper A: 0.9)."""
    controlnet: str | None = None
    """Mask mode: a ControlNet folder (local or s3://) or MLflow URI (models:/sonosynth-controlnet@champion),
    as ``sonosynth train-controlnet`` exports it. Null: no ControlNet."""
    controlnet_scale: float = 1.0
    """Mask mode: strength of the ControlNet's residuals (diffusers' controlnet_conditioning_scale)."""
    scheduler: Literal["dpm++", "unipc", "ddim", "euler_a"] = "dpm++"
    """Sampler algorithm (paper A: unipc)."""
    steps: int = 25
    """Denoising steps (DPM-Solver++: 20-25; paper A: UniPC 30)."""
    guidance: float = 7.5
    """Classifier-free guidance scale."""
    resolution: int | None = None
    """Output size in pixels (null: the LoRA's training resolution, else 512)."""
    batch_size: int = 8
    """Images per denoising batch on one worker."""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """'auto': fp16 on GPU (bf16 where supported), fp32 on CPU."""
    compile: bool = False
    """torch.compile the UNet (GPU; the first batch pays the compile)."""

    @model_validator(mode="after")
    def _check(self) -> "SamplerConfig":
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be at least 1")
        return self


@dataclass(frozen=True)
class SampleSpec:
    index: int
    attempt: int
    seed: int
    prompt: str
    plane: str | None = None
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)
    """Mask mode: the conditioning mask, HxW uint8 0/255 at the sampling resolution."""
    mask_info: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """Mask mode: where the mask came from and its shape (for meta.json)."""


def fetch_lora(source: str, tracking_uri: str | None = None) -> Path:
    """A local folder holding the LoRA (downloaded from S3 or MLflow when needed), its weights
    checked to be safetensors (a ``LoraFileError`` naming the file otherwise)."""
    from sonosynth.infra.model_registry import fetch_model_folder

    folder = fetch_model_folder(source, tracking_uri, required=WEIGHTS_NAME, what="LoRA",
                                hint="the model/ folder written by `sonosynth train-lora`, or its MLflow model")
    check_lora_weights(folder)
    return folder


def weights_sha256(folder: Path, name: str = WEIGHTS_NAME) -> str:
    """sha256 of the weights file ``name`` in ``folder`` (the LoRA's, by default: its identity in
    lineage and plans)."""
    digest = hashlib.sha256()
    with open(folder / name, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_lora(source: str, tracking_uri: str | None = None) -> tuple[Path, str]:
    """Fetch a LoRA once (on the driver) and hash it: (local folder, sha256 of its weights file).
    Hand both to ``Sampler(..., lora_dir=, lora_sha256=)`` so actors neither download nor hash."""
    folder = fetch_lora(source, tracking_uri)
    return folder, weights_sha256(folder)


def read_lineage(folder: Path | None, fix: str = LORA_FOLDER) -> dict[str, Any]:
    if folder is None or not (folder / "lineage.json").is_file():
        return {}
    try:
        lineage = json.loads((folder / "lineage.json").read_text())
    except (ValueError, OSError) as err:
        raise LoraFileError(f"{folder / 'lineage.json'} is not readable JSON ({err}): {fix}") from None
    if not isinstance(lineage, dict):
        raise LoraFileError(f"{folder / 'lineage.json'} is not a JSON object: {fix}")
    return lineage


CONTROLNET_FOLDER = ("a ControlNet folder holds config.json and diffusion_pytorch_model.safetensors (as "
                     "ControlNetModel.save_pretrained writes them; pickled weights are never loaded) and a "
                     "lineage.json of kind controlnet: the model/ folder of `sonosynth train-controlnet`, or its "
                     "MLflow model (models:/sonosynth-controlnet@champion)")


def resolve_controlnet(source: str, tracking_uri: str | None = None) -> tuple[Path, str]:
    """Fetch a ControlNet once (on the driver), check it and hash it: (local folder, sha256 of its
    weights file). A LoraFileError (exit 1) names what is wrong and the fix."""
    from sonosynth.infra.model_registry import fetch_model_folder
    from sonosynth.trainers.controlnet.conditioning import LINEAGE_KIND
    from sonosynth.trainers.controlnet.conditioning import WEIGHTS_NAME as CONTROLNET_WEIGHTS

    folder = fetch_model_folder(source, tracking_uri, required=CONTROLNET_WEIGHTS, what="ControlNet",
                                hint="the model/ folder of `sonosynth train-controlnet` (config.json, "
                                     f"{CONTROLNET_WEIGHTS}, lineage.json), or its MLflow model "
                                     "(models:/sonosynth-controlnet@champion)")
    check_controlnet(folder)
    kind = read_lineage(folder, CONTROLNET_FOLDER).get("kind", LINEAGE_KIND)
    if kind != LINEAGE_KIND:
        raise LoraFileError(f"{source} is a {kind} model, not a ControlNet (lineage.json kind {kind!r}): "
                            f"{CONTROLNET_FOLDER}")
    return folder, weights_sha256(folder, CONTROLNET_WEIGHTS)


def check_controlnet(folder: Path) -> None:
    """The ControlNet's config.json is there and its weights are a whole safetensors file."""
    from safetensors import SafetensorError, safe_open

    from sonosynth.trainers.controlnet.conditioning import WEIGHTS_NAME as CONTROLNET_WEIGHTS

    if not (folder / "config.json").is_file():
        raise LoraFileError(f"{folder} holds no config.json: {CONTROLNET_FOLDER}")
    try:
        with safe_open(str(folder / CONTROLNET_WEIGHTS), framework="pt") as weights:
            if not list(weights.keys()):
                raise ValueError("it holds no tensors")
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraFileError(f"{folder / CONTROLNET_WEIGHTS} is not a readable safetensors file ({err}): "
                            f"{CONTROLNET_FOLDER}") from None


def sampling_resolution(cfg: SamplerConfig, controlnet_lineage: dict[str, Any], lora_lineage: dict[str, Any]) -> int:
    """The square size images are drawn at: the config's, else the ControlNet's, else the LoRA's, else 512."""
    return int(cfg.resolution or controlnet_lineage.get("resolution") or lora_lineage.get("resolution") or 512)


class Sampler:
    """Callable: list[SampleSpec] -> list of HxWx3 uint8 images, in spec order."""

    def __init__(self, cfg: SamplerConfig, tracking_uri: str | None = None, device: str | None = None, *,
                 lora_dir: Path | str | None = None, lora_sha256: str | None = None,
                 controlnet_dir: Path | str | None = None, controlnet_sha256: str | None = None):
        """``lora_dir``/``lora_sha256``: a LoRA the driver already fetched and hashed
        (``resolve_lora``), used as is; without them ``cfg.lora`` is fetched (and hashed) here. The
        same for the ControlNet (``controlnet_dir``/``controlnet_sha256``, ``resolve_controlnet``)."""
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if lora_dir is not None:
            self.lora_dir = Path(lora_dir)
            check_lora_weights(self.lora_dir)  # the folder resolve_lora returned
        else:
            self.lora_dir = fetch_lora(cfg.lora, tracking_uri) if cfg.lora else None
        self._lora_sha256 = lora_sha256
        self.lineage = read_lineage(self.lora_dir)
        if controlnet_dir is not None:
            self.controlnet_dir, self.controlnet_sha256 = Path(controlnet_dir), controlnet_sha256
            check_controlnet(self.controlnet_dir)
        elif cfg.controlnet:
            self.controlnet_dir, self.controlnet_sha256 = resolve_controlnet(cfg.controlnet, tracking_uri)
        else:
            self.controlnet_dir, self.controlnet_sha256 = None, None
        self.controlnet_lineage = read_lineage(self.controlnet_dir, CONTROLNET_FOLDER)
        self.resolution = sampling_resolution(cfg, self.controlnet_lineage, self.lineage)
        trained = self.controlnet_lineage if "clip_skip" in self.controlnet_lineage else self.lineage
        self.clip_skip = int(trained.get("clip_skip", cfg.model.clip_skip))
        from diffusers import schedulers

        pipe = build_pipeline(cfg.model)
        name, extra = SCHEDULERS[cfg.scheduler]
        pipe.scheduler = getattr(schedulers, name).from_config(pipe.scheduler.config, **extra)
        if self.lora_dir is not None:
            pipe.load_lora_weights(str(self.lora_dir), weight_name=WEIGHTS_NAME, use_safetensors=True)
            pipe.fuse_lora(lora_scale=cfg.lora_scale)  # one matmul per layer instead of three
            pipe.unload_lora_weights()
        if self.controlnet_dir is not None:
            pipe = self._controlnet_pipeline(pipe)
        dtype = resolve_precision(cfg.precision, self.device)
        pipe.to(self.device)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        if cfg.compile and self.device.type == "cuda":
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead", fullgraph=False)
        self.pipe = pipe
        self._prompt_cache: dict[str, torch.Tensor] = {}

    def _controlnet_pipeline(self, pipe):
        """The same components (LoRA fused) and the ControlNet, as a StableDiffusionControlNetPipeline."""
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        controlnet = ControlNetModel.from_pretrained(str(self.controlnet_dir), use_safetensors=True,
                                                     local_files_only=True)
        return StableDiffusionControlNetPipeline(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            controlnet=controlnet, scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

    def controlnet_identity(self) -> dict[str, Any]:
        if self.controlnet_dir is None:
            return {}
        if self.controlnet_sha256 is None:
            from sonosynth.trainers.controlnet.conditioning import WEIGHTS_NAME as CONTROLNET_WEIGHTS

            self.controlnet_sha256 = weights_sha256(self.controlnet_dir, CONTROLNET_WEIGHTS)
        return {"controlnet": self.cfg.controlnet or str(self.controlnet_dir),
                "controlnet_sha256": self.controlnet_sha256, "controlnet_scale": self.cfg.controlnet_scale}

    def lora_identity(self) -> dict[str, Any]:
        if self.lora_dir is None:
            return {"lora": None}
        if self._lora_sha256 is None:
            self._lora_sha256 = weights_sha256(self.lora_dir)
        return {"lora": self.cfg.lora or str(self.lora_dir), "lora_sha256": self._lora_sha256,
                "lora_scale": self.cfg.lora_scale}

    @torch.no_grad()
    def _embed(self, prompt: str) -> torch.Tensor:
        from sonosynth.trainers.diffusion.train import encode_prompt_ids, tokenize

        if prompt not in self._prompt_cache:
            ids = tokenize(self.pipe.tokenizer, [prompt]).to(self.device)
            self._prompt_cache[prompt] = encode_prompt_ids(self.pipe.text_encoder, ids, self.clip_skip)
        return self._prompt_cache[prompt]

    @torch.no_grad()
    def __call__(self, specs: list[SampleSpec]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for start in range(0, len(specs), self.cfg.batch_size):
            batch = specs[start:start + self.cfg.batch_size]
            emb = torch.cat([self._embed(s.prompt) for s in batch])
            neg = self._embed("").expand(len(batch), -1, -1)
            generators = [torch.Generator().manual_seed(s.seed) for s in batch]
            images = self.pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=self.resolution,
                               width=self.resolution, num_inference_steps=self.cfg.steps,
                               guidance_scale=self.cfg.guidance, generator=generators, output_type="np",
                               **self._conditioning(batch)).images
            out.extend((np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images)
        return out

    def _conditioning(self, batch: list[SampleSpec]) -> dict[str, Any]:
        """The ControlNet's arguments for ``batch`` (none without a ControlNet)."""
        if self.controlnet_dir is None:
            return {}
        from sonosynth.trainers.controlnet.conditioning import mask_to_condition

        want = (self.resolution, self.resolution)
        for s in batch:
            if s.mask is None or s.mask.shape != want:
                got = None if s.mask is None else s.mask.shape
                raise ValueError(f"sample {s.index}: a ControlNet sampler needs each spec's conditioning mask at "
                                 f"{want[0]}x{want[1]} (the sampling resolution); got {got}")
        return {"image": [mask_to_condition(s.mask) for s in batch],
                "controlnet_conditioning_scale": self.cfg.controlnet_scale}
