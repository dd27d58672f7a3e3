"""SAM builders: ViT-B/L/H shaped like ``segment_anything.build_sam_vit_*`` (so Meta's ``.pth``
checkpoints load), or a tiny SAM from config, built from the same classes.

``segment_anything``'s package ``__init__`` imports its predictor, which needs torchvision;
``segment_anything.modeling`` needs only torch. ``sam_modeling()`` imports it the ordinary way
when that works, and otherwise registers a bare ``segment_anything`` package (its ``__path__``
pointing at the installed folder) so that the submodules import without the ``__init__``.

``Sam.forward`` runs under ``torch.no_grad()``, so training calls the parts directly:
``embed`` (image encoder), ``sam_forward`` (prompt encoder + mask decoder, one image per
decoder call, one box per image, one mask out) and ``postprocess`` (``sam.postprocess_masks``).

A model fine-tuned by ``train-sam`` is a folder (``model/``: ``sam_finetuned.pt``,
``config.yaml``, ``lineage.json``) that ``load_sam_model`` turns back into a ``Sam`` from a
path, an ``s3://`` prefix or MLflow (``models:/sonosynth-sam@champion``); ``predict_masks``
predicts with it. ``sam_finetuned.pt`` holds what training changed (``FORMAT``):
``decoder``: the mask decoder and prompt encoder; ``lora``: those plus the image encoder's
LoRA adapters (merged into the base weights on load); ``full``: every weight. The first two
need the base weights the config names (``model.checkpoint``, or the seed of a random model).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import model_validator

from sonosynth.infra.config import Config, ConfigError

Arch = Literal["vit_b", "vit_l", "vit_h", "tiny"]

# segment_anything.build_sam's dimensions: (embed dim, depth, heads, global attention blocks).
REAL_ARCHS: dict[str, tuple[int, int, int, tuple[int, ...]]] = {
    "vit_b": (768, 12, 12, (2, 5, 8, 11)),
    "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": (1280, 32, 16, (7, 15, 23, 31)),
}


def sam_modeling() -> types.ModuleType:
    """``segment_anything.modeling``, with or without torchvision installed."""
    try:
        return importlib.import_module("segment_anything.modeling")
    except ImportError as err:
        if "torchvision" not in str(err) and getattr(err, "name", "") != "torchvision":
            raise
    sys.modules.pop("segment_anything", None)  # what the failed import left (its submodules stay)
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed: pip install segment-anything==1.0")
    bare = types.ModuleType("segment_anything")
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__package__ = "segment_anything"
    sys.modules["segment_anything"] = bare
    return importlib.import_module("segment_anything.modeling")


class TinySamConfig(Config):
    """A small random SAM (same classes as the real one) for tests, the demo and CPU runs."""

    image_size: int = 64
    """Square input side of the image encoder (SAM: 1024); a multiple of patch_size."""
    patch_size: int = 8
    """ViT patch side (SAM: 16). Low-res logits are 4 * image_size / patch_size pixels wide."""
    embed_dim: int = 32
    """Width of the ViT image encoder (vit_b: 768)."""
    depth: int = 2
    """Transformer blocks of the image encoder (vit_b: 12)."""
    num_heads: int = 2
    """Attention heads of the image encoder; must divide embed_dim."""
    global_attn_indexes: list[int] = [1]
    """Encoder blocks with global attention; the others use windowed attention."""
    window_size: int = 4
    """Side of the attention window of the windowed blocks, in patches (SAM: 14)."""
    prompt_embed_dim: int = 32
    """Width of the prompt encoder, the mask decoder and the image embedding (SAM: 256)."""
    decoder_depth: int = 2
    """Two-way transformer blocks of the mask decoder (SAM: 2)."""
    decoder_heads: int = 2
    """Attention heads of the mask decoder (SAM: 8)."""
    decoder_mlp_dim: int = 64
    """MLP width of the mask decoder's transformer (SAM: 2048)."""
    mask_in_chans: int = 4
    """Hidden channels of the prompt encoder's mask-input branch (SAM: 16); a multiple of 4."""

    @model_validator(mode="after")
    def _check(self) -> "TinySamConfig":
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide embed_dim {self.embed_dim}")
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            raise ValueError(f"global_attn_indexes {self.global_attn_indexes} must be block numbers "
                             f"in 0..{self.depth - 1}")
        if self.prompt_embed_dim % 8 or (self.prompt_embed_dim // 2) % self.decoder_heads:
            raise ValueError(f"prompt_embed_dim {self.prompt_embed_dim} must be a multiple of 8 and of "
                             f"2 * decoder_heads ({2 * self.decoder_heads}), e.g. 32")
        if self.mask_in_chans % 4 or self.mask_in_chans < 4:
            raise ValueError("mask_in_chans must be a positive multiple of 4, e.g. 4")
        return self


class SamModelConfig(Config):
    """Which SAM to build: a real architecture (weights from a local .pth) or the tiny one."""

    arch: Arch = "tiny"
    """vit_b, vit_l or vit_h (segment_anything's dimensions, 1024 px input) or tiny (below)."""
    checkpoint: str | None = None
    """Local .pth state dict of this arch (e.g. Meta's sam_vit_b_01ec64.pth, or a tiny model
    saved by sonosynth). Null: random weights from ``seed``."""
    seed: int = 0
    """Seed of the random weights when there is no checkpoint (same config, same model)."""
    tiny: TinySamConfig = TinySamConfig()
    """Dimensions of the tiny model, used when arch is tiny."""

    @model_validator(mode="after")
    def _check(self) -> "SamModelConfig":
        if self.checkpoint is not None and not self.checkpoint.strip():
            raise ValueError("checkpoint is empty; give a local .pth path, or null for random weights")
        if self.checkpoint is not None and "://" in self.checkpoint:
            raise ValueError(f"checkpoint {self.checkpoint!r} must be a local .pth path; copy it to the "
                             "machine first")
        return self

    @property
    def image_size(self) -> int:
        """Input side of the image encoder (1024 for the real archs)."""
        return self.tiny.image_size if self.arch == "tiny" else 1024

    def identity(self) -> str:
        """A stable name for lineage: the checkpoint path, or the arch (and tiny dims) + seed."""
        if self.checkpoint:
            return str(Path(self.checkpoint).expanduser().resolve())
        dims = f"-{self.tiny.to_dict()}" if self.arch == "tiny" else ""
        return f"{self.arch}-random-seed{self.seed}{dims}"


def _assemble(embed_dim: int, depth: int, heads: int, global_idx, *, image_size: int, patch: int,
              window: int, prompt_dim: int, dec_depth: int, dec_heads: int, dec_mlp: int, mask_chans: int,
              iou_hidden: int):
    m = sam_modeling()
    grid = image_size // patch
    return m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=depth, embed_dim=embed_dim, img_size=image_size, mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=heads, patch_size=patch,
            qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(global_idx), window_size=window,
            out_chans=prompt_dim),
        prompt_encoder=m.PromptEncoder(
            embed_dim=prompt_dim, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size),
            mask_in_chans=mask_chans),
        mask_decoder=m.MaskDecoder(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=dec_depth, embedding_dim=prompt_dim, mlp_dim=dec_mlp,
                                            num_heads=dec_heads),
            transformer_dim=prompt_dim, iou_head_depth=3, iou_head_hidden_dim=iou_hidden),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def _build_random(cfg: SamModelConfig):
    if cfg.arch == "tiny":
        t = cfg.tiny
        return _assemble(t.embed_dim, t.depth, t.num_heads, t.global_attn_indexes, image_size=t.image_size,
                         patch=t.patch_size, window=t.window_size, prompt_dim=t.prompt_embed_dim,
                         dec_depth=t.decoder_depth, dec_heads=t.decoder_heads, dec_mlp=t.decoder_mlp_dim,
                         mask_chans=t.mask_in_chans, iou_hidden=t.prompt_embed_dim)
    embed_dim, depth, heads, global_idx = REAL_ARCHS[cfg.arch]
    return _assemble(embed_dim, depth, heads, global_idx, image_size=1024, patch=16, window=14, prompt_dim=256,
                     dec_depth=2, dec_heads=8, dec_mlp=2048, mask_chans=16, iou_hidden=256)


def _guess_arch(state: dict[str, torch.Tensor]) -> str:
    """Which architecture a state dict looks like (for the error message)."""
    proj = state.get("image_encoder.patch_embed.proj.weight")
    if proj is None:
        return "not a SAM state dict (no image_encoder.patch_embed.proj.weight)"
    depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
    for name, (dim, d, _, _) in REAL_ARCHS.items():
        if proj.shape[0] == dim and depth == d:
            return name
    return f"tiny (embed_dim {proj.shape[0]}, depth {depth}, patch {proj.shape[-1]})"


def load_checkpoint(sam: torch.nn.Module, path: str | Path, arch: str) -> None:
    """Load a local .pth into ``sam``; a clear ConfigError when it is missing or of another arch."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"SAM checkpoint {path} does not exist; give model.checkpoint the local path of a "
                          f"{arch} .pth (e.g. sam_vit_b_01ec64.pth), or null for random weights")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickles with code, truncated files, not a torch file
        raise ConfigError(f"SAM checkpoint {path} could not be read as a weights-only state dict "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    for wrapper in ("model", "state_dict"):  # fine-tuning scripts often nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict) and \
                "image_encoder.patch_embed.proj.weight" not in state:
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConfigError(f"SAM checkpoint {path} holds a {type(state).__name__}, not a state dict")
    expected = sam.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            k, got, want = shapes[0]
            parts.append(f"{len(shapes)} shapes differ (e.g. {k}: {list(got)} in the file, {list(want)} in {arch})")
        raise ConfigError(f"SAM checkpoint {path} does not fit arch {arch}: {'; '.join(parts)}. It looks like "
                          f"{_guess_arch(state)}; set model.arch (and model.tiny) to match the file")
    sam.load_state_dict(state, strict=True)


def build_sam(cfg: SamModelConfig):
    """A ``segment_anything.modeling.Sam`` in eval mode: random from ``cfg.seed``, then the checkpoint."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        sam = _build_random(cfg)
    if cfg.checkpoint:
        load_checkpoint(sam, cfg.checkpoint, cfg.arch)
    return sam.eval()


def embed(sam, images: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """Image embeddings [B, prompt_dim, g, g] of preprocessed images [B, 3, S, S] (no grad by
    default: paper A freezes the image encoder)."""
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return sam.image_encoder(images)


def sam_forward(sam, images: torch.Tensor | None, boxes: torch.Tensor,
                image_embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """Low-res mask logits [B, 1, 4g, 4g] for one box per image (XYXY, model input frame).

    ``images`` are preprocessed [B, 3, S, S] (``datasets.augment.sam_preprocess``); pass
    ``image_embeddings`` instead to reuse cached ones. Gradients flow through the prompt
    encoder and mask decoder (whatever ``requires_grad`` says); the decoder takes one image's
    embedding per call, so the batch is a loop.
    """
    if image_embeddings is None:
        if images is None:
            raise ValueError("give images or image_embeddings")
        image_embeddings = embed(sam, images)
    dtype = sam.mask_decoder.iou_token.weight.dtype  # bf16/fp16 under a half-precision engine
    image_embeddings = image_embeddings.to(dtype)
    boxes = torch.as_tensor(boxes, device=image_embeddings.device).float().reshape(-1, 4)
    if len(boxes) != len(image_embeddings):
        raise ValueError(f"{len(boxes)} boxes for {len(image_embeddings)} images: give one box per image")
    with _float32_positions(sam.prompt_encoder):
        dense_pe = sam.prompt_encoder.get_dense_pe().to(dtype)
        prompts = [sam.prompt_encoder(points=None, boxes=boxes[i:i + 1], masks=None) for i in range(len(boxes))]
    logits = []
    for i, (sparse, dense) in enumerate(prompts):
        low, _ = sam.mask_decoder(image_embeddings=image_embeddings[i:i + 1], image_pe=dense_pe,
                                  sparse_prompt_embeddings=sparse.to(dtype), dense_prompt_embeddings=dense.to(dtype),
                                  multimask_output=False)
        logits.append(low)
    return torch.cat(logits, 0)


@contextmanager
def _float32_positions(prompt_encoder):
    """segment_anything's positional encoding builds its coordinates in float32 whatever the
    model's dtype; under a bf16/fp16 engine its frequency matrix is lent to it in float32."""
    pe = prompt_encoder.pe_layer
    matrix = pe.positional_encoding_gaussian_matrix
    if matrix.dtype == torch.float32:
        yield
        return
    pe.positional_encoding_gaussian_matrix = matrix.float()
    try:
        yield
    finally:
        pe.positional_encoding_gaussian_matrix = matrix


def postprocess(sam, logits: torch.Tensor, input_size: tuple[int, int],
                original_size: tuple[int, int]) -> torch.Tensor:
    """Logits at the original image size: unpad ``input_size`` (the resized image inside the
    square input), then resize to ``original_size`` (``sam.postprocess_masks``)."""
    return sam.postprocess_masks(logits, tuple(input_size), tuple(original_size))


@torch.no_grad()
def predict_masks(sam, image: np.ndarray, boxes: np.ndarray, work_size: int | None = None) -> np.ndarray:
    """Boolean masks [K, H, W] for one uint8 HxW image and K boxes [K, 4] (XYXY, image pixels).

    ``work_size``: first resize the image so its longest side is this (what train-sam's
    ``data.image_size`` did to every training image, paper A: 256), predict there, and bring
    the masks back to H x W. None: the size the model was fine-tuned at (``load_sam_model``
    records it), else the native size.
    """
    from sonosynth.datasets.augment import boxes_to_input, preprocess_shape, sam_preprocess

    size = sam.image_encoder.img_size
    device = sam.pixel_mean.device
    image = np.asarray(image)
    original = image.shape[:2]
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    work_size = work_size if work_size is not None else getattr(sam, "sonosynth_work_size", None)
    if work_size and max(original) != work_size:
        image = resize_image(image, preprocess_shape(*original, work_size))
        scale = np.array([image.shape[1] / original[1], image.shape[0] / original[0]] * 2, np.float32)
        boxes = boxes * scale
    x, input_size = sam_preprocess(image, size)
    emb = embed(sam, x[None].to(device))
    model_boxes = torch.as_tensor(boxes_to_input(boxes, image.shape[:2], size), device=device)
    logits = sam_forward(sam, None, model_boxes, image_embeddings=emb.expand(len(boxes), -1, -1, -1))
    full = postprocess(sam, logits.float(), input_size, original)
    return (full[:, 0] > sam.mask_threshold).cpu().numpy()


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 grayscale HxW image resized to ``size`` (bilinear with antialias, like SAM's
    preprocessing), still uint8."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    if tuple(x.shape[-2:]) != tuple(size):
        x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                                            antialias=True)
    return x[0, 0].round().clamp(0, 255).to(torch.uint8).numpy()


# -- fine-tuned models: the file train-sam writes, and loading it back -----------------------------

WEIGHTS_FILE = "sam_finetuned.pt"
"""The weights file in a train-sam model folder."""
FORMAT = "sonosynth-sam/1"
"""``sam_finetuned.pt``: {format, mode, state_dict: {Sam key: tensor}, lora: {Sam key of a
Linear: {A [r, in], B [out, r], scale}}}; the weight of every LoRA'd Linear becomes
W + scale * B @ A."""
CONSTANT_KEYS = ("pixel_mean", "pixel_std")
"""Sam buffers fixed by the architecture (a full state dict may leave them out)."""


def sha256_file(path: str | Path) -> str:
    """sha256 of a file (a base checkpoint's identity in a fine-tuned model's lineage)."""
    import hashlib

    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def apply_finetuned(sam: torch.nn.Module, payload: dict) -> None:
    """Put ``sam_finetuned.pt``'s weights into ``sam`` (built from the base it was trained on)."""
    if payload.get("format") != FORMAT:
        raise ConfigError(f"{WEIGHTS_FILE} has format {payload.get('format')!r}; this sonosynth reads {FORMAT}")
    expected = sam.state_dict()
    state = dict(payload["state_dict"])
    unknown = [k for k in state if k not in expected]
    shapes = [k for k in state if k in expected and tuple(state[k].shape) != tuple(expected[k].shape)]
    if unknown or shapes:
        bad = (unknown or shapes)[0]
        raise ConfigError(f"{WEIGHTS_FILE} does not fit this SAM ({len(unknown)} unknown keys, {len(shapes)} "
                          f"shapes differ, e.g. {bad}); build the base from the model folder's config.yaml")
    if payload["mode"] == "full":
        missing = [k for k in expected if k not in state and not k.endswith(CONSTANT_KEYS)]
        if missing:
            raise ConfigError(f"{WEIGHTS_FILE} (mode full) lacks {len(missing)} weights, e.g. {missing[0]}")
    for name, lora in (payload.get("lora") or {}).items():
        key = f"{name}.weight"
        if key not in expected:
            raise ConfigError(f"{WEIGHTS_FILE} has a LoRA for {name}, which this SAM does not have")
        w = expected[key]
        state[key] = w + float(lora["scale"]) * (lora["B"].to(w.dtype) @ lora["A"].to(w.dtype))
    sam.load_state_dict(state, strict=False)


def load_sam_model(uri: str, tracking_uri: str | None = None, *, base_checkpoint: str | None = None,
                   device: str | torch.device | None = None):
    """A fine-tuned SAM (eval mode) from train-sam's ``model/`` folder: a local path, an
    ``s3://`` prefix, or MLflow (``models:/sonosynth-sam/3``, ``models:/sonosynth-sam@champion``,
    ``runs:/<run id>/model``; ``tracking_uri`` names the server, else $MLFLOW_TRACKING_URI).

    Decoder and LoRA models hold only what training changed, on top of the base SAM of their
    ``config.yaml``: ``model.checkpoint`` must exist on this machine, or pass
    ``base_checkpoint`` (the same file elsewhere; its sha256 is checked against the lineage).
    The model remembers the size its training images were resized to (``data.image_size``),
    which ``predict_masks`` resizes to; ``sam.sonosynth_lineage`` is the model's lineage.
    """
    import json

    import yaml

    from sonosynth.infra.config import build
    from sonosynth.infra.model_registry import model_folder

    with model_folder(uri, tracking_uri, required=WEIGHTS_FILE, what="SAM model",
                      hint="the model/ folder written by `sonosynth train-sam`, or its MLflow model "
                           "(models:/sonosynth-sam/<version>)") as folder:
        config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
        lineage = json.loads((folder / "lineage.json").read_text()) if (folder / "lineage.json").is_file() else {}
        payload = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    if "model" not in (config or {}):
        raise ConfigError(f"{uri} has no config.yaml with a model section; it is not a train-sam model folder")
    model_cfg = build(SamModelConfig, config["model"], source=f"{uri}/config.yaml")
    if payload.get("mode") == "full":
        model_cfg = model_cfg.model_copy(update={"checkpoint": None})  # every weight is in the file
    elif base_checkpoint:
        want = lineage.get("base_checkpoint_sha256")
        got = sha256_file(base_checkpoint) if want else None
        if got != want:
            raise ConfigError(f"base_checkpoint {base_checkpoint} is not the base {uri} was trained on "
                              f"(sha256 {got[:12]}..., lineage says {want[:12]}...)")
        model_cfg = model_cfg.model_copy(update={"checkpoint": str(base_checkpoint)})
    elif model_cfg.checkpoint and not Path(model_cfg.checkpoint).expanduser().is_file():
        raise ConfigError(f"{uri} was fine-tuned ({payload.get('mode')} mode) from {model_cfg.checkpoint}, which "
                          f"is not on this machine; copy it here or pass base_checkpoint=<local .pth of it>")
    sam = build_sam(model_cfg)
    apply_finetuned(sam, payload)
    sam.sonosynth_work_size = (config.get("data") or {}).get("image_size")
    sam.sonosynth_lineage = lineage
    if device is not None:
        sam.to(device)
    return sam.eval()
