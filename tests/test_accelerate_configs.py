"""Every shipped accelerate config is a real accelerate config: it parses with accelerate's own loader and carries
the settings its name promises (the CPU one is launched end to end in test_train.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file

CONFIGS = Path(__file__).resolve().parents[1] / "accelerate_configs"
EXPECTED = {"cpu": "NO", "single_gpu": "NO", "multi_gpu": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED",
            "deepspeed_zero3": "DEEPSPEED", "fsdp": "FSDP"}
REQUIRED = {"compute_environment", "distributed_type", "mixed_precision", "num_machines", "num_processes",
            "machine_rank", "use_cpu"}


def test_the_six_configs_are_shipped():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_and_has_required_keys(name):
    path = CONFIGS / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert REQUIRED <= set(raw), REQUIRED - set(raw)
    assert raw["distributed_type"] == EXPECTED[name]
    cfg = load_config_from_file(str(path))  # accelerate's own parser: unknown keys or bad values raise
    assert cfg.distributed_type.value == EXPECTED[name]
    assert raw["use_cpu"] is (name == "cpu")
    assert raw["mixed_precision"] == ("no" if name == "cpu" else "bf16")  # fp32 on CPU, bf16 on GPUs
    if name.startswith("deepspeed"):
        ds = raw["deepspeed_config"]
        assert ds["zero_stage"] == int(name[-1])
        assert {"offload_optimizer_device", "offload_param_device"} <= set(ds)
        if ds["zero_stage"] == 3:  # otherwise the saved adapters are empty shards
            assert ds["zero3_save_16bit_model"] is True
    if name == "fsdp":
        fsdp = raw["fsdp_config"]
        assert fsdp["fsdp_use_orig_params"] is True  # frozen base + trainable LoRA in one flat parameter
        assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    if name in ("multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"):
        assert raw["num_processes"] >= 2
