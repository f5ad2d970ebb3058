"""essa.bench.step_flops: counted FLOPs of a step, CPU attention kernels included."""

import pytest
import torch

from essa.bench import compute_table, step_flops


def test_linear_step_counts_forward_and_weight_gradient_only():
    tokens, d_in, d_out = 7, 5, 3
    layer = torch.nn.Linear(d_in, d_out)
    x = torch.randn(tokens, d_in)  # no gradient wanted for the input: its backward matmul is skipped
    assert step_flops(lambda: layer(x).sum().backward()) == 2 * (2 * tokens * d_in * d_out)


def test_cpu_attention_is_counted_forward_and_backward():
    b, h, n, e = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, n, e, requires_grad=True) for _ in range(3))
    flops = step_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward())
    matmul = 2 * b * h * n * n * e  # q @ k^T or attn @ v
    # forward: 2 products; backward (flash convention, scores recomputed): 5 products
    assert flops == (2 + 5) * matmul


def test_compute_table_gives_full_over_each_tuner():
    rows = [{"model": "m", "label": "full", "gflop": 680.0}, {"model": "m", "label": "apla", "gflop": 535.0}]
    lines = compute_table(rows, "SSA tuner").splitlines()
    assert lines[2:] == ["| m | full | 680.0 | 1.00x |", "| m | apla | 535.0 | 1.27x |"]


def test_an_ssa_step_of_the_tuner_is_measured():
    from essa.bench import ssa_step

    result = ssa_step("vit_tiny_patch16_224", "apla", global_size=32, local_size=16, n_local=2, batch_size=2,
                      prototypes=256, steps=1)
    # the tuner trains in the measured step: its gradients exist (a head warm-up step would have none)
    assert 0 < result["trainable"] < result["total"] and result["peak_mib"] > 0 and result["grads_mib"] > 0
    # as essa adapt: the frozen stretches recompute in as few blocks as fit the memory budget; this one fits
    assert result["recompute_frozen"]["blocks"] == [] and result["recompute_frozen"]["fits"]
    tight = ssa_step("vit_tiny_patch16_224", "apla", global_size=32, local_size=16, n_local=2, batch_size=2,
                     prototypes=256, steps=1, memory_budget=1)
    assert tight["recompute_frozen"]["blocks"] == list(range(12)) and tight["saved_mib"] < result["saved_mib"]
    assert tight["loss"] == pytest.approx(result["loss"], rel=1e-6)  # the same step


def test_an_ssa_step_of_each_reconstruction_objective_is_measured():
    from essa.bench import ssa_step

    for objective, options in (("mae", {"decoder_width": 32, "decoder_depth": 1, "decoder_heads": 4}),
                               ("simmim", None)):
        result = ssa_step("vit_tiny_patch16_224", "apla", {"r": 8}, global_size=32, batch_size=2, steps=1,
                          objective=objective, objective_options=options)
        assert result["trainable"] == 12 * (8 * 192 + 8) and result["grads_mib"] > 0 and result["gflop"] > 0


def test_the_grid_over_objectives_labels_rows_and_compares_within_each_objective(monkeypatch):
    from essa import bench

    calls = []

    def fake(target, kwargs, timeout=None):  # what each fresh process would return, by objective and tuner
        calls.append((target, kwargs["objective"], kwargs["tuner"]))
        memory = {"full": 100.0, "apla": 50.0}[kwargs["tuner"]] * {"dinov2": 2, "mae": 1}[kwargs["objective"]]
        return {"peak_mib": memory, "images_per_s": 1.0, "images_per_cpu_s": 1.0, "step_s": 1.0}

    monkeypatch.setattr(bench, "run_in_fresh_process", fake)
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)
    configs = [("full", "full", {}), ("apla", "apla", {})]
    rows = bench.measure_objectives(["dinov2", "mae"], ["m"], configs, global_size=32)
    assert calls == [("essa.bench:ssa_step", o, t) for o in ("dinov2", "mae") for t in ("full", "apla")]
    assert [(r["label"], r["objective"], r["peak_mib"], r["peak_mib_ratio"]) for r in rows] == [
        ("dinov2 full", "dinov2", 200.0, 1.0), ("dinov2 apla", "dinov2", 100.0, 0.5),
        ("mae full", "mae", 100.0, 1.0), ("mae apla", "mae", 50.0, 0.5)]


def test_the_tables_compare_each_row_with_full_of_its_own_objective():
    from essa.bench import breakdown_table

    def row(objective, tuner, peak, gflop):
        return {"model": "m", "label": f"{objective} {tuner}", "objective": objective, "peak_mib": peak,
                "peak_mib_ratio": 1.0, "weights_mib": 1, "grads_mib": 1, "optimizer_mib": 1, "saved_mib": 1,
                "live_peak_mib": peak, "gflop": gflop}

    rows = [row("dinov2", "full", 200, 40.0), row("dinov2", "apla", 100, 20.0), row("mae", "full", 80, 10.0),
            row("mae", "apla", 20, 4.0)]
    assert compute_table(rows).splitlines()[2:] == ["| m | dinov2 full | 40.0 | 1.00x |", "| m | dinov2 apla | 20.0 | 2.00x |",
                                                    "| m | mae full | 10.0 | 1.00x |", "| m | mae apla | 4.0 | 2.50x |"]
    live = [line.rsplit("|", 2)[-2].strip() for line in breakdown_table(rows).splitlines()[2:]]
    assert live == ["1.00x", "0.50x", "1.00x", "0.25x"]


def test_an_ssa_step_of_apla_on_the_last_blocks_is_measured_with_its_truncation():
    from essa.bench import ssa_step

    step = dict(global_size=32, local_size=16, n_local=2, batch_size=2, prototypes=256, steps=1)
    off, truncated = (ssa_step("vit_tiny_patch16_224", "apla", {"blocks": "last:4"}, ssl_options=ssl, **step)
                      for ssl in ({"truncated_backward": "off"}, None))
    assert off["truncated_backward"]["frozen_blocks"] == 0
    assert truncated["truncated_backward"] == {"mode": "auto", "frozen_blocks": 8, "shared_prefix": True,
                                               "reason": None}
    assert truncated["trainable"] == off["trainable"] == 4 * (192 * 192 + 192)
    assert truncated["gflop"] < off["gflop"] and truncated["saved_mib"] < off["saved_mib"]


def test_a_config_of_the_grid_can_carry_its_own_step_keywords(monkeypatch):
    from essa import bench

    calls = []

    def fake(target, kwargs, timeout=None):
        calls.append(kwargs)
        return {"peak_mib": 1.0, "images_per_s": 1.0, "images_per_cpu_s": 1.0, "step_s": 1.0}

    monkeypatch.setattr(bench, "run_in_fresh_process", fake)
    monkeypatch.setattr("builtins.print", lambda *a, **k: None)
    bench.measure_grid("t", ["m"], [("full", "full", {}), ("full dropped", "full", {}, {"ssl_options": {"x": 1}})],
                       global_size=32)
    assert [c.get("ssl_options") for c in calls] == [None, {"x": 1}] and all(c["global_size"] == 32 for c in calls)


def test_a_preset_row_steps_with_the_presets_tuner_and_ssl_keys(monkeypatch):
    from essa import adaptation, bench

    assert bench.preset_config("fast") == ("preset fast", "apla", {"blocks": "last:4"},
                                           {"ssl_options": {"patch_drop": 0.5, "truncated_backward": "auto"}})
    monkeypatch.setitem(adaptation.PRESETS, "lean", {"tuner": {"name": "bitfit"},
                                                     "optim": {"recompute_frozen": False}})
    assert bench.preset_config("lean") == ("preset lean", "bitfit", {}, {"ssl_options": {},
                                                                         "recompute_frozen": False})
    monkeypatch.setitem(adaptation.PRESETS, "odd", {"optim": {"lr": 1.0}, "seed": 3})
    with pytest.raises(ValueError, match=r"preset 'odd' sets seed, optim.lr, which essa bench's step does not take"):
        bench.preset_config("odd")
    with pytest.raises(ValueError, match="--preset 'slow' is not a preset; valid choices: fast"):
        bench.preset_config("slow")


def test_steps_are_timed_one_by_one_and_the_median_step_counts():
    """One slow step (other load, a one-off allocation) moves a mean but not the median the benchmarks report."""
    import time

    from essa.bench import time_steps

    durations = iter([0.0, 0.02, 0.02, 1.0, 0.02, 0.02])  # the first is the untimed warm-up

    def step():
        end = time.perf_counter() + next(durations)
        while time.perf_counter() < end:  # busy: CPU time too
            pass

    timed = time_steps(step, images_per_step=4, device=torch.device("cpu"), warmup=1, steps=5)
    assert 0.02 <= timed["step_s"] < 0.5  # the mean would be 0.216 s or more
    assert timed["images_per_s"] == pytest.approx(4 / timed["step_s"])
    assert 4 / timed["images_per_cpu_s"] < 0.5  # the median CPU time of a step, not the slow one's


def test_tuner_texts_give_labels_tuners_and_options():
    from essa.bench import parse_tuner

    assert parse_tuner("apla") == ("apla", "apla", {})
    assert parse_tuner("apla:r=64") == ("apla r=64", "apla", {"r": 64})
    assert parse_tuner("lora:r=8:targets=[qkv]") == ("lora r=8 targets=['qkv']", "lora", {"r": 8, "targets": ["qkv"]})
    assert parse_tuner("apla:blocks=last:4") == ("apla blocks=last:4", "apla", {"blocks": "last:4"})
    assert parse_tuner("apla+lora:apla.r=64") == ("apla+lora apla.r=64", "apla+lora", {"apla": {"r": 64}})
    with pytest.raises(ValueError, match="options are key=value after the name, e.g. apla:r=64"):
        parse_tuner("apla:64")


def test_essa_bench_measures_each_tuner_in_a_fresh_process_against_full(tmp_path, capsys):
    import json

    from PIL import Image

    from essa.commands import main

    rows_file, png = tmp_path / "rows.json", tmp_path / "plot.png"
    assert main(["bench", "--models", "vit_tiny_patch16_224", "--tuner", "apla:r=8", "--img-size", "32",
                 "--local-size", "16", "--n-local", "2", "--prototypes", "256", "--batch-size", "2", "--steps", "1",
                 "--preset", "fast", "--recompute", "all", "--json", str(rows_file), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    rows = json.loads(rows_file.read_text())
    assert [r["label"] for r in rows] == ["full", "apla r=8", "preset fast"]  # full added as the reference
    full, apla, fast = rows
    assert full["peak_mib_ratio"] == 1.0 and apla["trainable"] == 12 * (8 * 192 + 8) < full["trainable"]
    assert 0 < apla["gflop"] < full["gflop"]
    # the preset: the whole W_O of the last 4 of 12 blocks, 8 frozen blocks before them (patch_drop: not shared)
    assert fast["trainable"] == 4 * (192 * 192 + 192)
    assert fast["truncated_backward"]["frozen_blocks"] == 8 and not fast["truncated_backward"]["shared_prefix"]
    assert 0 < fast["gflop"] < apla["gflop"]
    assert apla["recompute_frozen"] == {"blocks": "all"} == fast["recompute_frozen"]  # --recompute all
    assert "| vit_tiny_patch16_224 | apla r=8 |" in out and "counted FLOPs per step" in out
    with Image.open(png) as image:
        assert image.size == (840, 540)
    assert main(["bench", "--tuner", "apla:64"]) == 2
    assert "options are key=value after the name" in capsys.readouterr().err


def test_a_bf16_autocast_step_on_cpu_gives_nearly_the_fp32_loss():
    from essa.bench import ssa_step

    kwargs = dict(global_size=32, local_size=16, n_local=2, batch_size=2, prototypes=256, steps=1, warmup=1)
    fp32 = ssa_step("vit_tiny_patch16_224", "apla", {"r": 8}, precision="32-true", **kwargs)
    bf16 = ssa_step("vit_tiny_patch16_224", "apla", {"r": 8}, precision="bf16-mixed", **kwargs)
    assert fp32["loss"] != bf16["loss"]  # autocast ran: bf16 matrix products round differently
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02)
    with pytest.raises(ValueError, match="precision='fp8'; valid: auto, bf16-mixed, 32-true"):
        ssa_step("vit_tiny_patch16_224", "apla", precision="fp8", **kwargs)


def test_several_precisions_run_every_tuner_at_each_against_full_at_the_first(monkeypatch, capsys):
    from essa import bench
    from essa.commands import main

    calls = []

    def fake(target, kwargs, timeout=None):
        calls.append((kwargs["tuner"], kwargs.get("precision")))
        speed = {"32-true": 1.0, "bf16-mixed": 1.5}[kwargs["precision"]] * {"full": 1.0, "apla": 2.0}[kwargs["tuner"]]
        return {"peak_mib": 100.0, "images_per_s": speed, "images_per_cpu_s": speed, "step_s": 1 / speed,
                "trainable": 1, "total": 2, "loss": {"32-true": 5.0, "bf16-mixed": 5.01}[kwargs["precision"]]}

    monkeypatch.setattr(bench, "run_in_fresh_process", fake)
    assert main(["bench", "--tuner", "apla", "--precision", "32-true,bf16-mixed"]) == 0
    assert calls == [("full", "32-true"), ("apla", "32-true"), ("full", "bf16-mixed"), ("apla", "bf16-mixed")]
    out = capsys.readouterr().out
    assert "| apla bf16-mixed | 1 | 100 | 3.000 | 3.000 | 1.00x | 3.00x / 3.00x |" in out
    assert "vit_small_patch14_dinov2 apla bf16-mixed: 5.01000 vs 5.00000 (0.20% apart)" in out
    assert main(["bench", "--precision", "fp8"]) == 2


def test_the_ssa_step_builds_the_head_widths_asked_for():
    from essa.bench import ssa_step

    kwargs = dict(global_size=32, local_size=16, n_local=2, batch_size=2, prototypes=256, steps=1)
    default = ssa_step("vit_tiny_patch16_224", "apla", **kwargs)["head"]
    assert (default["hidden"], default["bottleneck"], default["prototypes"], default["layers"]) == (2048, 256, 256, 3)
    head = ssa_step("vit_tiny_patch16_224", "apla", head_hidden=64, head_bottleneck=32, **kwargs)["head"]
    assert (head["hidden"], head["bottleneck"], head["prototypes"]) == (64, 32, 256)
    # 192 -> 64 -> 64 -> 32 with biases, and 256 prototypes of width 32
    assert head["params"] == (192 * 64 + 64) + (64 * 64 + 64) + (64 * 32 + 32) + 256 * 32
