"""Trainer settings that would break the editing state are refused; every setting for which Lightning
would start several processes gets the project's EditingDDPStrategy."""

import subprocess
import sys

import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector

from conftest import REPO
from encore_pl.checkpoints import SafeCheckpointIO
from encore_pl.cli import refuse_precision
from encore_pl.distributed import EditingDDPStrategy, editing_strategy, process_count

DDP_NAMES = ["ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_true",
             "ddp_find_unused_parameters_false", "ddp_spawn_find_unused_parameters_true", "DDP"]


@pytest.mark.parametrize("devices", [2, "2", "auto", 1, "1", None])
@pytest.mark.parametrize("name", DDP_NAMES)
def test_every_ddp_name_becomes_ours(name, devices):
    assert isinstance(editing_strategy(name, devices, None, "cpu"), EditingDDPStrategy)


@pytest.mark.parametrize(("devices", "num_nodes"), [(2, None), ("2", 1), (3, 1), (1, 2), ("1", 4), ("auto", 2)])
def test_auto_with_several_processes_becomes_ours(devices, num_nodes):
    assert isinstance(editing_strategy("auto", devices, num_nodes, "cpu"), EditingDDPStrategy)
    assert isinstance(editing_strategy(None, devices, num_nodes, "cpu"), EditingDDPStrategy)


@pytest.mark.parametrize("devices", [1, "1", "auto", None])
def test_one_process_keeps_its_strategy(devices):
    assert editing_strategy("auto", devices, None, "cpu") == "auto"
    assert editing_strategy("single_device", devices, 1, "cpu") == "single_device"
    single = SingleDeviceStrategy("cpu")
    assert editing_strategy(single, devices, None, "cpu") is single


def test_our_strategy_object_is_kept():
    ours = EditingDDPStrategy()
    assert editing_strategy(ours, 2, None, "cpu") is ours


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_cpu_offload", "deepspeed", "deepspeed_stage_3", "xla"])
def test_sharding_strategies_are_refused(strategy):
    with pytest.raises(ValueError, match=f"--trainer.strategy {strategy} is not supported.*--trainer.strategy ddp"):
        editing_strategy(strategy, 2, None, "cpu")


def test_lightnings_ddp_object_is_refused():
    """Its DistributedDataParallel wrapper refuses a model with no trainable parameter."""
    with pytest.raises(ValueError, match="DDPStrategy is not supported"):
        editing_strategy(DDPStrategy(), 2, None, "cpu")


def test_single_device_strategy_for_several_processes_is_refused():
    with pytest.raises(ValueError, match="single_device with several processes is not supported"):
        editing_strategy("single_device", 2, None, "cpu")
    with pytest.raises(ValueError, match="SingleDeviceStrategy with several processes"):
        editing_strategy(SingleDeviceStrategy("cpu"), 1, 2, "cpu")


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="'horovod' is not a strategy Lightning knows"):
        editing_strategy("horovod", 2, None, "cpu")


@pytest.mark.parametrize("devices", [-1, "-1", "0,1", [0, 1], 0])
def test_cpu_devices_lightning_refuses_are_refused_in_one_line(devices):
    """CPU devices are a process count (> 0); GPU indices make no sense there, as Lightning says."""
    with pytest.raises(ValueError, match=r"--trainer.devices .* with CPUAccelerator: .*int > 0"):
        editing_strategy("auto", devices, None, "cpu")


@pytest.fixture
def four_gpus(monkeypatch):
    """A machine with 4 CUDA GPUs, as Lightning sees it: its CUDA availability, `auto_device_count` and
    the GPU ids `parse_devices` accepts all come from torch.cuda.device_count
    (lightning/fabric/accelerators/cuda.py num_cuda_devices)."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


@pytest.mark.parametrize(("devices", "count"), [(-1, 4), ("-1", 4), ("auto", 4), (None, 4), (3, 3), ("2", 2),
                                                ("0,1", 2), ("1, 3", 2), ([0, 2], 2), ([2], 1), ("3,", 1), (1, 1)])
@pytest.mark.parametrize("accelerator", ["auto", "gpu", "cuda"])
def test_gpu_devices_resolve_as_lightning_does(four_gpus, devices, count, accelerator):
    assert process_count(devices, None, accelerator) == count
    assert process_count(devices, 2, accelerator) == 2 * count
    strategy = editing_strategy("auto", devices, None, accelerator)
    assert isinstance(strategy, EditingDDPStrategy) if count > 1 else strategy == "auto"
    # Lightning's own resolution of the same settings: as many devices, and its DDP for several
    lightning = _AcceleratorConnector(devices="auto" if devices is None else devices, accelerator=accelerator)
    assert len(lightning._parallel_devices) == count
    assert isinstance(lightning.strategy, DDPStrategy) == (count > 1)


def test_more_gpus_than_the_machine_has_are_refused_in_one_line(four_gpus):
    with pytest.raises(ValueError, match=r"--trainer.devices 8 with CUDAAccelerator: .*only has"):
        editing_strategy("auto", 8, None, "cuda")
    with pytest.raises(ValueError, match=r"--trainer.devices \[0, 5\] with CUDAAccelerator"):
        editing_strategy("ddp", [0, 5], None, "auto")


def test_gpu_accelerator_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no GPU"):
        editing_strategy("auto", 2, None, "gpu")


@pytest.mark.parametrize(("option", "message"), [
    ("--trainer.precision=bf16-true", "--trainer.precision bf16-true is not supported: only 32-true"),
    ("--trainer.precision=64-true", "--trainer.precision 64-true is not supported: only 32-true"),
    ("--trainer.strategy=fsdp", "--trainer.strategy fsdp is not supported"),
])
def test_cli_refuses_in_one_line(tiny_llama_dir, tmp_path, option, message):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "fit", f"--model.model_name_or_path={tiny_llama_dir}",
         "--model.layers=[1,2]", "--data.num_edits=3", f"--trainer.default_root_dir={tmp_path}",
         "--trainer.accelerator=cpu", option],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"encore-pl: error: {message}" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if "precision" in option:
        assert "--model.dtype" in proc.stderr


@pytest.mark.parametrize("precision", [None, "32-true", "32", 32])
def test_full_precision_is_accepted(precision):
    refuse_precision(precision, [Precision(), SafeCheckpointIO()])


@pytest.mark.parametrize("precision", ["bf16-true", "16-true", "64-true", "bf16-mixed", "16-mixed", 16, "64"])
def test_other_precisions_are_refused(precision):
    with pytest.raises(ValueError, match=f"--trainer.precision {precision} is not supported.*--model.dtype"):
        refuse_precision(precision, [])


def test_a_precision_plugin_is_refused():
    with pytest.raises(ValueError, match="the precision plugin HalfPrecision is not supported"):
        refuse_precision(None, [HalfPrecision("bf16-true")])
