import pytest
import torch

from course_lib.devices import (DEVICE_ENV_VAR, DeviceUnavailableError, available_devices, describe_environment,
                                get_device, seed_everything)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_default_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.delenv(DEVICE_ENV_VAR, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 if cuda else 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert get_device() == torch.device(expected)
    assert available_devices()[-1] == "cpu" and ("cuda:1" in available_devices()) == cuda


def test_argument_beats_environment(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV_VAR, "mps" if not torch.backends.mps.is_available() else "cpu")
    assert get_device("cpu") == torch.device("cpu")


def test_environment_override(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV_VAR, "cpu")
    assert get_device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_device_names_what_is_available(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV_VAR, "cuda")
    with pytest.raises(DeviceUnavailableError, match=r"'cuda' \(from \$COURSE_DEVICE\) is not available.*cpu"):
        get_device()
    with pytest.raises(DeviceUnavailableError, match="cuda:3"):
        get_device("cuda:3")


def test_nonsense_device_name():
    with pytest.raises(DeviceUnavailableError, match="not a device name; allowed: cpu, cuda, cuda:N, mps"):
        get_device("gpu-please")


def test_seed_everything_repeats_random_draws():
    seed_everything(7)
    a = torch.rand(5)
    seed_everything(7)
    assert torch.equal(a, torch.rand(5))
    seed_everything(8)
    assert not torch.equal(a, torch.rand(5))


def test_environment_line_names_versions():
    import transformers

    line = describe_environment("cpu")
    assert line.startswith("device: cpu (")
    assert f"torch {torch.__version__}" in line and f"transformers {transformers.__version__}" in line
    assert f"{torch.get_num_threads()} CPU threads" in line


def test_thread_setting_from_environment(monkeypatch):
    from course_lib.devices import THREADS_ENV_VAR, apply_thread_setting

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(THREADS_ENV_VAR, "1")
        assert apply_thread_setting() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv(THREADS_ENV_VAR)
        assert apply_thread_setting() is None and torch.get_num_threads() == 1  # unset leaves torch alone
        for bad in ("0", "two", "-1", "1.5"):
            monkeypatch.setenv(THREADS_ENV_VAR, bad)
            with pytest.raises(ValueError, match=r"\$COURSE_THREADS=.*whole number >= 1"):
                apply_thread_setting()
    finally:
        torch.set_num_threads(before)
