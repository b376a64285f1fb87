"""The Ray application's plain parts, without a cluster: its arguments, its user_config (which an
operator or a bot writes, so it is parsed like hostile input), and the serve command line."""

from __future__ import annotations

import pytest

from captioner.__main__ import build_parser
from captioner.serving.config import DEVICE_BATCHING
from captioner.serving.ray_cli import spec_from_args
from captioner.serving.ray_spec import ModelChoice, RaySpec


def test_spec_round_trips_through_serve_args_and_refuses_unknown_keys() -> None:
    spec = RaySpec(replicas=3, resources={"node2": 1.0}, http=True, keys_file="keys.txt")
    assert RaySpec.from_args(spec.to_args()) == spec
    with pytest.raises(ValueError, match="unknown"):
        RaySpec.from_args({**spec.to_args(), "replica": 2})


@pytest.mark.parametrize("bad", [
    {"replicas": 0}, {"autoscale_min": 1}, {"autoscale_min": 3, "autoscale_max": 2},
    {"cpus_per_replica": float("nan")}, {"gpus_per_replica": -1.0},
    {"max_batch_size": 16, "max_ongoing_requests": 8}, {"max_queued_requests": 0},
])
def test_spec_refuses_settings_that_cannot_work(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RaySpec(**bad)  # type: ignore[arg-type]


def test_deployment_options_place_and_bound_the_replicas() -> None:
    fixed = RaySpec(replicas=2, gpus_per_replica=1.0, resources={"captioner": 1.0}).deployment_options()
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0, "resources": {"captioner": 1.0}}
    assert fixed["max_ongoing_requests"] == 16 and fixed["max_queued_requests"] == 64
    scaled = RaySpec(autoscale_min=0, autoscale_max=4).deployment_options()
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"]["min_replicas"] == 0 and scaled["autoscaling_config"]["max_replicas"] == 4


@pytest.mark.parametrize("config", [
    {"checkpoint": 5}, {"sha256": "abc"}, {"generation": "1"}, {"generation": True},
])
def test_user_config_is_checked(config: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ModelChoice.from_user_config(config)


def test_user_config_round_trips() -> None:
    choice = ModelChoice("/models/a", "A" * 64, 3)
    assert ModelChoice.from_user_config(choice.to_user_config()) == ModelChoice("/models/a", "a" * 64, 3)
    assert ModelChoice.from_user_config(None) == ModelChoice()


def test_serve_command_line() -> None:
    args = build_parser().parse_args(["serve", "--autoscale", "1:4", "--resource", "node2=1", "--keys", "k.txt"])
    spec = spec_from_args(args, cluster_gpus=2)
    assert (spec.autoscale_min, spec.autoscale_max, spec.gpus_per_replica, spec.device) == (1, 4, 1.0, "cuda")
    # The embedded worker's batching for the device (one rule, captioner/serving/config.py).
    gpu, cpu_batching = DEVICE_BATCHING["cuda"], DEVICE_BATCHING["cpu"]
    assert (spec.max_batch_size, spec.batch_wait_ms) == (gpu.max_batch_size, gpu.max_wait_ms)
    assert spec.resources == {"node2": 1.0} and spec.http
    cpu = spec_from_args(build_parser().parse_args(["serve", "--replicas", "2"]), cluster_gpus=0)
    assert (cpu.replicas, cpu.gpus_per_replica, cpu.device, cpu.max_batch_size, cpu.http) == (
        2, 0.0, "cpu", cpu_batching.max_batch_size, False)
    chosen = spec_from_args(build_parser().parse_args(["serve", "--batch-size", "4", "--batch-wait-ms", "5"]), 0)
    assert (chosen.max_batch_size, chosen.batch_wait_ms) == (4, 5.0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--autoscale", "4:1"])
