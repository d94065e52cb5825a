"""Tests of pipeline.models (registry, build, heads, capsules, freeze), parametrized over the registry (timm-style): config files,
exact parameter counts, forward/backward, freeze policies, weight loading and errors."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pipeline.models.build import build_model, count_parameters
from pipeline.models.capsules import squash
from pipeline.models.classifier import ImageClassifier, gradcam_target_layer
from pipeline.models.freeze import apply_freeze
from pipeline.models.heads import FlattenHead, GapLinearHead, PoolHead
from pipeline.models.catalog import default_model_config, describe_init, list_models

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
SCHEMA_KEYS = {"arch", "pretrained", "normalize", "head", "freeze"}
NUM_CLASSES = 3
INPUT = (2, 3, 64, 64)
# Architectures whose smallest input is above 64 px (Keras' InceptionV3 minimum is 75 px too).
INPUT_SIZE = {"inception_v3": 75}

# All parameters incl. frozen ones at 3 classes (Keras "trainable" counts; see REFERENCE.md).
EXPECTED_PARAMS = {
    "mini_covidnet": 3_338_947,
    "mobilenet_v2": 2_388_611,
    "nasnet_mobile": 4_369_045,
    "pocovidnet": 14_747_843,
    "resnet50": 23_639_491,  # no published count: timm backbone 23,508,032 + head 131,459
    "covid_caps": 295_488,
    "covid_caps_scaled": 3_286_048,
    # Generic timm entries, default gap_linear head (backbone + C*3+3):
    "xception": 20_813_099,      # backbone 20,806,952 = Keras Xception (trainable)
    "inception_v3": 21_791_715,  # backbone 21,785,568 = Keras 21,768,352 + 17,216 BN scales
    "densenet121": 6_956_931,    # backbone 6,953,856 = Keras DenseNet121 (trainable)
    "vgg16": 14_716_227,         # backbone 14,714,688 = Keras VGG16 notop
    "vgg19": 20_025_923,         # backbone 20,024,384 = Keras VGG19 notop
    "resnet18": 11_178_051,      # backbone 11,176,512 (torchvision/timm resnet18)
}
# Backbones alone (independent of the head); the Keras figures above where they exist.
EXPECTED_BACKBONE = {"xception": 20_806_952, "inception_v3": 21_785_568,
                     "densenet121": 6_953_856, "vgg16": 14_714_688, "vgg19": 20_024_384,
                     "resnet18": 11_176_512, "resnet50": 23_508_032}
# Trainable under each conf file's freeze policy, where it differs from the total.
EXPECTED_TRAINABLE = {"pocovidnet": 2_392_963}  # block5_conv3 + head (published)


def _input(arch: str) -> tuple[int, int, int, int]:
    """A small batch shape the architecture accepts."""
    size = INPUT_SIZE.get(arch, INPUT[-1])
    return (INPUT[0], 3, size, size)


def model_cfg(arch: str):
    """The real config file, as Hydra would load it."""
    return OmegaConf.load(CONF_MODEL / f"{arch}.yaml")


@functools.cache
def _cached(arch: str) -> ImageClassifier:
    torch.manual_seed(0)
    return build_model(model_cfg(arch), NUM_CLASSES)


@pytest.fixture
def default_model(request) -> ImageClassifier:
    """One model per arch for the whole run (building VGG16/NASNet costs seconds), reset to its
    config's freeze policy, no gradients, train mode."""
    model = _cached(request.param)
    freeze = default_model_config(request.param)["freeze"]
    apply_freeze(model, freeze["policy"], n=freeze["n"], layers=freeze["layers"])
    model.zero_grad(set_to_none=True)
    return model.train()


def _names_under(model, prefixes) -> set[str]:
    return {n for n, _ in model.named_parameters()
            if any(n == p or n.startswith(p + ".") for p in prefixes)}


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------ configs
def test_every_registered_model_has_a_conf_file_equal_to_its_defaults():
    assert sorted(p.stem for p in CONF_MODEL.glob("*.yaml")) == list_models()
    for arch in list_models():
        cfg = OmegaConf.to_container(model_cfg(arch))
        assert SCHEMA_KEYS <= set(cfg), arch
        assert set(cfg["head"]) == {"kind", "hidden", "activation", "dropout", "pool",
                                    "feature_map"}, arch
        assert set(cfg["freeze"]) == {"policy", "n", "layers"}, arch
        assert cfg == default_model_config(arch), f"conf/model/{arch}.yaml drifted from the code"
        assert cfg["pretrained"] == "none"  # offline machine: no download by default


# ------------------------------------------------------------------------------ counts
@pytest.mark.parametrize("default_model", list_models(), indirect=True)
def test_parameter_count(default_model):
    arch = default_model.arch
    assert count_parameters(default_model) == EXPECTED_PARAMS[arch]
    assert (count_parameters(default_model, trainable_only=True)
            == EXPECTED_TRAINABLE.get(arch, EXPECTED_PARAMS[arch]))


def test_scaled_caps_is_within_5_percent_of_mini_covidnet():
    ratio = EXPECTED_PARAMS["covid_caps_scaled"] / EXPECTED_PARAMS["mini_covidnet"]
    assert abs(ratio - 1) < 0.05


@pytest.mark.parametrize("arch", sorted(EXPECTED_BACKBONE))
def test_backbone_count(arch):
    assert count_parameters(_cached(arch).backbone) == EXPECTED_BACKBONE[arch]


# ------------------------------------------------------------------------------ forward/backward
@pytest.mark.parametrize("default_model", list_models(), indirect=True)
def test_forward_shape(default_model):
    default_model.eval()
    with torch.no_grad():
        out = default_model(torch.rand(*_input(default_model.arch)))
    assert out.shape == (INPUT[0], NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("default_model", list_models(), indirect=True)
def test_backward_reaches_exactly_the_trainable_parameters(default_model):
    torch.manual_seed(0)
    out = default_model(torch.rand(*_input(default_model.arch)))
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 2])).backward()
    for name, param in default_model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, f"frozen {name} got a gradient"


def test_smallest_input_works():
    model = _cached("mini_covidnet").eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, NUM_CLASSES)
    caps = _cached("covid_caps").eval()
    with torch.no_grad():
        assert caps(torch.rand(1, 3, 14, 14)).shape == (1, NUM_CLASSES)


def test_head_rejects_a_feature_map_larger_than_its_pool():
    head = _cached("mini_covidnet").head
    with pytest.raises(ValueError, match="at most 255 px"):
        head(torch.rand(2, 1024, 8, 8))  # 8x8 = a 256 px input


@pytest.mark.parametrize("default_model", list_models(), indirect=True)
def test_gradcam_target_layer_outputs_a_feature_map(default_model):
    seen = []
    handle = gradcam_target_layer(default_model).register_forward_hook(
        lambda module, args, output: seen.append(output.shape))
    try:
        default_model.eval()
        with torch.no_grad():
            default_model(torch.rand(*_input(default_model.arch)))
    finally:
        handle.remove()
    assert len(seen) == 1 and len(seen[0]) == 4 and seen[0][-1] >= 1


# ------------------------------------------------------------------------------ capsules
def test_caps_logits_are_log_lengths():
    model = _cached("covid_caps").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        lengths, logits = model.capsule_lengths(x), model(x)
    assert ((lengths >= 0) & (lengths < 1)).all()
    # softmax(log l) = l / sum(l): cross-entropy on the logits = Keras' CE on the lengths
    torch.testing.assert_close(logits.softmax(1), lengths / lengths.sum(1, keepdim=True))


def test_squash_uses_half_in_the_denominator():
    s = torch.tensor([[3.0, 4.0]])  # |s|^2 = 25
    length = squash(s).norm(dim=-1)
    torch.testing.assert_close(length, torch.tensor([25 / 25.5]), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------ freezing
@pytest.mark.parametrize("default_model", list_models(), indirect=True)
def test_blocks_partition_the_backbone(default_model):
    backbone = {n for n, _ in default_model.named_parameters() if n.startswith("backbone.")}
    seen: list[str] = []
    for block in default_model.blocks:
        names = _names_under(default_model, block)
        assert names, f"block {block} holds no parameter"
        seen += names
    assert sorted(seen) == sorted(backbone)  # each backbone parameter in exactly one block


@pytest.mark.parametrize("default_model", list_models(), indirect=True)
def test_freeze_policies_train_the_expected_parameters(default_model):
    model = default_model
    every = {n for n, _ in model.named_parameters()}
    head = _names_under(model, ["head"])
    apply_freeze(model, "all")
    assert _trainable(model) == every
    apply_freeze(model, "head_only")
    assert _trainable(model) == head
    apply_freeze(model, "last_n", n=2)
    assert _trainable(model) == head | _names_under(model, model.blocks[-2] + model.blocks[-1])
    apply_freeze(model, "last_n", n=0)
    assert _trainable(model) == head
    first = model.blocks[0][0]
    apply_freeze(model, "named", layers=[first])
    assert _trainable(model) == head | _names_under(model, [first])
    # a leading "backbone." may be left out
    apply_freeze(model, "named", layers=[first.removeprefix("backbone.")])
    assert _trainable(model) == head | _names_under(model, [first])


def test_published_freezes():
    vgg = _cached("pocovidnet")
    apply_freeze(vgg, "last_n", n=1)  # the last conv = block5_conv3 = the named default
    assert count_parameters(vgg, trainable_only=True) == 2_392_963
    assert _trainable(vgg) == _names_under(vgg, ["head", "backbone.28"])
    resnet = _cached("resnet50")
    apply_freeze(resnet, "last_n", n=3)  # the paper's "last three layers": the conv5 stage
    assert _trainable(resnet) == _names_under(resnet, ["head", "backbone.layer4"])
    # prefixes match at dots: backbone.2 is not backbone.28
    apply_freeze(vgg, "named", layers=["backbone.2"])
    assert _trainable(vgg) == _names_under(vgg, ["head", "backbone.2"])


def test_frozen_batchnorm_keeps_its_statistics():
    model = build_model({"arch": "mini_covidnet", "freeze": {"policy": "head_only"}}, NUM_CLASSES)
    model.train()
    assert not model.backbone.bn1.training and model.head.bn.training
    before = model.backbone.bn1.running_mean.clone()
    model(torch.rand(2, 3, 32, 32))
    torch.testing.assert_close(model.backbone.bn1.running_mean, before)


def test_freeze_errors_name_the_key():
    with pytest.raises(ValueError, match="model.freeze.policy.*all, last_n, named, head_only"):
        build_model({"arch": "covid_caps", "freeze": {"policy": "some"}}, NUM_CLASSES)
    with pytest.raises(ValueError, match="model.freeze.n=8 but covid_caps has 7"):
        build_model({"arch": "covid_caps", "freeze": {"policy": "last_n", "n": 8}}, NUM_CLASSES)
    with pytest.raises(ValueError, match="'backbone.conv9' matches no parameter"):
        build_model({"arch": "covid_caps", "freeze": {"policy": "named", "layers": ["conv9"]}},
                    NUM_CLASSES)


# ------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("arch", ["mini_covidnet", "covid_caps"])
def test_pretrained_from_a_backbone_file(arch, tmp_path):
    torch.manual_seed(1)
    source = build_model({"arch": arch}, NUM_CLASSES)
    path = tmp_path / "backbone.pt"
    torch.save(source.backbone.state_dict(), path)
    torch.manual_seed(2)  # a different random init, so equality means loaded
    model = build_model({"arch": arch, "pretrained": str(path)}, NUM_CLASSES)
    for name, tensor in source.backbone.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], tensor, msg=name)
    # a backbone file leaves the head at its fresh init
    head, source_head = model.head.state_dict(), source.head.state_dict()
    assert any(not torch.equal(head[k], source_head[k]) for k in head)


def test_pretrained_from_a_whole_model_checkpoint(tmp_path):
    source = build_model({"arch": "covid_caps"}, NUM_CLASSES)
    path = tmp_path / "model.pt"
    torch.save({"state_dict": source.state_dict(), "classes": ["a", "b", "c"]}, path)
    model = build_model({"arch": "covid_caps", "pretrained": str(path)}, NUM_CLASSES)
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)
    # another class count: the backbone loads, the head keeps its init, with a warning
    with pytest.warns(UserWarning, match="head not loaded"):
        binary = build_model({"arch": "covid_caps", "pretrained": str(path)}, 2)
    torch.testing.assert_close(binary.backbone.conv1.weight, source.backbone.conv1.weight)


def test_wrong_weights_file_gives_a_clear_error(tmp_path):
    path = tmp_path / "caps_backbone.pt"
    torch.save(_cached("covid_caps").backbone.state_dict(), path)
    with pytest.raises(ValueError, match=r"caps_backbone\.pt does not fit the mini_covidnet "
                                         r"backbone: missing keys: .*unexpected keys: "):
        build_model({"arch": "mini_covidnet", "pretrained": str(path)}, NUM_CLASSES)
    wide = tmp_path / "wide.pt"
    torch.save(_cached("covid_caps_scaled").backbone.state_dict(), wide)
    with pytest.raises(ValueError, match=r"mis-shaped \(file vs model\) keys: bn1.bias \(224,\) "
                                         r"vs \(64,\)"):
        build_model({"arch": "covid_caps", "pretrained": str(wide)}, NUM_CLASSES)
    junk = tmp_path / "junk.pt"
    torch.save([1, 2, 3], junk)
    with pytest.raises(ValueError, match="junk.pt holds no state dict"):
        build_model({"arch": "covid_caps", "pretrained": str(junk)}, NUM_CLASSES)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_model({"arch": "covid_caps", "pretrained": str(tmp_path / "missing.pt")},
                    NUM_CLASSES)


def test_imagenet_offline_fails_with_a_clear_error(monkeypatch, tmp_path):
    # The real timm path, cut off from the network: an empty Hugging Face cache, offline mode.
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"ImageNet weights of mini_covidnet \(timm "
                                           r"mobilenetv1_100\).*HF_HUB_OFFLINE"):
        build_model({"arch": "mini_covidnet", "pretrained": "imagenet"}, NUM_CLASSES)
    with pytest.raises(ValueError, match="no ImageNet weights exist for covid_caps"):
        build_model({"arch": "covid_caps", "pretrained": "imagenet"}, NUM_CLASSES)


def test_nasnet_imagenet_download_failure_is_explained(monkeypatch):
    from pytorchcv.models.common import model_store

    def offline(*args, **kwargs):
        raise OSError("Failed to resolve 'github.com'")

    monkeypatch.setattr(model_store, "get_model_file", offline)
    with pytest.raises(RuntimeError, match=r"pytorchcv nasnet_4a1056.*resolve 'github.com'"):
        build_model({"arch": "nasnet_mobile", "pretrained": "imagenet"}, NUM_CLASSES)


# ------------------------------------------------------------------------------ config errors
def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model.arch='vgg99'; valid names: covid_caps, "):
        build_model({"arch": "vgg99"}, NUM_CLASSES)
    with pytest.raises(ValueError, match="mini_covidnet"):
        build_model({"pretrained": "none"}, NUM_CLASSES)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="unknown key model.depth.*valid keys: arch, pretrained"):
        build_model({"arch": "resnet50", "depth": 50}, NUM_CLASSES)
    with pytest.raises(ValueError, match="unknown key model.head.units"):
        build_model({"arch": "resnet50", "head": {"units": 64}}, NUM_CLASSES)
    with pytest.raises(ValueError, match="model.normalize='tf'.*imagenet, none"):
        build_model({"arch": "resnet50", "normalize": "tf"}, NUM_CLASSES)
    with pytest.raises(ValueError, match="model.head.activation='gelu'.*prelu, relu"):
        build_model({"arch": "resnet50", "head": {"activation": "gelu"}}, NUM_CLASSES)


def test_normalize_is_applied_in_the_model():
    imagenet = build_model({"arch": "covid_caps", "normalize": "imagenet"}, NUM_CLASSES)
    x = torch.full((1, 3, 16, 16), 0.485)
    assert imagenet.normalize(x)[0, 0].abs().max() < 1e-6
    assert isinstance(_cached("covid_caps").normalize, torch.nn.Identity)
    assert "normalize.mean" not in imagenet.state_dict()  # checkpoints don't depend on it


def test_describe_init(tmp_path):
    assert describe_init({"arch": "mini_covidnet"}) == "none (from scratch)"
    assert (describe_init({"arch": "mini_covidnet", "pretrained": "imagenet"})
            == "imagenet (timm mobilenetv1_100)")
    assert (describe_init({"arch": "nasnet_mobile", "pretrained": "imagenet"})
            == "imagenet (pytorchcv nasnet_4a1056)")
    assert (describe_init({"arch": "covid_caps", "pretrained": str(tmp_path / "w.pt")})
            == "file: w.pt")
    with pytest.raises(ValueError, match="no ImageNet weights"):
        describe_init({"arch": "covid_caps", "pretrained": "imagenet"})


# ------------------------------------------------------------------------------ heads
def _flatten_cfg(arch: str, feature_map: int, **extra) -> dict:
    return {"arch": arch, "head": {"kind": "flatten", "feature_map": feature_map, "dropout": 0.0},
            **extra}


def test_existing_models_keep_the_pooled_mlp_head():
    for arch in ("mini_covidnet", "mobilenet_v2", "nasnet_mobile", "pocovidnet", "resnet50"):
        assert default_model_config(arch)["head"]["kind"] == "pool_mlp", arch
    assert isinstance(_cached("mini_covidnet").head, PoolHead)


def test_flatten_head_is_study_002s_dense_layer_on_the_whole_map():
    # Study 002's MobileNetV2 at 224 px: Dense(2) on 7x7x1280 = 125,442 trainable parameters;
    # at 64 px the map is 2x2, so Dense(2) on 2x2x1280.
    model = build_model(_flatten_cfg("mobilenet_v2", 2, freeze={"policy": "head_only"}), 2)
    assert count_parameters(model, trainable_only=True) == 1280 * 2 * 2 * 2 + 2
    assert count_parameters(model) == 2_223_872 + 1280 * 2 * 2 * 2 + 2
    big = build_model(_flatten_cfg("mobilenet_v2", 7), 2)
    assert count_parameters(big.head) == 125_442
    # backward: only the head trains, and every head parameter gets a gradient
    torch.manual_seed(0)
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 2)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == name.startswith("head."), name
        if param.grad is not None:
            assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_flatten_head_rejects_another_feature_map_naming_the_image_size():
    head = FlattenHead(1280, 2, feature_map=2, dropout=0.0)
    assert head(torch.rand(2, 1280, 2, 2)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"built for a 2x2 feature map.*gave 3x3.*"
                                         r"train\.image_size"):
        head(torch.rand(2, 1280, 3, 3))  # a 96 px input on a stride-32 backbone


def test_flatten_head_needs_a_feature_map():
    with pytest.raises(ValueError, match="kind=flatten needs model.head.feature_map"):
        build_model({"arch": "resnet18", "head": {"kind": "flatten"}}, 2)
    with pytest.raises(ValueError, match="feature_map must be null or an integer >= 1"):
        build_model(_flatten_cfg("resnet18", 0), 2)
    with pytest.raises(ValueError, match=r"model.head.kind='mlp'.*pool_mlp, flatten, gap_linear"):
        build_model({"arch": "resnet18", "head": {"kind": "mlp"}}, 2)
    with pytest.raises(ValueError, match="covid_caps has no such head"):
        build_model({"arch": "covid_caps", "head": {"kind": "gap_linear"}}, 2)


def test_gap_linear_head_works_at_any_size():
    head = GapLinearHead(8, 3, dropout=0.0)
    x = torch.rand(2, 8, 5, 3)
    torch.testing.assert_close(head(x), head.fc(x.mean((2, 3))))
    assert count_parameters(head) == 8 * 3 + 3


# ------------------------------------------------------------------------------ generic entries
def test_resnet18_cifar_stem_is_medmnists_28px_resnet():
    torch.manual_seed(0)
    model = build_model({"arch": "resnet18", "stem": "cifar"}, 2)
    # 3x3 conv1 (1,728) instead of 7x7 (9,408); + Linear(512, 2)
    assert count_parameters(model) == 11_169_858
    conv1 = model.backbone.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.bias) == ((3, 3), (1, 1), None)
    assert isinstance(model.backbone.maxpool, torch.nn.Identity)
    model.eval()
    with torch.no_grad():
        assert model.backbone(torch.rand(2, 3, 28, 28)).shape == (2, 512, 4, 4)  # stride 8
        assert model(torch.rand(2, 3, 28, 28)).shape == (2, 2)


def test_resnet18_stem_errors():
    with pytest.raises(ValueError, match="model.stem='tiny'.*imagenet, cifar"):
        build_model({"arch": "resnet18", "stem": "tiny"}, 2)
    with pytest.raises(ValueError, match="stem=cifar.*ImageNet weights do not fit"):
        build_model({"arch": "resnet18", "stem": "cifar", "pretrained": "imagenet"}, 2)


def test_gradcam_layers_of_the_generic_entries():
    assert gradcam_target_layer(_cached("vgg16")) is _cached("vgg16").backbone[29]  # last ReLU
    assert gradcam_target_layer(_cached("vgg19")) is _cached("vgg19").backbone[35]
    assert _cached("densenet121").gradcam_layer == "backbone.features.norm5"
    assert _cached("xception").gradcam_layer == "backbone.act4"
    assert _cached("inception_v3").gradcam_layer == "backbone.Mixed_7c"
    assert len(_cached("densenet121").blocks) == 62  # stem + 58 dense layers + 3 transitions


def test_inception_normalisation():
    model = _cached("xception")
    assert default_model_config("inception_v3")["normalize"] == "inception"
    torch.testing.assert_close(model.normalize(torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)),
                               torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1))


def test_describe_init_of_the_generic_entries():
    expected = {"xception": "timm legacy_xception.tf_in1k",
                "inception_v3": "timm inception_v3.tf_in1k",
                "densenet121": "timm densenet121.ra_in1k",
                "vgg16": "timm vgg16.tv_in1k (convolutional base)",
                "vgg19": "timm vgg19.tv_in1k (convolutional base)",
                "resnet18": "timm resnet18.a1_in1k"}
    for arch, source in expected.items():
        assert describe_init({"arch": arch, "pretrained": "imagenet"}) == f"imagenet ({source})"
