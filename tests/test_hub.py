"""Model locations: local paths, the Hub cache, and failing at once (one line) when the Hub is out of reach."""

from __future__ import annotations

import ast
import socket
import time
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants as constants
import pytest

from mipadapter import hub
from mipadapter.hub import ModelNotFoundError, resolve_file, resolve_folder, resolve_folder_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay ``files`` out as huggingface_hub's cache of ``repo_id``; returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    for inside, data in files.items():
        (snapshot / inside).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / inside).write_bytes(data)
    return snapshot


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to download fails the test: offline resolution must not touch the network."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"hf_hub_download called with {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "hub-cache"
    folder.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    return folder


@pytest.fixture
def online_at(monkeypatch):
    """``online_at(endpoint)``: HF_HUB_OFFLINE unset and the Hub endpoint moved (probe memory cleared)."""

    def set_endpoint(endpoint: str) -> None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(hub, "_probe_cache", {})

    return set_endpoint


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the socket closes


def test_local_paths_and_malformed_names(tmp_path):
    local = tmp_path / "a.bin"
    local.write_bytes(b"")
    assert resolve_file(local) == local
    assert resolve_folder(tmp_path, "image encoder", "--image-encoder") == (str(tmp_path), None)
    with pytest.raises(ModelNotFoundError, match="is a folder; name the checkpoint file"):
        resolve_file(tmp_path)
    with pytest.raises(ModelNotFoundError, match="is a file; pass the folder"):
        resolve_folder(local, "image encoder", "--image-encoder")
    with pytest.raises(ModelNotFoundError, match="names a repository, not a file"):
        resolve_file("owner/repo")
    with pytest.raises(
        ModelNotFoundError, match="adapter 'no-such-file.bin' is neither an existing local path"
    ):
        resolve_file("no-such-file.bin")
    with pytest.raises(ModelNotFoundError, match=r"base model '\S+' has no unet/config\.json"):
        resolve_folder_file(tmp_path, "unet/config.json", "base model", "--base-model")


@pytest.mark.usefixtures("no_download")
def test_offline_and_not_cached_fails_at_once_naming_model_purpose_and_flag(cache):
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as error:
        resolve_file("hqhQAQ/MIP-Adapter/model_sdxl.bin", "adapter", "--adapter")
    assert str(error.value) == (
        "could not fetch the adapter 'hqhQAQ/MIP-Adapter/model_sdxl.bin' from the Hugging Face Hub (not in "
        "the local cache and HF_HUB_OFFLINE is set); download it where you have network and point --adapter "
        "at a local copy"
    )
    with pytest.raises(
        ModelNotFoundError, match=r"captioner 'Salesforce/blip2-opt-2\.7b'.*point caption_model"
    ):
        resolve_folder("Salesforce/blip2-opt-2.7b", "captioner", "caption_model")
    with pytest.raises(ModelNotFoundError, match=r"base model 'a/b'.*point --base-model"):
        resolve_folder_file("a/b", "unet/config.json", "base model", "--base-model")
    assert time.monotonic() - start < 1.0


@pytest.mark.usefixtures("no_download")
def test_offline_finds_cached_files_and_folders(cache):
    snapshot = fake_cache(
        cache,
        "h94/IP-Adapter",
        {"sdxl_models/ip-adapter_sdxl.bin": b"w", "sdxl_models/image_encoder/config.json": b"{}"},
    )
    found = resolve_file("h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.bin")
    assert found == snapshot / "sdxl_models/ip-adapter_sdxl.bin"
    where, subfolder = resolve_folder("h94/IP-Adapter/sdxl_models/image_encoder", "image encoder", "-e")
    assert (Path(where), subfolder) == (snapshot, "sdxl_models/image_encoder")
    config = resolve_folder_file(
        "h94/IP-Adapter/sdxl_models/image_encoder", "config.json", "image encoder", "-e"
    )
    assert config == snapshot / "sdxl_models/image_encoder/config.json"
    # a folder whose marker file is not cached is not there, whatever else is
    with pytest.raises(ModelNotFoundError, match="not in the local cache"):
        resolve_folder("h94/IP-Adapter/sdxl_models", "base model", "--base-model", marker="model_index.json")


@pytest.mark.usefixtures("no_download")
def test_an_unreachable_hub_is_detected_by_one_quick_probe(cache, online_at):
    online_at(f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(
        ModelNotFoundError, match=r"not in the local cache and http://127\.0\.0\.1:\d+ cannot be reached"
    ):
        resolve_file("nobody/nothing/model.bin", "adapter", "--adapter")
    with pytest.raises(ModelNotFoundError, match="point --image-encoder at a local copy"):
        resolve_folder("nobody/nothing/image_encoder", "image encoder", "--image-encoder")
    assert time.monotonic() - start < 1.0


def test_a_reachable_hub_downloads_and_wraps_failures_in_one_line(cache, online_at, monkeypatch, tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        online_at(f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_reachable()
        local = tmp_path / "w.bin"
        local.write_bytes(b"w")
        seen = {}

        def download(repo_id, filename, **kwargs):
            seen["args"] = (repo_id, filename)
            return str(local)

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
        assert resolve_file("h94/IP-Adapter/sdxl_models/ip-adapter_sdxl.bin") == local
        assert seen["args"] == ("h94/IP-Adapter", "sdxl_models/ip-adapter_sdxl.bin")
        # online, a folder is left to from_pretrained (which downloads with progress bars)
        assert resolve_folder("owner/repo/sub", "image encoder", "-e") == ("owner/repo", "sub")

        def missing(repo_id, filename, **kwargs):
            raise OSError(f"404 for {repo_id}/{filename}\nsecond line of detail")

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", missing)
        with pytest.raises(ModelNotFoundError) as error:
            resolve_file("owner/repo/x.bin", "adapter", "--adapter")
        assert "\n" not in str(error.value) and "(OSError: 404 for owner/repo/x.bin)" in str(error.value)


def test_hub_is_layer_zero():
    """hub.py imports nothing from the project, so every layer may use it."""
    tree = ast.parse(Path(hub.__file__).read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    ]
    assert not [name for name in imported if name and name.startswith("mipadapter")]


@pytest.mark.usefixtures("no_download", "cache")
def test_every_model_loader_fails_at_once_offline():
    """The data backends and the evaluation encoders locate their models here too (one line, at once)."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration, CLIPModel, ViTModel  # noqa: F401

    from mipadapter.data.backends import load_backends
    from mipadapter.data.config import DataConfig
    from mipadapter.encoders import FeatureEncoders, load_clip

    start = time.monotonic()  # after the imports: only the failing is timed
    with pytest.raises(ModelNotFoundError) as error:
        load_backends(DataConfig(caption_model="nobody/blip2"), "cpu", stages=("caption",))
    assert str(error.value).startswith(
        "could not fetch the captioner (BLIP-2) 'nobody/blip2' from the Hugging"
    )
    assert "point caption_model in the data config (--config) at a local copy" in str(error.value)
    with pytest.raises(ModelNotFoundError, match=r"CLIP model for the quality score 'nobody/g'.*clip_model"):
        load_backends(DataConfig(clip_model="nobody/g"), "cpu", stages=("clip",))
    with pytest.raises(ModelNotFoundError, match=r"CLIP model 'nobody/clip'.*point --clip at a local copy"):
        load_clip("nobody/clip", where="--clip")
    with pytest.raises(ModelNotFoundError, match=r"DINO model 'nobody/dino'.*point dino_id at a local copy"):
        _ = FeatureEncoders.from_pretrained("nobody/clip", "nobody/dino").dino
    assert time.monotonic() - start < 1.0
