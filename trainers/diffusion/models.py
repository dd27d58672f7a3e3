"""Stable Diffusion components: SD 1.x/2.x from a local diffusers folder, or a tiny model from config.

Both paths return the same classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTokenizer, DDPMScheduler), so training and sampling code never branches on model size.
The tiny model is built deterministically from its config and seed (the same config always
gives the same weights), and its tokenizer is byte-level and built in memory: no hub, no files.
A diffusers folder is checked when the config is built (``check_pretrained``: files and JSON
only), so a wrong path, a partial copy, an SDXL folder or a single-file checkpoint fails with
its path and the fix before any worker starts; weights that do not fit fail at load time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import field_validator, model_validator

from sonosynth.infra.config import Config, ConfigError


class TinyDiffusionConfig(Config):
    """A small random Stable-Diffusion-shaped model for tests, the demo and CPU benchmarks."""

    unet_channels: list[int] = [32, 64]
    """UNet block widths (one down/up block each; the last down block has cross-attention)."""
    vae_channels: list[int] = [16, 16, 32, 32]
    """VAE block widths; the latent is 2**(len-1) times smaller than the image (8 for 4 blocks)."""
    text_hidden: int = 32
    """Width of the CLIP text model (also the UNet cross-attention width)."""
    text_layers: int = 2
    """Transformer layers of the CLIP text model."""
    max_tokens: int = 77
    """Prompt length in tokens (CLIP uses 77)."""
    seed: int = 0
    """Seed of the random weights: the same config and seed always give the same model."""

    @model_validator(mode="after")
    def _check(self) -> "TinyDiffusionConfig":
        if len(self.unet_channels) < 2:
            raise ValueError("unet_channels needs at least 2 blocks, e.g. [32, 64]")
        if any(c % 8 for c in self.unet_channels + self.vae_channels):
            raise ValueError("unet_channels and vae_channels must be multiples of 8 (group norm)")
        return self


class DiffusionModelConfig(Config):
    """Which base model to fine-tune or sample from."""

    pretrained: str | None = None
    """Local diffusers folder of Stable Diffusion 1.x/2.x (model_index.json, unet/, vae/,
    text_encoder/, tokenizer/, scheduler/), as ``StableDiffusionPipeline.save_pretrained`` writes
    it. Single-file checkpoints (.safetensors/.ckpt) must be converted first. Null builds the
    tiny model below instead."""
    tiny: TinyDiffusionConfig = TinyDiffusionConfig()
    """The tiny model used when ``pretrained`` is null."""
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    """What the UNet predicts (SD 1.5 and both papers: epsilon)."""
    clip_skip: int = 1
    """Use the text encoder's n-th last hidden state (FU-LoRA: 2; SD default: 1)."""

    @field_validator("pretrained")
    @classmethod
    def _check_pretrained(cls, value: str | None) -> str | None:
        if value is not None:
            check_pretrained(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> "DiffusionModelConfig":
        if self.clip_skip < 1:
            raise ValueError("clip_skip counts from 1 (the last hidden state)")
        return self

    def identity(self) -> str:
        """A stable name for lineage: the folder path, or ``tiny-<hash of its config>``."""
        if self.pretrained:
            return str(Path(self.pretrained).expanduser().resolve())
        digest = hashlib.sha256(json.dumps(self.tiny.to_dict(), sort_keys=True).encode()).hexdigest()
        return f"tiny-{digest[:12]}"


# --- the on-disk format of model.pretrained -------------------------------------------------

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
"""Subfolders of a diffusers Stable Diffusion folder that sonosynth loads."""
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
"""``_class_name`` values of model_index.json accepted as Stable Diffusion 1.x/2.x (same components)."""
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
FIX = ("point model.pretrained at a local copy of stable-diffusion-v1-5 in the diffusers format "
       "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), or set it to null for the tiny model")
_WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                     "pytorch_model.bin.index.json"),
}


class ModelFormatError(ConfigError):
    """``model.pretrained`` is not a loadable Stable Diffusion 1.x/2.x diffusers folder; the message
    names the path, what it is, and the fix. A ConfigError (so a ValueError): config validation reports
    it under its key, and the CLI as a usage error."""


def _convert_hint(path: Path) -> str:
    out = path.with_suffix("") if path.is_file() else path / "diffusers"
    return ("sonosynth loads base models only as a diffusers folder (model_index.json, unet/, vae/, "
            "text_encoder/, tokenizer/, scheduler/). Convert it once, on a machine that reaches the Hugging "
            "Face hub (the converter fetches the model's configs): python -c \"from diffusers import "
            f"StableDiffusionPipeline as P; P.from_single_file('{path}').save_pretrained('{out}')\" "
            "(or diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py --from_safetensors "
            f"--checkpoint_path {path} --dump_path {out}), then set model.pretrained={out}")


def _checkpoint_kind(path: Path) -> str:
    """What a single-file checkpoint holds, from its safetensors header alone (nothing unpickled)."""
    if path.suffix != ".safetensors":
        return "checkpoint"
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 - any unreadable header gets the same answer
        return "file that is not a readable safetensors file"
    if any("lora" in k for k in keys):
        return "LoRA"
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "Stable Diffusion XL checkpoint"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "Stable Diffusion checkpoint (original single-file layout)"
    return "checkpoint"


def _single_file_message(path: Path) -> str:
    for parent in (path.parent, path.parent.parent):
        if (parent / "model_index.json").is_file():
            return f"{path} is one file of the diffusers folder {parent}: set model.pretrained={parent}"
    if path.suffix not in CHECKPOINT_SUFFIXES:
        return f"{path} is a file, not a folder: {FIX}"
    kind = _checkpoint_kind(path)
    if kind == "LoRA":
        return (f"{path} is a LoRA, not a base model: give its folder as the LoRA (sampler.lora / --lora) and "
                f"set model.pretrained to the diffusers folder of the base model it was trained on")
    if "XL" in kind:
        return (f"{path} is a {kind}; sonosynth trains and samples Stable Diffusion 1.x/2.x only: {FIX}")
    return f"{path} is a single-file {kind}. " + _convert_hint(path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelFormatError(f"{path} is not readable JSON ({err}): copy it again from the original model, "
                               f"or {FIX}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} is not a JSON object: copy it again from the original model, or {FIX}")
    return data


def _not_a_pipeline_message(root: Path) -> str:
    """For a folder without model_index.json: say what it is instead."""
    snapshots = root / "snapshots"
    if snapshots.is_dir():
        found = sorted(p.name for p in snapshots.iterdir() if (p / "model_index.json").is_file())
        if found:
            return (f"{root} is a Hugging Face cache entry, not the model folder: "
                    f"set model.pretrained={snapshots / found[-1]}")
    if (root.parent / "model_index.json").is_file() and root.name in COMPONENTS:
        return (f"{root} is the {root.name}/ component of a diffusers folder, not the whole model: "
                f"set model.pretrained={root.parent}")
    present = [d for d in COMPONENTS if (root / d).is_dir()]
    if len(present) == len(COMPONENTS):
        return (f"{root} has {', '.join(d + '/' for d in COMPONENTS)} but no model_index.json, so diffusers "
                "cannot load it as a pipeline: copy model_index.json from the original model (a Stable "
                "Diffusion 1.5 folder has one naming StableDiffusionPipeline), or re-save the pipeline "
                "with save_pretrained")
    if (root / "config.json").is_file():
        cfg = _read_json(root / "config.json")
        what = cfg.get("_class_name") or ", ".join(cfg.get("architectures") or []) or "model"
        return (f"{root} holds a single {what} (a config.json, no model_index.json), not a Stable Diffusion "
                f"pipeline: {FIX}")
    singles = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
    if singles:
        return f"{root} has no model_index.json, and " + _single_file_message(singles[0])
    missing = [d + "/" for d in COMPONENTS if d not in present]
    return (f"{root} is not a diffusers Stable Diffusion folder (missing {', '.join(missing)}, "
            f"model_index.json): {FIX}")


def check_pretrained(path: str | Path) -> Path:
    """``path`` as a folder, checked to be a Stable Diffusion 1.x/2.x diffusers folder that sonosynth
    can load: model_index.json, the five component folders with their config and weight files, and
    components that fit together (text width = UNet cross-attention width, UNet channels = VAE
    latent channels). Reads only JSON and file names (milliseconds), so configs call it when they
    are built, before any worker starts. Raises ModelFormatError naming the path and the fix."""
    if not str(path).strip():
        raise ModelFormatError(f"model.pretrained is empty: {FIX}")
    root = Path(path).expanduser()
    if not root.exists():
        raise ModelFormatError(f"{root} does not exist (missing unet/, vae/, text_encoder/, tokenizer/, "
                               f"scheduler/, model_index.json): {FIX}")
    if root.is_file():
        raise ModelFormatError(_single_file_message(root))
    if not (root / "model_index.json").is_file():
        raise ModelFormatError(_not_a_pipeline_message(root))

    index = _read_json(root / "model_index.json")
    if not index.get("_class_name"):
        raise ModelFormatError(f"{root / 'model_index.json'} names no _class_name (a Stable Diffusion folder says "
                               f"StableDiffusionPipeline): copy it again from the original model, or {FIX}")
    kind = str(index["_class_name"])
    if "text_encoder_2" in index or "XL" in kind:
        raise ModelFormatError(
            f"{root} is a Stable Diffusion XL folder ({kind} in model_index.json, with text_encoder_2/); "
            f"sonosynth trains and samples Stable Diffusion 1.x/2.x (StableDiffusionPipeline): {FIX}")
    if kind not in SD_PIPELINES:
        raise ModelFormatError(
            f"{root} is a {kind} folder (model_index.json), not Stable Diffusion 1.x/2.x "
            f"(_class_name StableDiffusionPipeline): {FIX}")

    missing = []
    for name in COMPONENTS:
        folder = root / name
        if not folder.is_dir():
            missing.append(f"{name}/")
            continue
        configs = {"scheduler": ["scheduler_config.json"], "tokenizer": []}.get(name, ["config.json"])
        missing += [f"{name}/{c}" for c in configs if not (folder / c).is_file()]
        if name in _WEIGHTS and not any((folder / w).is_file() for w in _WEIGHTS[name]):
            others = sorted(p.name for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES)
            missing.append(f"{name}/{_WEIGHTS[name][0]} (or .bin)" + (
                f"; found only {', '.join(others)}, and sonosynth loads the files without a variant suffix"
                if others else ""))
        if name == "tokenizer" and not ((folder / "tokenizer.json").is_file()
                                        or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
            missing.append("tokenizer/vocab.json + merges.txt (or tokenizer.json)")
    if missing:
        raise ModelFormatError(
            f"{root} is an incomplete diffusers Stable Diffusion folder (missing {', '.join(missing)}): copy the "
            f"missing parts from the model it came from (every Stable Diffusion 1.5 folder has them), or {FIX}")

    unet, vae = _read_json(root / "unet" / "config.json"), _read_json(root / "vae" / "config.json")
    text = _read_json(root / "text_encoder" / "config.json")
    wrong = []
    if unet.get("_class_name") != "UNet2DConditionModel":
        wrong.append(f"unet/ is a {unet.get('_class_name')}, expected UNet2DConditionModel")
    if vae.get("_class_name") != "AutoencoderKL":
        wrong.append(f"vae/ is a {vae.get('_class_name')}, expected AutoencoderKL")
    if text.get("model_type") not in ("clip_text_model", None) or \
            not set(text.get("architectures") or ["CLIPTextModel"]) & {"CLIPTextModel"}:
        wrong.append(f"text_encoder/ is a {', '.join(text.get('architectures') or [str(text.get('model_type'))])}, "
                     "expected CLIPTextModel")
    if wrong:
        raise ModelFormatError(f"{root} is not a Stable Diffusion 1.x/2.x folder ({'; '.join(wrong)}): {FIX}")
    latent = vae.get("latent_channels", 4)
    if unet.get("in_channels", 4) != latent or unet.get("out_channels", 4) != latent:
        wrong.append(f"unet/ has {unet.get('in_channels', 4)} input and {unet.get('out_channels', 4)} output "
                     f"channels but vae/ makes {latent}-channel latents (an inpainting or depth UNet?)")
    cross = unet.get("cross_attention_dim", 1280)
    width = text.get("hidden_size", 512)
    if ({cross} if isinstance(cross, int) else set(cross)) != {width}:
        wrong.append(f"unet/ cross-attends to {cross}-wide text embeddings (cross_attention_dim) but "
                     f"text_encoder/ makes {width}-wide ones (hidden_size)")
    if wrong:
        raise ModelFormatError(
            f"{root} mixes components of different models ({'; '.join(wrong)}): copy unet/, vae/, text_encoder/ "
            f"and tokenizer/ from one model (SD 1.x: 768-wide text, SD 2.x: 1024), or {FIX}")
    return root


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def byte_level_tokenizer(max_tokens: int):
    """A CLIP tokenizer over single bytes (no merges): any prompt encodes, nothing is downloaded."""
    from transformers import CLIPTokenizer

    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):  # GPT-2's byte-to-unicode map, so every byte has a visible symbol
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    symbols = [table[b] for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_tokens)


def build_tiny(cfg: TinyDiffusionConfig, prediction_type: str = "epsilon") -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_level_tokenizer(cfg.max_tokens)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(cfg.seed)
        n = len(cfg.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4, out_channels=4,
            block_out_channels=tuple(cfg.unet_channels),
            layers_per_block=1,
            down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
            cross_attention_dim=cfg.text_hidden,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4,
            block_out_channels=tuple(cfg.vae_channels),
            down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
            layers_per_block=1, norm_num_groups=8, sample_size=64,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * 2,
            num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=cfg.max_tokens,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type=prediction_type,
                              clip_sample=False, steps_offset=1)
    return Components(unet, vae, text_encoder, tokenizer, scheduler)


def build_pretrained(path: str | Path, prediction_type: str = "epsilon") -> Components:
    """The components of a diffusers Stable Diffusion 1.x/2.x folder (checked by ``check_pretrained``).

    Weights that do not fit their config (another model's file, a missing tensor) raise
    ModelFormatError naming the component's folder instead of loading half-random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = check_pretrained(path)

    def load(name: str, fn, weights: bool = True):
        folder = root / name
        try:
            loaded = fn(folder)
        except Exception as err:  # noqa: BLE001 - diffusers/transformers raise many kinds; name path and fix
            raise ModelFormatError(
                f"cannot load {folder}: {type(err).__name__}: {str(err).strip()[:600]}. Its files do not fit "
                f"its config (a file from another model, or a partial copy?): copy {name}/ whole from the model "
                f"it came from, or {FIX}") from err
        if not weights:
            return loaded
        module, info = loaded
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise ModelFormatError(
                f"{folder} has no weights for {len(missing)} tensors its config.json asks for (e.g. {missing[0]}): "
                f"the weights come from a different model than the config; copy {name}/ whole from the model it "
                f"came from, or {FIX}")
        return module

    parts = Components(
        unet=load("unet", lambda f: UNet2DConditionModel.from_pretrained(f, local_files_only=True,
                                                                          output_loading_info=True)),
        vae=load("vae", lambda f: AutoencoderKL.from_pretrained(f, local_files_only=True, output_loading_info=True)),
        text_encoder=load("text_encoder", lambda f: CLIPTextModel.from_pretrained(
            f, local_files_only=True, output_loading_info=True)),
        tokenizer=load("tokenizer", lambda f: CLIPTokenizer.from_pretrained(f, local_files_only=True), weights=False),
        noise_scheduler=load("scheduler", lambda f: DDPMScheduler.from_pretrained(
            f, local_files_only=True, prediction_type=prediction_type), weights=False),
    )
    vocab = parts.text_encoder.config.vocab_size
    if len(parts.tokenizer) > vocab:
        raise ModelFormatError(
            f"{root / 'tokenizer'} has {len(parts.tokenizer)} tokens but {root / 'text_encoder'} embeds only "
            f"{vocab}: the tokenizer comes from another model; copy tokenizer/ from the model of the text encoder")
    return parts


def build_components(cfg: DiffusionModelConfig) -> Components:
    """All components, frozen (``requires_grad=False``) and in eval mode; LoRA is added later."""
    parts = build_pretrained(cfg.pretrained, cfg.prediction_type) if cfg.pretrained \
        else build_tiny(cfg.tiny, cfg.prediction_type)
    for module in (parts.unet, parts.vae, parts.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return parts


def build_pipeline(cfg: DiffusionModelConfig, parts: Components | None = None, scheduler=None):
    """A ``StableDiffusionPipeline`` over the base model (no safety checker: medical images)."""
    from diffusers import StableDiffusionPipeline

    parts = parts or build_components(cfg)
    return StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=parts.unet,
        scheduler=scheduler or parts.noise_scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
