"""Shared test set-up: offline, deterministic, and a few read-only fixtures.

Pipelines are cheap to build (well under a second), so tests that attach an adapter build their own:
an attached adapter changes the UNet, which must never leak between tests. Only read-only things
(checkpoint files on disk) are shared per session.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# Every tensor in these tests is tiny: a thread pool costs far more than it saves (and on a busy
# 2-core machine its spinning makes each op tens of times slower).
torch.set_num_threads(1)


def random_photo(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """A random RGB photo (width, height) fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each training run is its own process in real use, and accelerate keeps one state per process
    (one mixed precision: a second ``Accelerator`` asking another is refused). Each test starts and
    ends with that state reset, so no test depends on which ran before it (mutmut runs a mutant's
    tests sorted by name, not in file order)."""
    import sys

    def reset():
        state = sys.modules.get("accelerate.state")  # never imported here for tests that do not train
        if state is not None:
            state.AcceleratorState._reset_state(reset_partial_state=True)

    reset()
    yield
    reset()


@pytest.fixture
def photo():
    """``photo(seed)`` → a random PIL photo."""
    return random_photo


@pytest.fixture(scope="session")
def checkpoint_files(tmp_path_factory):
    """``checkpoint_files(arch)`` → the tiny h94/MIP file set for ``arch`` (written once per session).

    Files are only ever read by tests; the pipeline used to write them is thrown away.
    """
    from mipadapter.testing import tiny_checkpoint_files, tiny_sd15_pipeline, tiny_sdxl_pipeline

    cache = {}

    def get(arch: str):
        if arch not in cache:
            pipe = tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()
            cache[arch] = tiny_checkpoint_files(tmp_path_factory.mktemp(f"ckpt_{arch}"), pipe)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def shared_unet():
    """``shared_unet(arch)`` → a tiny UNet for code that only reads its layer names and shapes.

    Never attach an adapter to it or change it: build a fresh pipeline for that.
    """
    from mipadapter.testing import tiny_sd15_pipeline, tiny_sdxl_pipeline

    cache = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = (tiny_sdxl_pipeline() if arch == "sdxl" else tiny_sd15_pipeline()).unet
        return cache[arch]

    return get
