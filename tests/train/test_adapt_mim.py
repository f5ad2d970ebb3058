"""``essa adapt`` with the masked-image-modelling objectives (objective: mae | simmim) on real chest X-rays with a
tiny ViT: end to end with the kNN monitor and the reconstruction pictures, exports that load, exact resume after a
SIGKILL, the config's checks and the command-line flag."""

import json

import pytest
import torch
import yaml

from essa import backbones, config as config_mod, tuners
from essa.adaptation import AdaptConfig, adapt, resolve_config
from tests.train.test_adapt import XRAYS, _cfg, folders  # noqa: F401  (folders: the fixture)
from tests.train.test_reliability import _killed, _same_weights, _strip

pytestmark = pytest.mark.skipif(not XRAYS.is_dir(), reason=f"shared chest X-rays not found at {XRAYS}")

SMALL_DECODER = {"mae": {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 4}}


def _mim(folders, out, objective, **sections):  # noqa: F811
    return _cfg(folders, out, objective=objective, **{**SMALL_DECODER, **sections})


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_two_epochs_monitor_knn_draw_reconstructions_and_export_the_student(folders, tmp_path, objective):  # noqa: F811
    result = adapt(_mim(folders, tmp_path / "run", objective))
    run = result["run_dir"]
    rows = result["metrics"]
    assert [r["epoch"] for r in rows] == [0, 1]
    for row in rows:
        assert 0.0 <= row["knn_bal_acc"] <= 1.0 and row["feature_rank"] > 1.0
        assert row["reconstruction"] == row["total"] > 0 and torch.isfinite(torch.tensor(row["total"]))
        assert "dino" not in row
    for epoch in (0, 1):
        picture = run / "reconstructions" / f"epoch_{epoch:03d}.png"
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["objective"] == objective
    resources = json.loads((run / "resources.json").read_text())
    assert resources == result["resources"]
    assert resources["objective"] == objective and resources["decoder_params"] > 0 and "head" not in resources
    assert resources["trainable_params"] == 2 * (16 * 192 + 16)  # APLA r=16 in 2 blocks: the decoder is not counted
    assert resources["images"] == 24 and resources["peak_memory_mib"] > 0 and resources["images_per_s"] > 0

    # the export is a plain ViT; the tuner state applied to a fresh foundation model (random weights, seeded as
    # the run) gives the same features
    exported = backbones.create(weights=result["backbone"]).eval()
    import lightning as L

    L.seed_everything(0, verbose=False)
    base = _mim(folders, tmp_path / "unused", objective).backbone.build(img_size=32, dynamic_img_size=True)
    tuners.load(base, result["tuner"])
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (exported.forward_features(x) - base.eval().forward_features(x)).abs().max() <= 1e-5
    # and the export moved away from the foundation model
    L.seed_everything(0, verbose=False)
    start = _mim(folders, tmp_path / "unused", objective).backbone.build(img_size=32, dynamic_img_size=True).eval()
    with torch.no_grad():
        assert (exported.forward_features(x) - start.forward_features(x)).abs().max() > 1e-4
    assert result["decoder"] == run / "decoder.safetensors"


@pytest.mark.parametrize("objective", ["mae", "simmim"])
def test_a_decoder_file_starts_the_next_run_and_a_foreign_one_is_refused(folders, tmp_path, objective):  # noqa: F811
    from safetensors.torch import load_file, save_file

    from essa.config import ConfigError
    from essa.objectives import get

    result = adapt(_mim(folders, tmp_path / "run", objective, optim={"epochs": 1, "batch_size": 8}))
    cfg = _mim(folders, tmp_path / "next", objective, **{objective: {**SMALL_DECODER.get(objective, {}),
                                                                    "decoder_weights": str(result["decoder"])}})
    backbone = cfg.backbone.build(img_size=32, dynamic_img_size=True)
    tuners.apply(backbone, cfg.tuner.name, **cfg.tuner.options)
    module = get(objective).module(cfg, backbone, iters_per_epoch=3)
    state = load_file(result["decoder"])
    own = {k: v for k, v in module.model.state_dict().items() if not k.startswith("backbone.")}
    assert state.keys() == own.keys() and all(torch.equal(state[k], own[k]) for k in state)
    save_file({"decoder.weight": torch.zeros(2, 2)}, str(tmp_path / "foreign.safetensors"))
    foreign = _mim(folders, tmp_path / "other", objective, **{objective: {
        **SMALL_DECODER.get(objective, {}), "decoder_weights": str(tmp_path / "foreign.safetensors")}})
    with pytest.raises(ConfigError, match=rf"{objective}.decoder_weights=.*do not fit this objective's decoder"):
        get(objective).module(foreign, cfg.backbone.build(img_size=32, dynamic_img_size=True), iters_per_epoch=3)


RESUME = {"optim": {"epochs": 3, "batch_size": 8}}  # 24 images: 3 steps per epoch


@pytest.fixture(scope="module")
def references(folders, tmp_path_factory):  # noqa: F811
    """objective -> its uninterrupted run (made on first use)."""
    runs = {}

    def get(objective):
        if objective not in runs:
            runs[objective] = adapt(_mim(folders, tmp_path_factory.mktemp("ref") / "run", objective, **RESUME))
        return runs[objective]

    return get


@pytest.mark.parametrize("objective, kill_after", [("mae", "step:4"), ("mae", "best:0"), ("simmim", "step:4")])
def test_a_killed_run_resumes_to_the_uninterrupted_export_bit_for_bit(folders, tmp_path, references,  # noqa: F811
                                                                      objective, kill_after):
    reference = references(objective)
    out = tmp_path / "killed"
    out.mkdir()
    config_mod.dump(_mim(folders, out, objective, **RESUME), out / "given.yaml")
    _killed("adapt", out / "given.yaml", kill_after)
    assert not (out / "backbone.safetensors").exists()
    with pytest.warns(UserWarning, match="taking over the lock"):
        resumed = adapt(_mim(folders, out, objective, **RESUME), resume=True)
    assert _strip(resumed["metrics"]) == _strip(reference["metrics"])
    assert resumed["resources"]["exported"] == reference["resources"]["exported"]
    for key in ("backbone", "tuner", "decoder"):
        _same_weights(reference[key], resumed[key])


def test_the_objective_and_its_sections_are_checked_in_the_config(tmp_path):
    base = {"data": {"root": str(tmp_path)}}
    with pytest.raises(ValueError, match="objective='maee'; valid choices: dinov2, mae, simmim"):
        resolve_config(None, sections={**base, "objective": "maee"})
    for section, fragment in [({"mae": {"mask_ratio": 1.0}}, r"mae.mask_ratio=1.0 must be in \(0, 1\)"),
                              ({"mae": {"decoder_width": 30}}, "mae.decoder_width=30 must be a multiple of 4"),
                              ({"mae": {"decoder_depth": 0}}, "mae.decoder_depth=0 must be at least 1"),
                              ({"mae": {"scale": [0.0, 1.0]}}, r"mae.scale=\[0.0, 1.0\]: give \[min, max\]"),
                              ({"simmim": {"mask_ratio": 0}}, r"simmim.mask_ratio=0.0 must be in \(0, 1\)"),
                              ({"simmim": {"mask_patch_size": 0}}, "simmim.mask_patch_size=0 must be at least 1"),
                              ({"mae": {"nonsense": 1}}, "unknown config key mae.nonsense")]:
        with pytest.raises(ValueError, match=fragment):
            resolve_config(None, sections={**base, **section})


def test_a_mask_patch_size_the_patch_does_not_divide_is_refused_before_training(folders, tmp_path):  # noqa: F811
    cfg = _mim(folders, tmp_path / "run", "simmim", simmim={"mask_patch_size": 12})
    with pytest.raises(ValueError, match="simmim.mask_patch_size=12 must be a multiple of the backbone's patch size 8"):
        adapt(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run directory


def test_a_dinov2_config_gains_only_the_new_keys():
    saved = config_mod.to_dict(AdaptConfig())
    assert saved["objective"] == "dinov2"
    assert list(saved) == ["preset", "backbone", "tuner", "objective", "data", "ssl", "mae", "simmim", "optim",
                           "monitor", "seed", "out", "trainer"]


def test_the_command_line_flag_sets_the_objective():
    from essa.commands import build_parser
    from essa.commands.adapt import ADAPT_FLAGS, OBJECTIVES
    from essa.commands.common import overrides
    from essa.objectives import OBJECTIVES as IMPLEMENTED

    assert OBJECTIVES == tuple(IMPLEMENTED)
    args = build_parser().parse_args(["adapt", "--objective", "mae", "--data", "x", "--set", "mae.mask_ratio=0.5"])
    cfg = config_mod.load(AdaptConfig, None, overrides=overrides(args, ADAPT_FLAGS))
    assert cfg.objective == "mae" and cfg.mae.mask_ratio == 0.5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["adapt", "--objective", "byol"])


def test_a_study_passes_the_objective_to_its_ssa_cells(tmp_path):
    from essa import study as study_mod
    from tests.test_study import BREAST, TINY as STUDY

    if not BREAST.is_file():
        pytest.skip(f"shared BreastMNIST not found at {BREAST}")
    ssa = {**STUDY["ssa"], "config": {**STUDY["ssa"]["config"], "objective": "mae", "mae": {"mask_ratio": 0.5}}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, "out": str(tmp_path / "run"), "ssa": ssa}))
    study = study_mod.Study(path)
    study.check_inputs()  # every cell's whole config resolves
    sections = study.adapt_sections(study.datasets[0], study_mod.TunerSpec("apla", {"r": 16}))
    cfg = resolve_config(None, sections=sections)
    assert cfg.objective == "mae" and cfg.mae.mask_ratio == 0.5 and cfg.ssl.global_size == 32
