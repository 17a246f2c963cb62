"""Init registry: every init resolves to real weights or fails with the exact fix; no silent random init."""

import pytest
import timm
import torch

from trainables.models import (
    InitError,
    ResolvedInit,
    WeightsFileError,
    create_meta_model,
    create_model,
    resolve_init,
    save_weights,
)


def test_random_init_builds_a_one_channel_five_label_model():
    model = create_model("test_convnext", resolve_init("random", "test_convnext"))
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 5)


def test_missing_timm_weights_offline_is_an_error_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(InitError, match=r"init_weights: \{dinov3: /path/to/model.safetensors\}"):
        resolve_init("dinov3", "convnext_small")


def test_missing_local_weight_file_is_named(tmp_path):
    with pytest.raises(InitError, match=r"init_weights\.imagenet: file .*nope\.safetensors does not exist"):
        resolve_init("imagenet", "convnext_tiny", weights_file=str(tmp_path / "nope.safetensors"))


def test_tags_an_architecture_lacks_are_refused():
    with pytest.raises(InitError, match=r"no pretrained weights 'test_convnext.fb_in1k' \(init 'imagenet'\)"):
        resolve_init("imagenet", "test_convnext")


def test_missing_domain_checkpoint_says_how_to_make_it(tmp_path):
    with pytest.raises(InitError, match="run `dpsweep pretrain"):
        resolve_init("domain", "test_convnext", domain_checkpoint=tmp_path / "model.safetensors")


def test_unknown_init_and_model_list_the_choices():
    with pytest.raises(InitError, match="unknown init 'imagenett'; choose one of"):
        resolve_init("imagenett", "test_convnext")
    with pytest.raises(InitError, match="unknown model 'convnext_smol'"):
        resolve_init("random", "convnext_smol")


def test_local_timm_weights_load_and_fold_rgb_stem(tmp_path):
    # An RGB ImageNet-style checkpoint of the architecture, as a user would download it.
    torch.manual_seed(0)
    rgb = timm.create_model("test_convnext", num_classes=1000)
    path = tmp_path / "test_convnext.safetensors"
    save_weights(rgb, path)
    init = resolve_init("test_convnext.r160_in1k", "test_convnext", weights_file=str(path))
    model = create_model("test_convnext", init)
    stem = model.stem[0].weight
    assert stem.shape[1] == 1
    assert torch.allclose(stem[:, 0], rgb.stem[0].weight.sum(dim=1), atol=1e-5)  # RGB folded into one channel
    assert torch.equal(model.stages[1].blocks[0].conv_dw.weight, rgb.stages[1].blocks[0].conv_dw.weight)


def test_domain_checkpoint_keeps_its_head(tmp_path):
    torch.manual_seed(1)
    source = create_model("test_convnext", resolve_init("random", "test_convnext"))
    path = tmp_path / "model.safetensors"
    save_weights(source, path)
    model = create_model("test_convnext", resolve_init("domain", "test_convnext", domain_checkpoint=path))
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(model(x), source(x))
    assert ResolvedInit("domain", "checkpoint", "test_convnext", str(path)) == resolve_init(
        "domain", "test_convnext", domain_checkpoint=path
    )


def test_the_meta_model_is_the_model_a_trial_builds(tmp_path):
    """`create_meta_model` builds what `create_model` builds (every tensor's name, shape and dtype), for each kind
    of init, on the meta device: no memory, and the weight file read for names and shapes only."""
    torch.manual_seed(0)
    save_weights(timm.create_model("test_convnext", num_classes=1000), tmp_path / "rgb.safetensors")
    save_weights(
        create_model("test_convnext", resolve_init("random", "test_convnext")), tmp_path / "domain.safetensors"
    )
    inits = [
        resolve_init("random", "test_convnext"),
        resolve_init("test_convnext.r160_in1k", "test_convnext", weights_file=str(tmp_path / "rgb.safetensors")),
        resolve_init("domain", "test_convnext", domain_checkpoint=tmp_path / "domain.safetensors"),
    ]
    for init in inits:
        real, meta = create_model("test_convnext", init), create_meta_model("test_convnext", init)
        assert {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()} == {
            k: (v.shape, v.dtype) for k, v in real.state_dict().items()
        }, init.kind
        assert {v.device.type for v in meta.state_dict().values()} == {"meta"}


def test_a_weight_file_that_is_not_the_models_checkpoint_is_refused_naming_it(tmp_path):
    text = tmp_path / "weights.safetensors"
    text.write_text("see the shared drive\n")
    other = tmp_path / "other.safetensors"
    save_weights(timm.create_model("test_convnext2"), other)
    for path, problem in ((text, "is not a safetensors file"), (other, "does not hold test_convnext.r160_in1k")):
        init = resolve_init("test_convnext.r160_in1k", "test_convnext", weights_file=str(path))
        with pytest.raises(WeightsFileError, match=problem) as raised:
            create_meta_model("test_convnext", init)
        assert raised.value.path == path
