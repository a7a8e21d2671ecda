"""Fixtures shared by test modules: a network guard and a random-init Inception-v3 weights file."""
from __future__ import annotations

import math
import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, give each worker its share of the cores: with every worker running torch's full thread pool,
    ``-n 2`` on 2 cores ran 5x slower (OpenMP threads spinning against each other: tests/test_trainer_build.py and
    tests/test_sampler_matrix.py took 399 s against 74 s with one thread each). OMP_NUM_THREADS set by the user wins;
    subprocesses that tests start inherit the setting."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``gpu`` that is selected (``-m gpu``) on a machine without CUDA fails, naming the reason: GPU
    tests are deselected by default (setup.cfg's addopts), so one that runs was asked for, and a skip would hide it."""
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.fail(f"{item.nodeid} is a GPU test (-m gpu) and this machine has no CUDA device", pytrace=False)
    if item.get_closest_marker("fa4") is not None:
        from ldm.attention import AttentionBackendError, check_backend
        from ldm.attention_fa4 import ARCHS

        try:
            check_backend("fa4")
            missing = None
        except AttentionBackendError as e:
            missing = str(e)
        if missing:
            pytest.fail(f"{item.nodeid} is an FA4 test (-m fa4): {missing}", pytrace=False)
        if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in ARCHS:
            pytest.fail(f"{item.nodeid} is an FA4 test (-m fa4) and needs a Hopper or Blackwell GPU", pytrace=False)


@pytest.fixture(scope="module")
def no_downloads():
    """Any attempt to fetch weights fails the test instead of reaching the network."""
    import urllib.request

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args} {kwargs}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", refuse)
        mp.setattr(torch.hub, "load_state_dict_from_url", refuse)
        mp.setattr(torch.hub, "download_url_to_file", refuse)
        mp.setattr(urllib.request, "urlopen", refuse)
        yield


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    """The FID Inception-v3 architecture (torchvision's Inception3 with 1008 classes and no aux head, the layout
    pytorch-fid loads pt_inception-*.pth into and torch-fidelity's FeatureExtractorInceptionV3 uses), randomly
    initialised with He-normal convolutions so that the 2048-d features are O(1), saved as a state dict."""
    import torchvision

    g = torch.Generator().manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0.0, math.sqrt(2.0 / m.weight[0].numel()), generator=g)
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(autouse=True)
def release_memory_after_slow_tests(request):
    """Full-size (slow) tests allocate 15-18 GB of memory and write up to 30 GB of checkpoints each; between them,
    hand the freed heap back to the OS and delete their run folders, so that ``make test-slow`` runs them one after
    another in one process on a machine with 23 GB of memory and 70 GB of free disk."""
    yield
    if request.node.get_closest_marker("slow") is None:
        return
    import ctypes
    import gc
    import shutil

    tmp = getattr(request.node, "funcargs", {}).get("tmp_path")
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass
