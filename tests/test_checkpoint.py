"""Safetensors checkpoints: exact resume, pickle refusal, integrity checks, DDP unwrapping. No Ray."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from engine.training.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    export_model,
    file_sha256,
    load_checkpoint,
    load_model_weights,
    read_checkpoint_config,
    read_model_config,
    save_checkpoint,
)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def _trio(seed: int):
    model = _model(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler, batch: int) -> None:
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(16, 3, generator=generator)
    y = x.sum(dim=1, keepdim=True)
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()
    scheduler.step()


@pytest.fixture()
def trained_checkpoint(tmp_path):
    model, optimizer, scheduler = _trio(0)
    for batch in range(3):
        _step(model, optimizer, scheduler, batch)
    directory = save_checkpoint(
        tmp_path / "ckpt",
        models={"net": model},
        optimizers={"net": optimizer},
        schedulers={"net": scheduler},
        state={"epoch": 1, "step": 3, "metrics": {"loss": 0.5}},
        config={"hidden": 8, "betas": (0.8, 0.99)},
    )
    return directory, (model, optimizer, scheduler)


def test_round_trip_gives_identical_next_steps(trained_checkpoint):
    directory, (model, optimizer, scheduler) = trained_checkpoint
    fresh_model, fresh_optimizer, fresh_scheduler = _trio(123)  # different init on purpose
    state = load_checkpoint(
        directory, models={"net": fresh_model}, optimizers={"net": fresh_optimizer}, schedulers={"net": fresh_scheduler}
    )
    assert state == {"epoch": 1, "step": 3, "metrics": {"loss": 0.5}}
    assert read_checkpoint_config(directory) == {"hidden": 8, "betas": [0.8, 0.99]}
    assert fresh_optimizer.param_groups[0]["betas"] == (0.8, 0.99)  # tuples survive the json
    for batch in range(3, 6):  # Adam moments, step counts and the LR schedule must all have come back
        _step(model, optimizer, scheduler, batch)
        _step(fresh_model, fresh_optimizer, fresh_scheduler, batch)
        assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
        for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_layout_is_safetensors_and_json_with_manifest(trained_checkpoint):
    directory, _ = trained_checkpoint
    files = sorted(os.listdir(directory))
    assert files == [
        "MANIFEST.json", "config.json", "net.safetensors", "optim-net.json",
        "optim-net.safetensors", "sched-net.json", "state.json",
    ]
    manifest = json.loads((directory / "MANIFEST.json").read_text())
    assert {f: e["sha256"] for f, e in manifest["files"].items()} == {
        f: file_sha256(directory / f) for f in files if f != "MANIFEST.json"
    }
    optimizer_tensors = load_file(directory / "optim-net.safetensors")
    assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(optimizer_tensors)
    assert not [f for f in os.listdir(directory.parent) if f.startswith(".")]  # no temp dirs left behind


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".pkl", ".ckpt"])
def test_pickle_file_in_directory_is_refused(trained_checkpoint, suffix):
    directory, (model, _, _) = trained_checkpoint
    (directory / f"extra{suffix}").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeCheckpointError, match=rf"extra\{suffix}.*pickled checkpoints are refused"):
        load_checkpoint(directory, models={"net": model})
    with pytest.raises(UnsafeCheckpointError):
        load_model_weights(directory, "net", model)


def test_pickle_file_given_as_the_path_is_refused(tmp_path):
    model = _model(0)
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeCheckpointError, match=r"model\.pt.*pickled checkpoints are refused"):
        load_checkpoint(path, models={"net": model})
    assert issubclass(UnsafeCheckpointError, ValueError)


def test_tampered_weights_fail_the_sha256_check(trained_checkpoint):
    directory, (model, _, _) = trained_checkpoint
    weights = directory / "net.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"net\.safetensors: sha256 .* does not match"):
        load_checkpoint(directory, models={"net": model})


def test_missing_files_are_named(trained_checkpoint):
    directory, (model, optimizer, _) = trained_checkpoint
    with pytest.raises(CheckpointError, match=r"other\.safetensors: missing.*models present: \['net.safetensors'\]"):
        load_checkpoint(directory, models={"other": model})
    with pytest.raises(CheckpointError, match=r"optim-adam\.json: missing"):
        load_checkpoint(directory, models={"net": model}, optimizers={"adam": optimizer})
    load_checkpoint(directory, models={"net": model}, optimizers={"adam": optimizer}, strict=False)  # skipped
    (directory / "net.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"net\.safetensors: listed in MANIFEST\.json but missing"):
        load_checkpoint(directory, models={"net": model})
    (directory / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match=r"MANIFEST\.json: missing"):
        load_checkpoint(directory, models={"net": model})


def test_resave_replaces_a_checkpoint_but_never_another_directory(trained_checkpoint, tmp_path):
    directory, (model, _, _) = trained_checkpoint
    save_checkpoint(directory, models={"net": model}, state={"step": 9})
    assert load_checkpoint(directory, models={"net": model}) == {"step": 9}
    assert "optim-net.json" not in os.listdir(directory)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a checkpoint directory"):
        save_checkpoint(other, models={"net": model})
    with pytest.raises(TypeError, match="tensor cannot be stored in the checkpoint state json"):
        save_checkpoint(tmp_path / "bad", models={"net": model}, state={"loss": torch.tensor(1.0)})
    assert not (tmp_path / "bad").exists()


@pytest.fixture()
def gloo_single_process(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapped_model_saves_like_the_bare_one(tmp_path, gloo_single_process):
    bare = _model(0)
    wrapped = nn.parallel.DistributedDataParallel(_model(0))
    save_checkpoint(tmp_path / "bare", models={"net": bare})
    save_checkpoint(tmp_path / "ddp", models={"net": wrapped})
    bare_tensors, ddp_tensors = load_file(tmp_path / "bare" / "net.safetensors"), load_file(tmp_path / "ddp" / "net.safetensors")
    assert list(ddp_tensors) == list(bare_tensors)  # no "module." prefix
    for key in bare_tensors:
        torch.testing.assert_close(ddp_tensors[key], bare_tensors[key], rtol=0, atol=0)
    target = nn.parallel.DistributedDataParallel(_model(5))
    load_checkpoint(tmp_path / "bare", models={"net": target})  # loads into the wrapped module too
    torch.testing.assert_close(target.module[0].weight, bare[0].weight, rtol=0, atol=0)


def test_exported_model_round_trip_and_integrity(tmp_path):
    model = _model(0)
    record = export_model(tmp_path / "reward", "reward", model, config={"hidden": 8})
    assert sorted(os.listdir(tmp_path / "reward")) == ["reward.json", "reward.safetensors"]
    assert record["sha256"] == file_sha256(tmp_path / "reward" / "reward.safetensors")
    assert read_model_config(tmp_path / "reward", "reward") == {"hidden": 8}
    fresh = _model(1)
    assert load_model_weights(tmp_path / "reward", "reward", fresh) == {"hidden": 8}
    torch.testing.assert_close(fresh[3].weight, model[3].weight, rtol=0, atol=0)
    weights = tmp_path / "reward" / "reward.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(CheckpointError, match=r"reward\.safetensors: sha256 .* does not match reward\.json"):
        load_model_weights(tmp_path / "reward", "reward", fresh)
    with pytest.raises(CheckpointError, match=r"generator\.json: missing"):
        load_model_weights(tmp_path / "reward", "generator", fresh)


# --- resuming a run under another config is refused (engine.training.distributed.check_resumable)


def _run_config(**loop):
    return {"stage": {"model": {"channels": [16, 32]}, "loop": {"epochs": 4, "lr": 1e-3, "max_steps": 0, **loop},
                      "ray": {"num_workers": 2}},
            "data": {"crop_size": 96}, "arrays": {"train": "object-ref"}}


def test_config_changes_names_each_changed_key_and_skips_ignored_ones():
    from engine.config import config_changes

    old, new = _run_config(), _run_config(lr=3e-3, epochs=8)
    new["stage"]["model"]["channels"] = (16, 64)
    new["stage"]["ray"]["num_workers"] = 1
    changes = config_changes(old, new, ("*.epochs", "stage.ray.*"))
    assert changes == ["stage.loop.lr: 0.001 -> 0.003", "stage.model.channels: [16, 32] -> [16, 64]"]
    assert config_changes(old, _run_config()) == []
    assert config_changes({"a": 1}, {"a": 1, "b": 2}) == ["b: None -> 2"]


def test_a_checkpoint_resumes_only_under_its_own_config(tmp_path):
    from engine.training.distributed import check_resumable

    saved = _run_config()
    folder = save_checkpoint(tmp_path / "ckpt", models={"m": nn.Linear(2, 2)}, state={"step": 3},
                             config={"stage": saved["stage"], "data": saved["data"], "own": "a key fit() never sees"})
    # more epochs, more steps, other Ray resources: the same run, continued
    check_resumable(str(folder), {**_run_config(epochs=9, max_steps=100), "arrays": {"train": "another-ref"}}, "run")
    changed = _run_config(lr=0.01)
    changed["data"]["crop_size"] = 64
    with pytest.raises(ValueError, match=r"run 'run' has checkpoints .* another config .*data\.crop_size: 96 -> 64; "
                                         r"stage\.loop\.lr: 0\.001 -> 0\.01.*allow_config_change"):
        check_resumable(str(folder), changed, "run")
    check_resumable(str(folder), changed, "run", ignore=("data.*", "stage.loop.lr"))
