"""DaViT model: native and reference paths against timm's DaViT with the same random weights."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from dovetail_ext.davit import CONFIGS, create_model, load_timm_state_dict  # noqa: E402

from davit_helpers import assert_derived, isa_path  # noqa: E402


def _timm_model(name: str, seed: int = 0):
    """timm DaViT with random weights (hub weights cannot be fetched here). timm's init leaves
    biases at 0 and norms at identity, which would hide the padding path (padded tokens'
    q/k/v equal the qkv bias): give them random values too."""
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.05)
            elif "norm" in n:
                p.normal_(1, 0.1)
    return m


@pytest.fixture(scope="module")
def tiny_pair():
    ref = _timm_model("davit_tiny")
    ours = load_timm_state_dict(create_model("davit_tiny"), ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("batch,h,w", [(1, 224, 224), (3, 224, 224), (1, 231, 197), (3, 231, 197)])
def test_tiny_matches_timm(tiny_pair, batch, h, w):
    ref, ours = tiny_pair
    x = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(batch * h + w))
    with torch.no_grad():
        t32 = ref(x)
        t64 = ref.double()(x.double())
        ref.float()
        native = ours(x)
        refpath = ours.forward_reference(x)
    assert native.shape == (batch, 1000)
    assert_derived(native, t64, t32, what=f"native {batch}x{h}x{w}")
    assert_derived(refpath, t64, t32, what=f"reference {batch}x{h}x{w}")


@pytest.mark.parametrize("isa", ["scalar", "avx2"])
def test_tiny_on_other_isa_paths(tiny_pair, isa):
    ref, ours = tiny_pair
    x = torch.randn(1, 3, 59, 45, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        t32 = ref(x)
        t64 = ref.double()(x.double())
        ref.float()
        with isa_path(isa):
            native = ours(x)
    assert_derived(native, t64, t32, what=f"native on {isa}")


@pytest.mark.parametrize("name", ["davit_small", "davit_base"])
def test_small_and_base_match_timm(name):
    ref = _timm_model(name, seed=1)
    ours = load_timm_state_dict(create_model(name), ref.state_dict())
    assert ours.cfg == CONFIGS[name]
    x = torch.randn(1, 3, 70, 53, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        t32 = ref(x)
        t64 = ref.double()(x.double())
        native = ours(x)
    assert_derived(native, t64, t32, what=name)


def test_gradients_take_the_reference_path(tiny_pair):
    ref, _ = tiny_pair
    model = load_timm_state_dict(create_model("davit_tiny"), ref.state_dict()).train()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(13))
    logits = model(x)
    assert logits.requires_grad
    logits.square().mean().backward()
    g = model.stages[0].blocks[0][1].attn.qkv.weight.grad  # channel attention weights get gradients
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(model(x), logits.detach(), atol=1e-4, rtol=1e-4)


def test_image_gradients_take_the_reference_path():
    """An image that requires grad gets its gradient even with frozen weights (the native
    path has no backward)."""
    model = create_model("davit_tiny", **SMALL).requires_grad_(False)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    y = model(x)
    assert y.requires_grad
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


SMALL = dict(embed_dims=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2), num_classes=10)


@pytest.mark.parametrize("change,match", [
    (dict(window_size=0), r"window_size must be an integer in \[1, 16\]"),
    (dict(window_size=65536), r"window_size must be an integer in \[1, 16\]"),
    (dict(window_size=2.5), "window_size"), (dict(window_size=True), "window_size"),
    (dict(num_heads=(3, 2, 2, 2)), "stage 0 has embed_dims 8 over num_heads 3"),
    (dict(num_heads=(0, 2, 2, 2)), r"num_heads\[0\] must be a positive integer"),
    (dict(depths=(1, 1)), "one entry per stage"),
    (dict(embed_dims=(8, 16, 16, 264), num_heads=(2, 2, 2, 1)), "at most 256 channels"),
    (dict(num_classes=0), "num_classes must be a positive integer"),
])
def test_config_is_checked_when_made(change, match):
    with pytest.raises(ValueError, match=match):
        create_model("davit_tiny", **{**SMALL, **change})


def test_bad_images_and_state_dicts_are_named():
    import numpy as np

    model = create_model("davit_tiny", **SMALL)
    for img, match in [(torch.randn(1, 3, 32, 32).double(), "must be float32"),
                       (torch.randn(3, 32, 32), r"must be \[B, 3, H, W\]"),
                       (torch.randn(0, 3, 32, 32), r"B, H, W >= 1"), (torch.randn(1, 1, 32, 32), r"\[B, 3, H, W\]"),
                       (np.zeros((1, 3, 32, 32), np.float32), "must be a torch tensor")]:
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=match):
                model(img)
    sd = model.state_dict()
    for bad, match in [("/tmp/x.pth", "state_dict must be a mapping"), (None, "state_dict must be a mapping"),
                       ({**sd, "head.fc.bias": "abc"}, "'head.fc.bias' is not a tensor")]:
        with pytest.raises(ValueError, match=match):
            load_timm_state_dict(model, bad)


def test_native_path_repacks_after_weight_update(tiny_pair):
    ref, _ = tiny_pair
    model = load_timm_state_dict(create_model("davit_tiny"), ref.state_dict())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        before = model(x)
        model.stages[3].blocks[0][0].mlp.fc2.weight.mul_(2.0)
        after = model(x)
        assert not torch.allclose(before, after)
        assert torch.allclose(after, model.forward_reference(x), atol=1e-4, rtol=1e-4)


def _to_original(key: str) -> str:
    """timm key -> Microsoft checkpoint key (inverse of the loader's translation)."""
    key = key.replace("cpe1", "cpe.0").replace("cpe2", "cpe.1")
    if key.startswith("stem."):
        key = "patch_embeds.0." + key[5:].replace("conv", "proj")
    key = key.replace(".downsample.conv", ".downsample.proj")
    for i in range(4):
        key = key.replace(f"stages.{i}.downsample.", f"patch_embeds.{i}.")
        key = key.replace(f"stages.{i}.blocks.", f"main_blocks.{i}.")
    if key.startswith("head.fc."):
        key = "head." + key[8:]
    elif key.startswith("head.norm."):
        key = "norms." + key[10:]
    return key


def test_loads_original_checkpoint_naming(tiny_pair):
    ref, ours = tiny_pair
    original = {"state_dict": {_to_original(k): v for k, v in ref.state_dict().items()}}
    assert "patch_embeds.0.proj.weight" in original["state_dict"]
    model = load_timm_state_dict(create_model("davit_tiny"), original)
    for (k, a), b in zip(model.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k


def test_loader_names_the_mismatch(tiny_pair):
    ref, _ = tiny_pair
    sd = dict(ref.state_dict())
    model = create_model("davit_tiny")
    missing = {k: v for k, v in sd.items() if k != "stages.2.blocks.1.0.attn.qkv.bias"}
    with pytest.raises(ValueError, match="missing .*'stages.2.blocks.1.0.attn.qkv.bias'"):
        load_timm_state_dict(model, missing)
    with pytest.raises(ValueError, match="unexpected .*'extra.weight'"):
        load_timm_state_dict(model, {**sd, "extra.weight": torch.zeros(1)})
    bad = {**sd, "head.fc.weight": torch.zeros(10, 768)}
    with pytest.raises(ValueError, match=r"'head.fc.weight' has shape \(10, 768\), expected \(1000, 768\)"):
        load_timm_state_dict(model, bad)
    with pytest.raises(ValueError, match=r"'stem.conv.weight' has shape \(128, 3, 7, 7\)"):
        load_timm_state_dict(model, {**sd, "stem.conv.weight": torch.zeros(128, 3, 7, 7)})


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown DaViT model 'davit_huge'"):
        create_model("davit_huge")


def test_native_path_refuses_other_dtypes(tiny_pair):
    _, ours = tiny_pair
    with pytest.raises(ValueError, match="the image must be float32"):
        ours.forward_native(torch.zeros(1, 3, 32, 32, dtype=torch.float64))


def test_tiny_bf16_within_pytorch_bf16_error(tiny_pair):
    """bf16 projections + MLP (fp32 elsewhere) against float64 timm: no worse than timm run
    under PyTorch's own bf16 autocast (matmuls and convolutions in bf16)."""
    ref, ours = tiny_pair
    x = torch.randn(1, 3, 115, 97, generator=torch.Generator().manual_seed(15))  # pads at every stage
    with torch.no_grad():
        t64 = ref.double()(x.double())
        ref.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            t_bf16 = ref(x).float()
        try:
            native = ours.set_precision("bf16")(x)
        finally:
            ours.set_precision("fp32")
    assert_derived(native, t64, t_bf16, factor=1.0, what="bf16 model")
