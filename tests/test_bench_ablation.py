"""bench/distill_ablation.py: every variant is a distinct run, and old runs keep their names."""
from __future__ import annotations

from bench.distill_ablation import VARIANTS, weights_dir
from jobs.distill import DistillConfig


def test_each_variant_has_its_own_directory_and_valid_flags():
    dirs = [weights_dir(w) for w in VARIANTS.values()]
    assert len(set(dirs)) == len(dirs)
    # runs made before the kd term existed are found again under their old names
    assert weights_dir({"cos_weight": 1.0, "l2_weight": 0.1, "ms_weight": 1.0}) == "cos1.0_l20.1_ms1.0"
    assert weights_dir({"cos_weight": 0.0, "l2_weight": 0.0, "ms_weight": 0.0, "kd_weight": 1.0}) == \
        "cos0.0_l20.0_ms0.0_kd1.0"
    for weights in VARIANTS.values():
        DistillConfig(data="d", output="o", teacher="t", **weights)  # every key is a distillation flag
