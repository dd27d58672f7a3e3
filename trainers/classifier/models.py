"""Plane classifier backbones, built without torchvision: ResNet-18, MobileNetV2, EfficientNet-B0
and ViT-B/16 from ``transformers``, DenseNet-121/169 from MONAI, a small ResNet for CPU runs and
tiny versions for tests.

``build_classifier(cfg, labels)`` returns an ``ImageClassifier``: ``forward(pixel_values
[B,3,H,W]) -> logits [B,num_labels]``, ``pixel_values`` already normalised with
``normalization(cfg)``. Without ``pretrained`` the weights are random (seeded); with it they are
read from a local folder: a transformers ``save_pretrained`` folder (e.g. microsoft/resnet-18,
google/mobilenet_v2_1.0_224, google/efficientnet-b0, google/vit-base-patch16-224 downloaded
elsewhere) or, for DenseNet, a folder written by ``ImageClassifier.save_pretrained`` or
torchvision's ImageNet ``densenet121-a639ec97.pth`` (its keys are renamed as MONAI does). A
head of another size is re-initialised (``ignore_mismatched_sizes``). MONAI's DenseNet is
plain torch: no transformers config, its ``pretrained=True`` download is never used.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal, Sequence

import torch
from pydantic import model_validator

from sonosynth.infra.config import Config, ConfigError

Backbone = Literal["resnet18", "mobilenet_v2", "efficientnet_b0", "vit_b16", "densenet121", "densenet169",
                   "small_resnet", "tiny_resnet", "tiny_vit", "tiny_densenet"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
"""Random-init default: a grayscale image in [0, 1] to roughly [-2, 2]."""
PREPROCESSOR = "preprocessor_config.json"

HF_TYPES = {"resnet18": "resnet", "small_resnet": "resnet", "tiny_resnet": "resnet",
            "mobilenet_v2": "mobilenet_v2",
            "efficientnet_b0": "efficientnet", "vit_b16": "vit", "tiny_vit": "vit"}
"""transformers ``model_type`` of each transformers backbone."""
DENSENETS = {"densenet121": {"block_config": (6, 12, 24, 16)}, "densenet169": {"block_config": (6, 12, 32, 32)},
             "tiny_densenet": {"init_features": 8, "growth_rate": 4, "block_config": (2, 2), "bn_size": 2}}
_REAL_DIMS = {  # what a pretrained folder's config must say for the named (non-tiny) backbones
    "resnet18": {"depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 256, 512], "layer_type": "basic"},
    "mobilenet_v2": {"depth_multiplier": 1.0},
    "efficientnet_b0": {"width_coefficient": 1.0, "depth_coefficient": 1.0},
    "vit_b16": {"hidden_size": 768, "num_hidden_layers": 12, "patch_size": 16},
}
_PATCH = {"vit_b16": 16, "tiny_vit": 8}


class ClassifierModelConfig(Config):
    """Which plane classifier to build: the backbone, its weights, its head and input size."""

    backbone: Backbone = "tiny_resnet"
    """resnet18, mobilenet_v2, efficientnet_b0, vit_b16 (transformers), densenet121, densenet169
    (MONAI; FU-LoRA used DenseNet-169); small_resnet (0.3 M weights) for CPU runs from scratch;
    tiny_resnet / tiny_vit / tiny_densenet (a few thousand weights) for tests."""
    pretrained: str | None = None
    """Local weights: a transformers save_pretrained folder of this backbone (e.g. microsoft/resnet-18);
    for DenseNet a folder saved by sonosynth or torchvision's densenet1xx-*.pth. Null: random weights."""
    num_labels: int | None = None
    """Classes of the head; the train task sets it from the job's label map (null: from the labels given)."""
    image_size: int = 224
    """Square input side the transforms produce (FU-LoRA: 224); ViT's position embeddings follow it."""
    pixel_mean: list[float] | None = None
    """Per-channel mean (1 or 3 values) subtracted from [0, 1] pixels. Null: the pretrained folder's
    preprocessor_config.json, else ImageNet's when pretrained, else 0.5 (or the train set's, see data.py)."""
    pixel_std: list[float] | None = None
    """Per-channel std (1 or 3 values); null: chosen like pixel_mean (ImageNet's, or 0.25)."""
    seed: int = 0
    """Seed of the random weights (and of a re-initialised head): the same config, the same model."""

    @model_validator(mode="after")
    def _check(self) -> "ClassifierModelConfig":
        if self.num_labels is not None and self.num_labels < 2:
            raise ValueError("num_labels must be at least 2 (or null: set from the job's label map)")
        patch = _PATCH.get(self.backbone, 1)
        if self.image_size < 16 or self.image_size % patch:
            raise ValueError(f"image_size must be at least 16 and a multiple of {patch} for {self.backbone}, e.g. 224")
        for name in ("pixel_mean", "pixel_std"):
            value = getattr(self, name)
            if value is not None and len(value) not in (1, 3):
                raise ValueError(f"{name} needs 1 or 3 values (one per channel), e.g. [0.5]")
        if self.pixel_std is not None and min(self.pixel_std) <= 0:
            raise ValueError("pixel_std values must be positive, e.g. [0.25]")
        if (self.pixel_mean is None) != (self.pixel_std is None):
            raise ValueError("set both pixel_mean and pixel_std, or neither (null: chosen from the weights)")
        if self.pretrained is not None and (not self.pretrained.strip() or "://" in self.pretrained):
            raise ValueError(f"pretrained {self.pretrained!r} must be a local folder (copy the weights to the "
                             "machine first), or null for random weights")
        return self

    def identity(self) -> str:
        """A stable name for lineage: the weights' path, or the backbone and seed."""
        if self.pretrained:
            return str(Path(self.pretrained).expanduser().resolve())
        return f"{self.backbone}-random-seed{self.seed}"


def _three(values: Sequence[float]) -> tuple[float, float, float]:
    return tuple(float(v) for v in (list(values) * 3 if len(values) == 1 else values))  # type: ignore[return-value]


def normalization(cfg: ClassifierModelConfig) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) per channel for [0, 1] pixels: the config's, else the pretrained folder's
    ``preprocessor_config.json`` (the checkpoint's own: google's MobileNetV2 and ViT use 0.5/0.5),
    else ImageNet's for pretrained weights, else the grayscale default."""
    if cfg.pixel_mean is not None and cfg.pixel_std is not None:
        return _three(cfg.pixel_mean), _three(cfg.pixel_std)
    if cfg.pretrained:
        root = Path(cfg.pretrained).expanduser()
        pre = root / PREPROCESSOR if root.is_dir() else None
        if pre is not None and pre.is_file():
            data = json.loads(pre.read_text())
            if data.get("image_mean") and data.get("image_std"):
                return _three(data["image_mean"]), _three(data["image_std"])
        return IMAGENET_MEAN, IMAGENET_STD
    return GRAY_MEAN, GRAY_STD


class ImageClassifier(torch.nn.Module):
    """A backbone with a head of ``len(labels)`` classes: ``forward(pixel_values) -> logits``."""

    def __init__(self, net: torch.nn.Module, backbone: str, labels: Sequence[str], mean, std, image_size: int):
        super().__init__()
        self.net, self.backbone, self.labels = net, backbone, list(labels)
        self.pixel_mean, self.pixel_std, self.image_size = tuple(mean), tuple(std), image_size
        self.is_hf = backbone in HF_TYPES

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.is_hf:
            return self.net(pixel_values)
        kwargs = {}
        if HF_TYPES[self.backbone] == "vit" and tuple(pixel_values.shape[-2:]) != (self.net.config.image_size,) * 2:
            kwargs["interpolate_pos_encoding"] = True
        return self.net(pixel_values=pixel_values, **kwargs).logits

    def save_pretrained(self, folder: str | Path) -> Path:
        """Weights, labels (``id2label``) and normalisation (``preprocessor_config.json``) into
        ``folder``: what ``pretrained=folder`` loads back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.is_hf:
            self.net.save_pretrained(folder)
        else:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(folder / "model.safetensors"))
            (folder / "config.json").write_text(json.dumps({
                "sonosynth_backbone": self.backbone, "library": "monai", "num_labels": self.num_labels,
                "id2label": {str(i): c for i, c in enumerate(self.labels)}}, indent=1))
        (folder / PREPROCESSOR).write_text(json.dumps({
            "image_mean": list(self.pixel_mean), "image_std": list(self.pixel_std), "do_normalize": True,
            "do_rescale": True, "rescale_factor": 1 / 255,
            "size": {"height": self.image_size, "width": self.image_size},
        }, indent=1))
        return folder


def saved_labels(folder: str | Path) -> list[str] | None:
    """The class names a saved classifier was trained on (its config's ``id2label``), or None."""
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        return None
    id2label = json.loads(path.read_text()).get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)] or None


def _hf_config(backbone: str, image_size: int):
    from transformers import EfficientNetConfig, MobileNetV2Config, ResNetConfig, ViTConfig

    if backbone == "resnet18":
        return ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                            layer_type="basic", hidden_act="relu", downsample_in_first_stage=False)
    if backbone == "small_resnet":  # 0.3 M weights: trains from scratch in CPU minutes
        return ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                            layer_type="basic")
    if backbone == "tiny_resnet":
        return ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    if backbone == "mobilenet_v2":
        return MobileNetV2Config(depth_multiplier=1.0, image_size=image_size)
    if backbone == "efficientnet_b0":
        return EfficientNetConfig(width_coefficient=1.0, depth_coefficient=1.0, image_size=image_size,
                                  dropout_rate=0.2, hidden_dim=1280)
    if backbone == "vit_b16":
        return ViTConfig(image_size=image_size, patch_size=16)
    return ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64)


def _hf_class(backbone: str):
    import transformers

    return getattr(transformers, {"resnet": "ResNetForImageClassification", "vit": "ViTForImageClassification",
                                  "mobilenet_v2": "MobileNetV2ForImageClassification",
                                  "efficientnet": "EfficientNetForImageClassification"}[HF_TYPES[backbone]])


def _weights_folder(path: str, backbone: str) -> Path:
    root = Path(path).expanduser()
    if not root.exists():
        raise ConfigError(f"model.pretrained {root} does not exist; give the local folder of {backbone} weights "
                          "(transformers save_pretrained), or null for random weights")
    return root


def _load_hf(cfg: ClassifierModelConfig, id2label: dict[int, str]):
    root = _weights_folder(cfg.pretrained, cfg.backbone)
    conf_path = root / "config.json"
    if not conf_path.is_file():
        raise ConfigError(f"model.pretrained {root} has no config.json: not a transformers save_pretrained folder "
                          f"of {cfg.backbone}")
    conf = json.loads(conf_path.read_text())
    want = HF_TYPES[cfg.backbone]
    if conf.get("model_type") != want:
        held = conf.get("model_type") or conf.get("sonosynth_backbone")
        raise ConfigError(f"model.pretrained {root} holds a {held!r} "
                          f"model, not {want!r}: set model.backbone to match it or point at {cfg.backbone} weights")
    wrong = {k: conf.get(k) for k, v in _REAL_DIMS.get(cfg.backbone, {}).items() if conf.get(k, v) != v}
    if wrong:
        raise ConfigError(f"model.pretrained {root} is not {cfg.backbone} ({wrong}); use the matching backbone")
    try:
        return _hf_class(cfg.backbone).from_pretrained(
            root, id2label=id2label, label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True,
            local_files_only=True)
    except Exception as err:  # noqa: BLE001 - missing weights, truncated safetensors, a wrong format
        raise ConfigError(f"model.pretrained {root}: could not load {cfg.backbone} weights "
                          f"({str(err).splitlines()[0][:300]})") from None


_TV_LAYER = re.compile(
    r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def _load_densenet(net: torch.nn.Module, cfg: ClassifierModelConfig) -> None:
    root = _weights_folder(cfg.pretrained, cfg.backbone)
    files = [root] if root.is_file() else sorted(
        (p for p in root.iterdir() if p.suffix in (".safetensors", ".pth", ".pt", ".bin")),
        key=lambda p: (p.suffix != ".safetensors", p.name))
    if not files:
        raise ConfigError(f"model.pretrained {root} has no weights (model.safetensors or a .pth state dict)")
    try:
        if files[0].suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(files[0]))
        else:
            state = torch.load(files[0], map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated files, pickles with code, not a torch file
        raise ConfigError(f"model.pretrained {files[0]} could not be read as a state dict "
                          f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    # torchvision's keys (denselayer1.norm.1 / norm1, classifier) -> MONAI's (denselayer1.layers.norm1)
    state = {_TV_LAYER.sub(r"\1.layers.\2\3.\4", k): v for k, v in state.items() if not k.startswith("classifier.")}
    own = net.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.startswith("class_layers.out.")
               and not k.endswith("num_batches_tracked")]  # old torchvision files lack these
    if missing:
        raise ConfigError(f"model.pretrained {files[0]} is not {cfg.backbone} weights: {len(missing)} tensors "
                          f"missing or of another shape (e.g. {missing[0]}); use the matching backbone")
    net.load_state_dict({**own, **usable})


def build_classifier(cfg: ClassifierModelConfig, labels: Sequence[str] | None = None) -> ImageClassifier:
    """The classifier of ``cfg`` with a head for ``labels`` (the job's label map, in its order)."""
    n = len(labels) if labels is not None else cfg.num_labels
    if n is None:
        raise ConfigError("model.num_labels is not set: pass the job's labels (the train task does) or set it")
    if labels is not None and cfg.num_labels is not None and cfg.num_labels != len(labels):
        raise ConfigError(f"model.num_labels is {cfg.num_labels} but the label map has {len(labels)} classes "
                          f"{list(labels)}; drop model.num_labels (it is set from the labels)")
    labels = list(labels) if labels is not None else [f"class_{i}" for i in range(n)]
    if n < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {labels}")
    id2label = dict(enumerate(labels))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if cfg.backbone in HF_TYPES:
            if cfg.pretrained:
                net = _load_hf(cfg, id2label)
            else:
                conf = _hf_config(cfg.backbone, cfg.image_size)
                conf.id2label, conf.label2id = id2label, {v: k for k, v in id2label.items()}
                net = _hf_class(cfg.backbone)(conf)
        else:
            from monai.networks.nets import DenseNet

            net = DenseNet(spatial_dims=2, in_channels=3, out_channels=n, **DENSENETS[cfg.backbone])
            if cfg.pretrained:
                _load_densenet(net, cfg)
    mean, std = normalization(cfg)
    return ImageClassifier(net, cfg.backbone, labels, mean, std, cfg.image_size)
