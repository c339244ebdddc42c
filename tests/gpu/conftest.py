"""The ``gpu`` mark: tests that need a CUDA GPU (``pytest -m gpu tests/gpu``); they skip where torch sees none."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where torch.cuda.is_available() is False)")
