"""Feature extractors: uint8 grayscale images -> one feature vector each, from local weights only.

``build_extractor(cfg)`` returns a ``FeatureExtractor`` (``kind``, ``identity`` with the sha256 of
the weights, ``__call__(images) -> float64 [N, D]``). Images are made square (``fit``), resized
and replicated to three channels, then normalised as each network expects:

- ``tiny``: a random conv net built from ``features.tiny`` and its seed (tests, the demo);
- ``inception``: torch-fidelity's ``FeatureExtractorInceptionV3`` (the FID format, 2048-d pool
  features) from ``weights-inception-2015-12-05-6726825d.pth``; it takes uint8 and normalises itself;
- ``resnet50``: a transformers ``ResNetModel`` folder, its pooled output;
- ``sam``: a SAM image encoder (Meta's .pth or a train-sam model), its embedding mean-pooled;
- ``classifier``: a train-classifier model, the input of its last linear layer (penultimate features),
  after the model's own eval transform.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sonosynth.infra.config import ConfigError
from sonosynth.launch.quality.config import FeaturesConfig, TinyFeaturesConfig

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INCEPTION_HINT = ("torch-fidelity's Inception needs `pip install --no-deps torch-fidelity==0.4.0` (its package "
                  "requires torchvision, which this stack cannot install; the Inception module itself needs only "
                  "torch) and the weights weights-inception-2015-12-05-6726825d.pth from "
                  "https://github.com/toshas/torch-fidelity/releases/tag/v0.2.0 (see docs/quality.md); or use "
                  "features.kind resnet50, sam or classifier")


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file, or of a folder (its files' relative names and contents, in order)."""
    from sonosynth.trainers.sam.models import sha256_file

    path = Path(path).expanduser()
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def square_batch(images: list[np.ndarray], size: int, fit: str) -> torch.Tensor:
    """float32 [B, 3, size, size] in [0, 1]: each image centre-cropped (``fit=center_crop``) or not,
    resized (bilinear, antialiased) and replicated to three channels."""
    out = []
    for image in images:
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32) / 255.0)
        if x.ndim == 3:
            x = x.mean(-1)
        if fit == "center_crop":
            h, w = x.shape
            side = min(h, w)
            x = x[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
        x = torch.nn.functional.interpolate(x[None, None], size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)[0]
        out.append(x.clamp(0, 1).expand(3, -1, -1))
    return torch.stack(out)


class FeatureExtractor:
    """A network and its preprocessing: ``extractor(images) -> float64 [N, D]``."""

    def __init__(self, kind: str, identity: dict[str, Any], forward: Callable[[list[np.ndarray]], torch.Tensor],
                 batch_size: int):
        self.kind, self.identity, self._forward, self.batch_size = kind, identity, forward, batch_size

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        chunks = [self._forward(images[i:i + self.batch_size]).double().cpu()
                  for i in range(0, len(images), self.batch_size)]
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, 0))


class TinyFeatureNet(torch.nn.Module):
    """Random 3x3 stride-2 convolutions with GELU, mean-pooled: features that tell textures apart."""

    def __init__(self, cfg: TinyFeaturesConfig):
        super().__init__()
        widths = [3, *cfg.channels]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.layers = torch.nn.Sequential(*[m for c_in, c_out in zip(widths, widths[1:]) for m in (
                torch.nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), torch.nn.GELU())])
            for conv in self.layers[::2]:  # He init keeps the activations' scale through the layers
                torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                torch.nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - 0.5) / 0.25).mean(dim=(2, 3))


def _device(cfg: FeaturesConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _local(cfg: FeaturesConfig, what: str, want_dir: bool) -> Path:
    path = Path(cfg.weights).expanduser()
    if "://" in cfg.weights or not (path.is_dir() if want_dir else path.is_file()):
        raise ConfigError(f"features.weights {cfg.weights!r} is not a local {'folder' if want_dir else 'file'}; "
                          f"give the local {what} (docs/quality.md says where to get it)")
    return path


def _tiny(cfg: FeaturesConfig, device: torch.device) -> tuple[Callable, dict[str, Any]]:
    net = TinyFeatureNet(cfg.tiny).to(device).eval()
    size = cfg.image_size or 64
    return (lambda ims: net(square_batch(ims, size, cfg.fit).to(device)),
            {"weights": None, "sha256": None, "name": f"tiny-random-seed{cfg.tiny.seed}-{cfg.tiny.channels}"})


def torch_fidelity_importable() -> bool:
    """Make ``torch_fidelity`` importable without torchvision; False when it is not installed.

    Its package ``__init__`` imports torchvision (for extractors we do not use); the Inception
    module needs only torch. Without torchvision a bare ``torch_fidelity`` package is registered
    (like ``sam_modeling``), which also keeps ``import torchmetrics`` (it imports that module when
    torch-fidelity is installed) from failing."""
    if "torch_fidelity" in sys.modules:
        return True
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        return False
    if importlib.util.find_spec("torchvision") is None:
        bare = types.ModuleType("torch_fidelity")
        bare.__path__ = list(spec.submodule_search_locations or [])
        bare.__package__ = "torch_fidelity"
        sys.modules["torch_fidelity"] = bare
    return True


def fidelity_inception_class() -> type:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (a ConfigError naming the fix when it is missing)."""
    if not torch_fidelity_importable():
        raise ConfigError(f"features.kind inception: torch-fidelity is not installed. {INCEPTION_HINT}")
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


def _inception(cfg: FeaturesConfig, device: torch.device) -> tuple[Callable, dict[str, Any]]:
    path = _local(cfg, "Inception FID weights (weights-inception-2015-12-05-6726825d.pth)", want_dir=False)
    cls = fidelity_inception_class()
    try:
        net = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)).to(device).eval()
    except Exception as err:  # noqa: BLE001 - a wrong state dict, a truncated or non-torch file
        raise ConfigError(f"features.weights {path} is not torch-fidelity's Inception-v3 state dict "
                          f"({str(err).splitlines()[0][:200]})") from None
    size = cfg.image_size or 299

    def forward(images: list[np.ndarray]) -> torch.Tensor:
        x = (square_batch(images, size, cfg.fit) * 255).round().to(torch.uint8)
        return net(x.to(device))[0]

    return forward, {"weights": str(path), "sha256": weights_sha256(path), "name": "inception-v3-fid"}


def _resnet(cfg: FeaturesConfig, device: torch.device) -> tuple[Callable, dict[str, Any]]:
    import json

    from transformers import ResNetModel

    root = _local(cfg, "transformers ResNetModel folder (save_pretrained)", want_dir=True)
    conf = json.loads((root / "config.json").read_text()) if (root / "config.json").is_file() else {}
    if conf.get("model_type") != "resnet":
        raise ConfigError(f"features.weights {root} is not a transformers ResNet folder (config.json model_type is "
                          f"{conf.get('model_type')!r}); convert the weights with ResNetModel.save_pretrained")
    net = ResNetModel.from_pretrained(root, local_files_only=True).to(device).eval()
    pre = root / "preprocessor_config.json"
    norm = json.loads(pre.read_text()) if pre.is_file() else {}
    mean = torch.tensor(norm.get("image_mean") or IMAGENET_MEAN, device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm.get("image_std") or IMAGENET_STD, device=device).view(1, -1, 1, 1)
    size = cfg.image_size or 224

    def forward(images: list[np.ndarray]) -> torch.Tensor:
        x = (square_batch(images, size, cfg.fit).to(device) - mean) / std
        return net(pixel_values=x).pooler_output.flatten(1)

    return forward, {"weights": str(root), "sha256": weights_sha256(root), "name": "resnet"}


def _sam(cfg: FeaturesConfig, device: torch.device, tracking_uri: str | None, storage) -> tuple[Callable, dict]:
    from sonosynth.infra.model_registry import is_mlflow_uri, model_folder
    from sonosynth.trainers.sam.models import SamModelConfig, build_sam, embed, load_sam_model

    path = Path(cfg.weights).expanduser()
    if path.is_file():
        sam, digest = build_sam(SamModelConfig(arch=cfg.sam_arch, checkpoint=str(path))), weights_sha256(path)
    else:
        with model_folder(cfg.weights, tracking_uri if is_mlflow_uri(cfg.weights) else None, what="SAM model",
                          required="sam_finetuned.pt", storage=storage,
                          hint="a SAM .pth, or the model/ folder written by `sonosynth train-sam`") as folder:
            try:
                sam = load_sam_model(str(folder), base_checkpoint=cfg.base_checkpoint)
            except FileNotFoundError as err:
                raise ConfigError(f"features.weights={cfg.weights!r}: {err}") from None
            digest = weights_sha256(folder)
    sam = sam.to(device).eval()
    size = cfg.image_size or sam.image_encoder.img_size
    if size != sam.image_encoder.img_size:
        raise ConfigError(f"features.image_size {size} is not the SAM encoder's input "
                          f"{sam.image_encoder.img_size}; leave it null for sam")

    def forward(images: list[np.ndarray]) -> torch.Tensor:
        x = square_batch(images, size, cfg.fit).to(device) * 255
        x = (x - sam.pixel_mean) / sam.pixel_std
        return embed(sam, x).float().mean(dim=(2, 3))

    return forward, {"weights": cfg.weights, "sha256": digest, "name": "sam-image-encoder"}


def _classifier(cfg: FeaturesConfig, device: torch.device, tracking_uri: str | None, storage) -> tuple[Callable, dict]:
    from sonosynth.infra.model_registry import is_mlflow_uri, model_folder
    from sonosynth.trainers.classifier.predict import load_classifier

    with model_folder(cfg.weights, tracking_uri if is_mlflow_uri(cfg.weights) else None, what="classifier",
                      storage=storage, hint="the model/ folder written by `sonosynth train-classifier`") as folder:
        clf = load_classifier(folder, device=str(device))
        digest = weights_sha256(clf.folder)
    heads = [m for m in clf.model.modules() if isinstance(m, torch.nn.Linear)]
    if not heads:
        raise ConfigError(f"features.weights {cfg.weights}: the classifier has no linear head to take features from")
    seen: list[torch.Tensor] = []
    heads[-1].register_forward_pre_hook(lambda _module, args: seen.append(args[0]))

    def forward(images: list[np.ndarray]) -> torch.Tensor:
        seen.clear()
        clf.model(torch.stack([clf.transform(im) for im in images]).to(device))
        return seen[-1].flatten(1)

    return forward, {"weights": cfg.weights, "sha256": digest, "name": clf.model.backbone}


def build_extractor(cfg: FeaturesConfig, tracking_uri: str | None = None, storage=None) -> FeatureExtractor:
    """The extractor of ``cfg`` on its device (``tracking_uri``: MLflow for models:/ weights)."""
    device = _device(cfg)
    if cfg.kind == "tiny":
        forward, identity = _tiny(cfg, device)
    elif cfg.kind == "inception":
        forward, identity = _inception(cfg, device)
    elif cfg.kind == "resnet50":
        forward, identity = _resnet(cfg, device)
    elif cfg.kind == "sam":
        forward, identity = _sam(cfg, device, tracking_uri, storage)
    else:
        forward, identity = _classifier(cfg, device, tracking_uri, storage)
    return FeatureExtractor(cfg.kind, {"kind": cfg.kind, **identity}, forward, cfg.batch_size)
