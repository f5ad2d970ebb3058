"""timm's Eva family (DINOv3, EVA-02) and DINOv2 with registers as essa backbones, on tiny random models (32 px
images, 8 px patches, 2 blocks, width 64): building with CLS pooling, every tuner exact at init and after merge,
exports that reload by path alone, RoPE kept right under VPT, iBOT masking and MAE's visible tokens, activation
recompute, and the DINOv3 licence note."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from essa import backbones, families, tuners
from essa.ssl.mae import MAE, MAEDecoder, encode_visible, random_masks
from essa.ssl.masking import forward_masked
from essa.ssl.simmim import SimMIM, cell_masks
from essa.train.memory import recompute_frozen
from tests.train.test_adapt import XRAYS, folders  # noqa: F401  (the fixture: 24 X-rays, a labelled set of 20)
from tests.tuners.test_tuners import _perturb, assert_steps_change_only_trainable

TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
#: id -> timm name: what each covers
ARCHS = {
    "dinov3": "vit_small_patch16_dinov3",  # RoPE, 4 registers, layer scale, fused qkv without bias, GELU MLP
    "eva02-ti": "eva02_tiny_patch14_224",  # abs + RoPE, packed SwiGLU (GluMlp), fused qkv with q/v biases (timm
    #                                        calls F.linear on the qkv weight, past wrappers, unless told otherwise)
    "eva02-b": "eva02_base_patch14_224",  # separate q/k/v projections, SwiGLU with fc1_g/fc1_x and its norm
    "dinov2-reg4": "vit_small_patch14_reg4_dinov2",  # a timm VisionTransformer with 4 register tokens
}
EVAS = [a for a in ARCHS if a != "dinov2-reg4"]

CONFIGS = [
    ("full", {}),
    ("linear", {}),
    ("bitfit", {}),
    ("apla", {}),
    ("apla", {"r": 16, "blocks": [1]}),
    ("lora", {"r": 4}),
    ("lora", {"r": 2, "targets": ["attn.proj", "mlp.fc2"]}),
    ("ssf", {}),
    ("apla+lora", {"apla": {"r": 8}}),
    ("vpt", {"tokens": 3}),
    ("vpt", {"tokens": 2, "deep": False}),
    ("adaptformer", {"bottleneck": 8}),
]
MERGEABLE = [c for c in CONFIGS if c[0] not in ("vpt", "adaptformer")]
INIT_EXACT = [c for c in CONFIGS if c[0] != "vpt"]  # prompts change the outputs from the start


def _ids(configs):
    return [f"{n}-{'-'.join(f'{k}{v}' for k, v in o.items())}" if o else n for n, o in configs]


#: DINOv3's and DINOv2's layer scales start at 1e-5, which leaves a random tiny model's blocks nearly silent:
#: larger here, so that a tuner's effect on the outputs is well above the tolerances.
LAYER_SCALE = {"dinov3": {"init_values": 0.5}, "dinov2-reg4": {"init_values": 0.5}}


def tiny(arch, **kwargs):
    torch.manual_seed(0)
    return backbones.create(ARCHS[arch], **{**TINY, **LAYER_SCALE.get(arch, {}), **kwargs})


@pytest.fixture
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ----- building -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", EVAS)
def test_an_eva_is_built_with_cls_pooling_after_the_final_norm(arch, images):
    model = tiny(arch).eval()
    assert families.is_eva(model) and model.global_pool == "token" and isinstance(model.norm, nn.LayerNorm)
    assert "global_pool" not in model.essa_arch["model_args"]  # the default, not a recorded choice
    with torch.no_grad():
        tokens = model.forward_features(images)
        assert torch.equal(model(images), tokens[:, 0])
    assert tokens.shape == (2, model.num_prefix_tokens + 16, 64)
    # the mean patch token when asked for it, with the final norm kept (fine-tuning's head.pool=avg)
    avg = tiny(arch, global_pool="avg", fc_norm=False).eval()
    with torch.no_grad():
        assert torch.allclose(avg(images), tokens[:, model.num_prefix_tokens:].mean(1), atol=1e-6)


def test_dinov2_with_registers_keeps_its_four_register_tokens(images):
    model = tiny("dinov2-reg4").eval()
    assert model.num_prefix_tokens == 5 and model.reg_token.shape == (1, 4, 64)
    assert tiny("dinov3").num_prefix_tokens == 5


@pytest.mark.parametrize("arch", ["dinov3", "dinov2-reg4"])
def test_token_avg_pools_the_cls_and_the_mean_patch_without_registers_and_reloads(arch, images, tmp_path):
    model = tiny(arch, global_pool="token+avg", num_classes=3).eval()
    assert isinstance(model, backbones.TokenAvgEva if arch == "dinov3" else backbones.TokenAvgViT)
    with torch.no_grad():
        tokens = model.forward_features(images)
        expected = model.head(torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1))
        assert torch.allclose(model(images), expected, atol=1e-6)
        path = tuners.save_merged(model, tmp_path / "classifier.safetensors")
        assert torch.equal(backbones.create(weights=path).eval()(images), model(images))


def test_unknown_and_unsupported_names_are_explained():
    with pytest.raises(backbones.BackboneError, match="Did you mean: .*vit_small_patch16_dinov3"):
        backbones.create("vit_small_patch16_dinov4")
    with pytest.raises(backbones.BackboneError, match="mixed"):
        backbones.create("vit_small_patch16_rope_mixed_224", img_size=32, patch_size=8, depth=1)
    with pytest.raises(tuners.TunerError, match="timm VisionTransformer .* or timm Eva .*DINOv3, EVA-02.*Linear"):
        tuners.apply(nn.Linear(2, 2), "apla")


def test_patch_size_is_read_without_building_the_model():
    assert backbones.patch_size("vit_small_patch16_dinov3") == 16
    assert backbones.patch_size("eva02_tiny_patch14_224", patch_size=8, fc_norm=False) == 8


# ----- tuners ---------------------------------------------------------------------------------------------------
#: (arch, tuner, options): every configuration on DINOv3 and EVA-02 B; on EVA-02 Ti (q/v biases beside a fused qkv)
#: and DINOv2 with registers the ones that touch what differs there (qkv, prefix tokens)
MATRIX = ([(a, n, o) for a in ("dinov3", "eva02-b") for n, o in CONFIGS]
          + [("eva02-ti", n, o) for n, o in CONFIGS if (n, o) in [("lora", {"r": 4}), ("ssf", {}), ("bitfit", {}),
                                                                   ("apla+lora", {"apla": {"r": 8}}),
                                                                   ("vpt", {"tokens": 3})]]
          + [("dinov2-reg4", n, o) for n, o in CONFIGS if n in ("lora", "ssf", "vpt") or o.get("blocks")])


@pytest.mark.parametrize("arch, name, options", MATRIX, ids=[f"{a}-{i}" for a, i in
                                                            zip([m[0] for m in MATRIX], _ids([m[1:] for m in MATRIX]))])
def test_each_tuner_is_exact_at_init_trains_only_itself_and_merges_and_reloads_exactly(arch, images, tmp_path, name,
                                                                                       options):
    base = tiny(arch, num_classes=3).eval()
    model = tuners.apply(copy.deepcopy(base), name, **options).eval()
    with torch.no_grad():
        start = base.forward_features(images)
        if name != "vpt":  # prompts change the outputs from the start; every other tuner is the identity at init
            assert (model.forward_features(images) - start).abs().max() <= 1e-5
    assert_steps_change_only_trainable(model, images)  # two AdamW steps: training moved the tuner
    model.eval()
    with torch.no_grad():
        tuned = model.forward_features(images)
    if name != "linear":  # the tuner acts: LoRA and SSF on a fused qkv with q/v biases are not bypassed
        assert (tuned - start).abs().max() > 1e-3
    if tuners.tuner_of(model).mergeable:
        merged = tuners.merge(model).eval()
        with torch.no_grad():
            assert (merged.forward_features(images) - tuned).abs().max() <= 1e-5
        assert set(merged.state_dict()) == set(base.state_dict())
        assert [type(m) for m in merged.modules()] == [type(m) for m in base.modules()]
        path = tuners.save_merged(model, tmp_path / "merged.safetensors")
    else:
        with pytest.warns(UserWarning, match="cannot be folded"):
            path = tuners.save_merged(model, tmp_path / "kept.safetensors")
    reloaded = backbones.create(weights=path).eval()  # by path alone
    assert type(reloaded) is type(base)
    with torch.no_grad():
        assert (reloaded.forward_features(images) - tuned).abs().max() <= 1e-5


def test_shallow_vpt_prompts_are_extra_register_tokens_outside_rope(images):
    """Prompts sit after the registers and are not rotated: the VPT model computes what a DINOv3 with 4 + 3
    registers computes, the prompts as the extra registers, with those outputs left out."""
    model = tuners.apply(tiny("dinov3"), "vpt", tokens=3, deep=False).eval()
    _perturb(model)
    reference = backbones.create(ARCHS["dinov3"], **TINY, **LAYER_SCALE["dinov3"], num_reg_tokens=7).eval()
    state = {k: v for k, v in model.state_dict().items() if "vpt" not in k}
    state["reg_token"] = torch.cat([state["reg_token"], model.blocks[0].vpt_prompts.detach()], dim=1)
    reference.load_state_dict(state)
    with torch.no_grad():
        expected = reference.forward_features(images)
        expected = torch.cat([expected[:, :5], expected[:, 8:]], dim=1)
        assert (model.forward_features(images) - expected).abs().max() <= 1e-5
    assert all(block.attn.num_prefix_tokens == 8 for block in model.blocks)


def test_lora_on_separate_qkv_layers_and_its_targets_named_in_errors():
    model = tuners.apply(tiny("eva02-b"), "lora")  # default target qkv: EVA-02 B has q_proj, k_proj, v_proj
    wrapped = sorted(n for n, _ in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj")))
    assert wrapped == [f"blocks.{i}.attn.{p}" for i in (0, 1) for p in ("k_proj", "q_proj", "v_proj")]
    assert all(hasattr(model.get_submodule(n), "lora_A") for n in wrapped)
    with pytest.raises(tuners.TunerError, match="valid targets: .*attn.q_proj.*mlp.fc1_g, mlp.fc1_x, mlp.fc2"):
        tuners.apply(tiny("eva02-b"), "lora", targets=["mlp.fc1"])


def test_ssf_scales_a_layer_without_bias_and_shifts_none():
    model = tuners.apply(tiny("dinov3"), "ssf")
    qkv = model.blocks[0].attn.qkv
    assert qkv.bias is None and hasattr(qkv, "ssf_scale") and not hasattr(qkv, "ssf_shift")
    assert hasattr(model.blocks[0].attn.proj, "ssf_shift")


# ----- activation recompute ------------------------------------------------------------------------------------
#: (tuner, options, the largest share of activations kept with recompute): APLA's frozen stretches before
#: attn.proj and fc2 (0.26-0.40 measured), LoRA on qkv the MLP's (0.54-0.70), SSF trains in every stretch (1)
RECOMPUTE = [("apla", {"r": 16}, 0.5), ("lora", {}, 0.8), ("ssf", {}, 1.0)]


@pytest.mark.parametrize("arch", EVAS)
@pytest.mark.parametrize("name, options, share", RECOMPUTE, ids=[r[0] for r in RECOMPUTE])
def test_recompute_frozen_keeps_fewer_activations_and_the_same_gradients_on_eva_blocks(arch, images, name, options,
                                                                                      share):
    from essa.bench import SavedActivations

    plain = tuners.apply(tiny(arch, dynamic_img_size=True), name, **options)
    recomputed = copy.deepcopy(plain)
    assert recompute_frozen(recomputed) == ["blocks.0", "blocks.1"]
    grads, kept = [], []
    for model in (plain, recomputed):
        with SavedActivations(model.parameters()) as saved:
            out = model.forward_features(images)
        out.pow(2).mean().backward()
        kept.append(saved.mib)
        grads.append({n: p.grad for n, p in tuners.trainable_parameters(model).items()})
    assert kept[1] <= share * kept[0]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n


# ----- objectives -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_a_mask_token_keeps_the_position_of_the_patch_it_replaces(arch, images):
    """With the mask token equal to the masked patch's own embedding, iBOT's masked forward is the plain one:
    the position embedding and RoPE rotation a masked patch gets are its own."""
    model = tuners.apply(tiny(arch), "vpt", tokens=2).eval()  # prompts too: RoPE must skip them
    x = images[:1]
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 1, 2] = True
    with torch.no_grad():
        token = model.patch_embed(x).reshape(1, 16, 64)[0, 6]
        assert (forward_masked(model, x, masks, token) - model.forward_features(x)).abs().max() <= 1e-5
        other = forward_masked(model, x, masks, torch.zeros(64))
        assert (other - model.forward_features(x)).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_mae_encodes_the_visible_patches_at_their_own_positions(arch, images):
    """Blocks that see only the visible patches compute what the whole sequence computes when attention may not
    look at the masked patches: the visible patches keep their positions (RoPE rows gathered as timm does)."""
    model = tiny(arch).eval()
    masks = random_masks(2, (4, 4), ratio=0.75, generator=torch.Generator().manual_seed(0))
    prefix = model.num_prefix_tokens
    keep = torch.cat([torch.ones(2, prefix, dtype=torch.bool), ~masks.flatten(1)], dim=1)  # (B, prefix + 16)
    attn_mask = keep[:, None, None, :]  # every query attends to the prefix and the visible patches only
    with torch.no_grad():
        visible = encode_visible(model, images, masks)
        whole = model.forward_features(images, attn_mask=attn_mask)
    assert visible.shape == (2, prefix + 4, 64)
    expected = whole[keep].reshape(2, prefix + 4, 64)
    assert (visible - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["dinov3", "eva02-b", "dinov2-reg4"])
@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_a_reconstruction_step_trains_the_tuner_of_an_eva(arch, images, objective):
    backbone = tuners.apply(tiny(arch, dynamic_img_size=True), "apla", r=8)
    if objective == "mae":
        model = MAE(backbone, MAEDecoder(64, 8, width=32, depth=1, heads=4))
        masks = random_masks(2, (4, 4), generator=torch.Generator().manual_seed(0))
    else:
        model = SimMIM(backbone)
        masks = cell_masks(2, (4, 4), cell=1, ratio=0.5, generator=torch.Generator().manual_seed(0))
    loss, pred, _ = model(images, masks)
    assert pred.shape == (2, 16, 8 * 8 * 3) and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in tuners.trainable_parameters(backbone).items()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


# ----- licence --------------------------------------------------------------------------------------------------
@pytest.fixture
def offline_pretrained(monkeypatch):
    """``pretrained=True`` without a download: timm builds random weights (the licence comes from timm's config)."""
    create_model = backbones.timm.create_model
    monkeypatch.setattr(backbones.timm, "create_model",
                        lambda name, pretrained=False, **kw: create_model(name, pretrained=False, **kw))
    monkeypatch.setattr(backbones, "_noted", set())


def test_dinov3_weights_note_their_licence_once_and_exports_record_it(offline_pretrained, tmp_path):
    with pytest.warns(UserWarning, match="vit_small_patch16_dinov3: .*Meta's DINOv3 License.*licence=dinov3-license"):
        model = backbones.create("vit_small_patch16_dinov3.lvd1689m", pretrained=True, **TINY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        again = backbones.create("vit_small_patch16_dinov3.lvd1689m", pretrained=True, **TINY)
    assert model.essa_arch["licence"] == again.essa_arch["licence"] == "dinov3-license"
    tuners.apply(model, "apla", r=8)
    merged = tuners.save_merged(model, tmp_path / "merged.safetensors")
    state = tuners.save(model, tmp_path / "tuner.safetensors")
    for path in (merged, state):
        assert backbones.read_state_dict(path)[1]["licence"] == "dinov3-license"
    assert backbones.create(weights=merged).essa_arch["licence"] == "dinov3-license"  # carried on
    # random weights and EVA-02's MIT-licensed ones carry none
    assert "licence" not in tiny("dinov3").essa_arch
    assert "licence" not in backbones.create("eva02_tiny_patch14_224", pretrained=True, **TINY).essa_arch
    assert "licence" not in backbones.read_state_dict(
        tuners.save_merged(tiny("dinov3"), tmp_path / "random.safetensors"))[1]
    assert json.loads(backbones.read_state_dict(merged)[1]["model_args"]) == TINY
    # a file that is not essa's (no header): DINOv3 weights from elsewhere are Meta's
    torch.save(tiny("dinov3", init_values=1e-5).state_dict(), tmp_path / "foreign.pth")
    foreign = backbones.create("vit_small_patch16_dinov3", weights=tmp_path / "foreign.pth", **TINY)
    assert foreign.essa_arch["licence"] == "dinov3-license"


def test_eva02_checkpoints_keep_their_final_norm_under_cls_pooling(offline_pretrained, images, tmp_path):
    """EVA-02's checkpoints put the final norm on the pooled mean (timm moves a masked-image-modelling checkpoint's
    ``norm`` to ``fc_norm``): essa loads them in that layout and puts the norm on every token, where the CLS token
    reads it."""
    pretrained = backbones.create("eva02_tiny_patch14_224", pretrained=True, **TINY).eval()
    plain = tiny("eva02-ti").eval()
    assert isinstance(pretrained.norm, nn.LayerNorm) and isinstance(pretrained.fc_norm, nn.Identity)
    assert set(pretrained.state_dict()) == set(plain.state_dict()) and pretrained.global_pool == "token"
    # a masked-image-modelling checkpoint from elsewhere (a mask token, the final norm as norm.*)
    state = {**plain.state_dict(), "mask_token": torch.zeros(1, 1, 64)}
    torch.save(state, tmp_path / "mim.pth")
    loaded = backbones.create("eva02_tiny_patch14_224", weights=tmp_path / "mim.pth", **TINY).eval()
    with torch.no_grad():
        assert torch.equal(loaded.forward_features(images), plain.forward_features(images))


# ----- end to end: one SSA epoch per objective, one fine-tuning epoch, the CLI ------------------------------------
def _backbone_section(arch):
    args = {**{k: v for k, v in TINY.items() if k != "img_size"}, **LAYER_SCALE.get(arch, {})}
    return {"name": ARCHS[arch], "pretrained": False, "model_args": args}


@pytest.mark.skipif(not XRAYS.is_dir(), reason=f"shared chest X-rays not found at {XRAYS}")
@pytest.mark.parametrize("arch, objective", [("dinov3", "dinov2"), ("dinov3", "mae"), ("dinov3", "simmim"),
                                             ("dinov2-reg4", "dinov2")])
def test_one_ssa_step_per_objective_trains_monitors_the_cls_token_and_exports(folders, tmp_path, arch,  # noqa: F811
                                                                              objective):
    """``essa adapt``'s own path (frozen-stretch recompute planned for the memory budget by default, the kNN
    monitor on CLS features): one step on 8 X-rays; the export reloads by path alone and equals the fresh backbone
    with the saved tuner state."""
    import lightning as L

    from essa.adaptation import adapt
    from tests.train.test_adapt import TINY as ADAPT, _cfg
    from tests.train.test_adapt_mim import SMALL_DECODER

    sections = {"backbone": _backbone_section(arch), "objective": objective, "tuner": {"name": "apla",
                                                                                     "options": {"r": 8}},
                "optim": {"epochs": 1, "batch_size": 8, "warmup": 0}, "ssl": {**ADAPT["ssl"], "head_warmup": 0},
                **SMALL_DECODER}
    cfg = _cfg(folders, tmp_path / "run", **sections)
    cfg.data.max_images = 8
    assert cfg.optim.recompute_frozen == "auto"
    result = adapt(cfg)
    (row,) = result["metrics"]
    assert row["step"] == 1
    assert 0.0 <= row["knn_bal_acc"] <= 1.0 and torch.isfinite(torch.tensor(row["total"]))
    assert result["resources"]["trainable_params"] == 2 * (8 * 64 + 8)
    exported = backbones.create(weights=result["backbone"]).eval()
    assert type(exported).__name__ == ("VisionTransformer" if arch == "dinov2-reg4" else "Eva")
    L.seed_everything(0, verbose=False)
    base = cfg.backbone.build(img_size=32, dynamic_img_size=True)
    start = copy.deepcopy(base).eval()
    tuners.load(base, result["tuner"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (exported.forward_features(x) - base.eval().forward_features(x)).abs().max() <= 1e-5
        assert (exported.forward_features(x) - start.forward_features(x)).abs().max() > 1e-5  # it trained


def test_one_finetuning_epoch_on_dinov3_exports_a_classifier_that_reloads(tmp_path):
    from essa.finetuning import finetune, resolve_config
    from tests.train.test_finetune import BREAST, QUIET, SMALL, _sections

    if not BREAST.is_file():
        pytest.skip(f"shared BreastMNIST not found at {BREAST}")
    sections = _sections(tmp_path / "run", backbone=_backbone_section("dinov3"), tuner={"name": "lora"},
                         data=SMALL["data"], optim={**SMALL["optim"], "epochs": 1}, img_size=32)
    result = finetune(resolve_config(sections=sections), trainer_kwargs=QUIET)
    seed = result["seeds"][0]
    assert 0.0 <= seed["test"]["auc"] <= 1.0
    classifier = backbones.create(weights=seed["run_dir"] / "classifier.safetensors").eval()
    assert families.is_eva(classifier) and classifier.global_pool == "token" and classifier.num_classes == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # the head reads the CLS token after the final norm
        assert torch.allclose(classifier(x), classifier.head(classifier.forward_features(x)[:, 0]), atol=1e-6)


def test_the_tuners_table_of_dinov3_small_builds_random_weights(capsys, monkeypatch):
    from essa.commands import main

    monkeypatch.setattr(backbones, "_hub_reachable", lambda: pytest.fail("the table must not reach the Hub"))
    assert main(["tuners", "--backbone", "vit_small_patch16_dinov3", "--img-size", "32",
                 "--options", '{"apla": {"r": 64}}', "--json"]) == 0
    rows = {row["tuner"]: row for row in json.loads(capsys.readouterr().out)}
    model = backbones.create("vit_small_patch16_dinov3", img_size=32)
    total = sum(p.numel() for p in model.parameters())
    assert rows["full"]["trainable"] == rows["full"]["backbone"] == total
    assert rows["apla"]["trainable"] == 12 * (64 * 384 + 64)  # 12 blocks, width 384
    assert rows["lora"]["trainable"] == 12 * 8 * (384 + 3 * 384)  # rank 8 on the fused qkv
    assert rows["bitfit"]["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    assert rows["vpt"]["trainable"] == 12 * 10 * 384
