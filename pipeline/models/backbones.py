"""The architectures built on backbones from maintained packages (timm, pytorchcv).

Each builder takes the backbone without its classifier, adds the configured head
(:func:`pipeline.models.heads.build_head`) and lists the backbone's blocks (for the ``last_n``
freeze policy) and its Grad-CAM layer. ``pretrained: imagenet`` loads the package's own ImageNet
weights, named in each ``@register`` line.
"""

from __future__ import annotations

from torch import nn

from pipeline.models.classifier import ImageClassifier
from pipeline.models.heads import build_head
from pipeline.models.registry import STEM_CHOICES, check_choice, register


def _imagenet_error(arch: str, source: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"model.pretrained=imagenet: could not load the ImageNet weights of {arch} ({source}): "
        f"{type(err).__name__}: {err}. Without internet access, put the weights in the package's "
        f"cache first (timm: the Hugging Face cache, HF_HOME, with HF_HUB_OFFLINE=1, or for "
        f"weights timm fetches by URL, legacy_xception's, the torch hub cache "
        f"$TORCH_HOME/hub/checkpoints; pytorchcv: ~/.torch/models), or set model.pretrained to "
        f"none or to a local weights file")


def _timm_backbone(arch: str, name: str, pretrained: bool) -> nn.Module:
    """A timm model without pooling/classifier: its forward returns the last feature map.

    ``pretrained=True`` goes through timm's own loading (Hugging Face hub/cache; honours
    HF_HUB_OFFLINE), i.e. timm's ImageNet-1k weights (``pretrained_cfg`` names the tag), not the
    Keras applications weights the study used.
    """
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="")
    except (OSError, RuntimeError) as err:  # hub/cache errors are OSErrors
        if not pretrained:
            raise
        raise _imagenet_error(arch, f"timm {name}", err) from err


def _blocks_of(prefix: str, module: nn.Module) -> list[tuple[str]]:
    return [(f"{prefix}.{name}",) for name, _ in module.named_children()]


def _mobilenet_blocks(backbone: nn.Module) -> list[tuple[str, ...]]:
    """Stem, then every block of every stage of a timm MobileNet (v1 or v2)."""
    blocks: list[tuple[str, ...]] = [("conv_stem", "bn1")]
    for stage_name, stage in backbone.blocks.named_children():
        blocks += _blocks_of(f"blocks.{stage_name}", stage)
    return blocks


@register("timm mobilenetv1_100")
def mini_covidnet(cfg: dict, num_classes: int) -> ImageClassifier:
    """Mini-COVIDNet: MobileNet v1 (width 1.0) features + the 128-unit PReLU head."""
    backbone = _timm_backbone("mini_covidnet", "mobilenetv1_100", cfg["pretrained"] == "imagenet")
    blocks = _mobilenet_blocks(backbone)
    return ImageClassifier(backbone, build_head(cfg, backbone.num_features, num_classes),
                           arch="mini_covidnet", normalize=cfg["normalize"], blocks=blocks,
                           gradcam_layer="blocks.4")


@register("timm mobilenetv2_100")
def mobilenet_v2(cfg: dict, num_classes: int) -> ImageClassifier:
    """MobileNetV2 (width 1.0) features incl. the 1x1 conv to 1280 + the 128-unit PReLU head."""
    backbone = _timm_backbone("mobilenet_v2", "mobilenetv2_100", cfg["pretrained"] == "imagenet")
    blocks = _mobilenet_blocks(backbone) + [("conv_head", "bn2")]
    return ImageClassifier(backbone, build_head(cfg, backbone.num_features, num_classes),
                           arch="mobilenet_v2", normalize=cfg["normalize"], blocks=blocks,
                           gradcam_layer="bn2")


@register("pytorchcv nasnet_4a1056")
def nasnet_mobile(cfg: dict, num_classes: int) -> ImageClassifier:
    """NASNet-A Mobile (4@1056) features + the 128-unit PReLU head.

    The backbone is pytorchcv's ``nasnet_4a1056`` (same parameter count as Keras NASNetMobile)
    without its final 7x7 pooling. ``pretrained: imagenet`` uses pytorchcv's own download of its
    published ImageNet-1k weights (osmr/imgclsmob GitHub releases, cached in ~/.torch/models).
    """
    from pytorchcv.model_provider import get_model  # imported here: it takes seconds

    pretrained = cfg["pretrained"] == "imagenet"
    try:
        net = get_model("nasnet_4a1056", pretrained=pretrained)
    except (OSError, RuntimeError, ValueError) as err:  # requests' errors are OSErrors
        if not pretrained:
            raise
        raise _imagenet_error("nasnet_mobile", "pytorchcv nasnet_4a1056", err) from err
    backbone = net.features
    backbone.final_pool = nn.Identity()  # the head pools, as on Keras' include_top=False output
    blocks = []
    for name, child in backbone.named_children():
        if name.startswith("stage"):
            blocks += _blocks_of(name, child)
        elif any(True for _ in child.parameters()):
            blocks.append((name,))
    return ImageClassifier(backbone, build_head(cfg, 1056, num_classes), arch="nasnet_mobile",
                           normalize=cfg["normalize"], blocks=blocks, gradcam_layer="activ")


@register("timm vgg16 (convolutional base)",
           head={"hidden": 64, "activation": "relu"},
           # Published POCOVID-Net: only block5_conv3 (= features index 28) and the head train.
           freeze={"policy": "named", "layers": ["backbone.28"]})
def pocovidnet(cfg: dict, num_classes: int) -> ImageClassifier:
    """POCOVID-Net: the VGG16 convolutional base (13 convs + 5 max-pools) + the 64-unit ReLU head.

    Backbone parameter names follow torchvision/timm ``vgg16.features`` indices: Keras
    ``block5_conv3`` is ``backbone.28`` (its ReLU, ``backbone.29``, is the Grad-CAM layer).
    """
    vgg = _timm_backbone("pocovidnet", "vgg16", cfg["pretrained"] == "imagenet")
    backbone = vgg.features
    blocks = [(name,) for name, child in backbone.named_children() if isinstance(child, nn.Conv2d)]
    return ImageClassifier(backbone, build_head(cfg, 512, num_classes), arch="pocovidnet",
                           normalize=cfg["normalize"], blocks=blocks, gradcam_layer="29")


@register("timm resnet50", head={"hidden": 64, "activation": "relu"},
           # The paper's text fine-tunes "the last three layers" (policy last_n, n 3 = the three
           # conv5 bottlenecks); the study's notebooks trained all layers, the default here.
           freeze={"policy": "all", "n": 3})
def resnet50(cfg: dict, num_classes: int) -> ImageClassifier:
    """ResNet50 features (stem + 16 bottlenecks) + the 64-unit ReLU head."""
    backbone = _timm_backbone("resnet50", "resnet50", cfg["pretrained"] == "imagenet")
    return _resnet_classifier(backbone, "resnet50", cfg, num_classes)


def _resnet_classifier(backbone: nn.Module, arch: str, cfg: dict,
                       num_classes: int) -> ImageClassifier:
    """A timm ResNet + the configured head; blocks = the stem, then every residual block."""
    blocks = [("conv1", "bn1")]
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        blocks += _blocks_of(stage, getattr(backbone, stage))
    return ImageClassifier(backbone, build_head(cfg, backbone.num_features, num_classes),
                           arch=arch, normalize=cfg["normalize"], blocks=blocks,
                           gradcam_layer="layer4")


# --------------------------------------------------------------------------------------------
# Generic timm backbones (study 002's comparison table; MedMNIST's ResNet-18)
# --------------------------------------------------------------------------------------------
# The entries below are not in the Mini-COVIDNet study, whose pooled MLP head they do not need:
# they default to the size-independent gap_linear head without dropout (study 002's Keras head
# and MedMNIST's have none). Study 002's own head is `head.kind: flatten` with the feature map
# of its 224 px input (conf/experiment/cxr_pneumonia_mobilenetv2.yaml).
# ImageNet weights come from the timm tag in each timm name (pinned so that a timm release that
# changes its default tag cannot change the weights silently).
_GENERIC_HEAD = {"kind": "gap_linear", "dropout": 0.0}


def _param_blocks(module: nn.Module, prefix: str = "") -> list[tuple[str]]:
    """One block per child that holds parameters (parameter-free pools/activations skipped)."""
    return [(f"{prefix}{name}",) for name, child in module.named_children()
            if any(True for _ in child.parameters())]


@register("timm legacy_xception.tf_in1k", normalize="inception", head=_GENERIC_HEAD)
def xception(cfg: dict, num_classes: int) -> ImageClassifier:
    """Xception (Chollet 2017) features + head.

    timm ``legacy_xception``: the original Keras Xception layout (entry flow, 8 middle-flow
    blocks, exit flow; 20.8M backbone parameters). ``pretrained: imagenet`` loads
    ``legacy_xception.tf_in1k``, the Keras/TF Xception weights ported to PyTorch (Cadene's
    pretrained-models file, a GitHub release URL cached in the torch hub cache, not the Hugging
    Face hub); they expect ``normalize: inception`` ([-1, 1] pixels, as Keras preprocess_input).
    """
    backbone = _timm_backbone("xception", "legacy_xception.tf_in1k",
                              cfg["pretrained"] == "imagenet")
    blocks = [("conv1", "bn1"), ("conv2", "bn2")]
    blocks += [(f"block{i}",) for i in range(1, 13)]
    blocks += [("conv3", "bn3"), ("conv4", "bn4")]
    return ImageClassifier(backbone, build_head(cfg, backbone.num_features, num_classes),
                           arch="xception", normalize=cfg["normalize"], blocks=blocks,
                           gradcam_layer="act4")


@register("timm inception_v3.tf_in1k", normalize="inception", head=_GENERIC_HEAD)
def inception_v3(cfg: dict, num_classes: int) -> ImageClassifier:
    """Inception v3 (Szegedy et al. 2016) features up to Mixed_7c + head; no auxiliary head.

    ``pretrained: imagenet`` loads ``inception_v3.tf_in1k`` (Hugging Face
    timm/inception_v3.tf_in1k): the TensorFlow-trained weights, the origin of Keras'
    InceptionV3 weights, which expect ``normalize: inception``. Inputs of at least 75 px; the
    map is 5x5 at 224 px (8x8 at the native 299 px).
    """
    backbone = _timm_backbone("inception_v3", "inception_v3.tf_in1k",
                              cfg["pretrained"] == "imagenet")
    return ImageClassifier(backbone, build_head(cfg, backbone.num_features, num_classes),
                           arch="inception_v3", normalize=cfg["normalize"],
                           blocks=_param_blocks(backbone), gradcam_layer="Mixed_7c")


@register("timm densenet121.ra_in1k", head=_GENERIC_HEAD)
def densenet121(cfg: dict, num_classes: int) -> ImageClassifier:
    """DenseNet-121 features (incl. the final BatchNorm + ReLU, ``features.norm5``) + head.

    ``pretrained: imagenet`` loads ``densenet121.ra_in1k`` (Hugging Face timm/densenet121.ra_in1k,
    timm's RandAugment recipe, ImageNet mean/std); ``densenet121.tv_in1k`` (torchvision's) is the
    other tag. Blocks: the stem, each of the 58 dense layers, the 3 transitions; ``norm5`` goes
    with the last dense layer.
    """
    backbone = _timm_backbone("densenet121", "densenet121.ra_in1k",
                              cfg["pretrained"] == "imagenet")
    blocks = [("features.conv0", "features.norm0")]
    for name, child in backbone.features.named_children():
        if name.startswith("denseblock"):
            blocks += _blocks_of(f"features.{name}", child)
        elif name.startswith("transition"):
            blocks.append((f"features.{name}",))
    blocks[-1] += ("features.norm5",)
    return ImageClassifier(backbone, build_head(cfg, backbone.num_features, num_classes),
                           arch="densenet121", normalize=cfg["normalize"], blocks=blocks,
                           gradcam_layer="features.norm5")


def _vgg(arch: str, timm_name: str, cfg: dict, num_classes: int) -> ImageClassifier:
    """A VGG convolutional base (``features``, ending with the 5th max-pool: 7x7x512 at 224 px,
    as Keras' ``include_top=False``) + head; blocks = the conv layers, Grad-CAM on the last ReLU.
    timm's 4096-wide ``pre_logits`` (fc6/fc7 as convs) is dropped, as in Keras' convolutional
    base."""
    vgg = _timm_backbone(arch, timm_name, cfg["pretrained"] == "imagenet")
    backbone = vgg.features
    blocks = [(name,) for name, child in backbone.named_children() if isinstance(child, nn.Conv2d)]
    relus = [name for name, child in backbone.named_children() if isinstance(child, nn.ReLU)]
    return ImageClassifier(backbone, build_head(cfg, 512, num_classes), arch=arch,
                           normalize=cfg["normalize"], blocks=blocks, gradcam_layer=relus[-1])


@register("timm vgg16.tv_in1k (convolutional base)", head=_GENERIC_HEAD)
def vgg16(cfg: dict, num_classes: int) -> ImageClassifier:
    """VGG16 convolutional base (13 convs) + head; ``pretrained: imagenet`` loads
    ``vgg16.tv_in1k`` (torchvision's weights, Hugging Face timm/vgg16.tv_in1k). Same backbone as
    pocovidnet, with this registry's generic head and no freeze by default."""
    return _vgg("vgg16", "vgg16.tv_in1k", cfg, num_classes)


@register("timm vgg19.tv_in1k (convolutional base)", head=_GENERIC_HEAD)
def vgg19(cfg: dict, num_classes: int) -> ImageClassifier:
    """VGG19 convolutional base (16 convs) + head; ``pretrained: imagenet`` loads
    ``vgg19.tv_in1k`` (torchvision's weights, Hugging Face timm/vgg19.tv_in1k)."""
    return _vgg("vgg19", "vgg19.tv_in1k", cfg, num_classes)


@register("timm resnet18.a1_in1k", head=_GENERIC_HEAD, stem="imagenet")
def resnet18(cfg: dict, num_classes: int) -> ImageClassifier:
    """ResNet-18 features (stem + 8 basic blocks) + head (global pool + linear by default).

    ``stem: imagenet`` is the standard 7x7/2 conv + 3x3/2 max-pool (MedMNIST's "ResNet-18 (224)"
    row; ``pretrained: imagenet`` loads ``resnet18.a1_in1k``, Hugging Face
    timm/resnet18.a1_in1k, timm's A1 recipe). ``stem: cifar`` is MedMNIST's 28 px ResNet-18:
    conv1 3x3 stride 1 without bias and no max-pool, so a 28 px input keeps a 4x4 map at layer4
    (stride 8 instead of 32). MedMNIST feeds 1-channel images; this pipeline's input is RGB, so
    conv1 has 3 input channels (1,152 parameters more than MedMNIST's grey model).
    """
    check_choice("model.stem", cfg["stem"], STEM_CHOICES)
    pretrained = cfg["pretrained"] == "imagenet"
    if pretrained and cfg["stem"] == "cifar":
        raise ValueError("model.stem=cifar replaces conv1 (3x3 stride 1), which the ImageNet "
                         "weights do not fit: use model.stem=imagenet with pretrained=imagenet, "
                         "or pretrained=none (MedMNIST trains the 28 px ResNet from scratch)")
    backbone = _timm_backbone("resnet18", "resnet18.a1_in1k", pretrained)
    if cfg["stem"] == "cifar":
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        # timm ResNet's own conv init, so the stem starts like the rest of the network
        nn.init.kaiming_normal_(backbone.conv1.weight, mode="fan_out", nonlinearity="relu")
        backbone.maxpool = nn.Identity()
    return _resnet_classifier(backbone, "resnet18", cfg, num_classes)


