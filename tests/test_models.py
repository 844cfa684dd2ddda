"""Model reference, models_to_load resolution, verified resumable downloads, reGen cache reuse."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import yaml

from horde_worker.config.bridge_data import BridgeData
from horde_worker.models.catalog import plan_catalog
from horde_worker.models.download import DownloadError, DownloadTask, civitai_headers, download
from horde_worker.models.reference import ModelReference, load_reference
from horde_worker.models.resolve import resolve
from tests.conftest import REPO, SHARED_DATA
from tests.fileserver import FileServer

REAL_REFERENCE = json.loads((SHARED_DATA / "stable_diffusion.json").read_text())


@pytest.fixture(scope="module")
def reference() -> ModelReference:
    return ModelReference(REAL_REFERENCE, "test")


def test_reference_fetch_keeps_last_good_copy_and_falls_back(tmp_path):
    small = {name: REAL_REFERENCE[name] for name in ("stable_diffusion", "Deliberate")}
    with FileServer() as server:
        server.files["/ref.json"] = json.dumps(small).encode()
        fetched = load_reference(tmp_path, f"{server.url}/ref.json")
        assert len(fetched) == 2 and fetched.source.startswith("fetched")
        server.files["/ref.json"] = b"<html>maintenance</html>"
        kept = load_reference(tmp_path, f"{server.url}/ref.json")
        assert len(kept) == 2 and kept.source.startswith("last good copy")
    offline = load_reference(tmp_path / "never-online", "http://127.0.0.1:9/ref.json")
    assert offline.source.startswith("snapshot") and len(offline) > 100


def test_entries_carry_baseline_hash_and_v_prediction(reference):
    sd21 = reference.get("stable_diffusion_2.1")
    assert sd21.baseline == "stable_diffusion_2" and sd21.v_prediction
    sd15 = reference.get("STABLE_DIFFUSION")  # case-insensitive
    assert sd15.checkpoint.name == "model_1_5.ckpt" and len(sd15.checkpoint.sha256) == 64
    assert reference.get("Flux.1-Schnell fp8 (Compact)").is_large


def test_meta_instructions(reference):
    counts = {"Deliberate": 900, "stable_diffusion": 500, "AlbedoBase XL (SDXL)": 700, "Anything Diffusion": 1}
    names = lambda *items, **kw: resolve(list(items), kw.get("skip", []), reference, counts,  # noqa: E731
                                         kw.get("large", False)).names
    assert names("TOP 2") == ["Deliberate", "AlbedoBase XL (SDXL)"]
    assert names("top 3", skip=["Deliberate"]) == ["AlbedoBase XL (SDXL)", "stable_diffusion"]
    everything = names("ALL")
    assert "Flux.1-Schnell fp8 (Compact)" not in everything and len(everything) == len(reference) - 2
    assert len(names("ALL MODELS", large=True)) == len(reference)
    sdxl = names("ALL SDXL")
    assert sdxl and all(reference.get(n).baseline == "stable_diffusion_xl" for n in sdxl)
    assert all(reference.get(n).inpainting for n in names("all inpainting"))
    assert not any(reference.get(n).nsfw for n in names("ALL SFW"))
    assert all(reference.get(n).nsfw for n in names("ALL NSFW"))
    assert {reference.get(n).baseline for n in names("ALL SD21")} == {"stable_diffusion_2"}
    assert names("ALL SD15", skip=["ALL NSFW"]) == [n for n in names("ALL SD15") if not reference.get(n).nsfw]
    bottom = names("BOTTOM 1")
    assert bottom and counts.get(bottom[0], 0) == 0


def test_unknown_names_suggest_the_closest_and_large_models_need_the_switch(reference):
    result = resolve(["Delibrate", "Flux.1-Schnell fp8 (Compact)"], [], reference, {})
    assert result.names == []
    assert any("'Delibrate'" in n and "did you mean 'Deliberate'" in n for n in result.notices)
    assert any("load_large_models" in n for n in result.notices)


def test_resolution_against_the_local_hordes_statistics_answer(reference):
    from horde_worker.localhorde import LocalHorde
    from horde_worker.models.setup import usage_counts

    with LocalHorde(["stable_diffusion", "Deliberate"]) as horde:
        horde.state.usage.update({"Deliberate": 3, "stable_diffusion": 7})
        counts = usage_counts(horde.url, horde.api_key)
    assert counts == {"stable_diffusion": 7, "Deliberate": 3}
    assert resolve(["TOP 1"], [], reference, counts).names == ["stable_diffusion"]


def payload(size: int = 300_000) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, hashlib.sha256(data).hexdigest()


def test_download_cut_half_way_resumes_with_range(tmp_path, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    data, sha = payload()
    with FileServer() as server:
        server.files["/m.safetensors"] = data
        server.cut_once["/m.safetensors"] = len(data) // 2
        dest = tmp_path / "compvis" / "m.safetensors"
        download(DownloadTask(f"{server.url}/m.safetensors", dest, sha, len(data)))
        ranges = [r for p, r in server.requests]
    assert dest.read_bytes() == data and not list(dest.parent.glob("*.part"))
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= len(data) // 2  # resumed from what had arrived, not from zero


def test_partial_file_from_an_earlier_run_is_resumed(tmp_path):
    data, sha = payload()
    dest = tmp_path / "m.safetensors"
    dest.with_name("m.safetensors.part").write_bytes(data[:1000])
    with FileServer() as server:
        server.files["/m"] = data
        download(DownloadTask(f"{server.url}/m", dest, sha))
        assert server.requests == [("/m", "bytes=1000-")]
    assert dest.read_bytes() == data


def test_corrupted_download_is_rejected_and_deleted(tmp_path):
    data, sha = payload()
    with FileServer() as server:
        server.files["/m"] = data[:-1] + bytes([data[-1] ^ 0xFF])
        dest = tmp_path / "m.safetensors"
        with pytest.raises(DownloadError, match="m.safetensors: sha256 mismatch") as err:
            download(DownloadTask(f"{server.url}/m", dest, sha))
    assert sha in str(err.value) and not dest.exists() and not list(dest.parent.glob("*.part"))


def test_civitai_token_goes_only_to_civitai():
    assert civitai_headers("https://civitai.com/api/download/models/1", "t") == {"Authorization": "Bearer t"}
    assert civitai_headers("https://evil.example/civitai.com", "t") == {}
    assert civitai_headers("https://civitai.com/x", None) == {}


def small_reference(server_url: str, files: dict[str, bytes]) -> ModelReference:
    data = {}
    for name, blob in files.items():
        data[name] = {"name": name, "baseline": "stable diffusion 1", "nsfw": False, "size_on_disk_bytes": len(blob),
                      "config": {"files": [{"path": f"{name}.safetensors",
                                            "sha256sum": hashlib.sha256(blob).hexdigest()}],
                                 "download": [{"file_name": f"{name}.safetensors", "file_path": "",
                                               "file_url": f"{server_url}/{name}"}]}}
    return ModelReference(data, "test")


def test_regen_cache_layout_is_used_in_place_with_zero_downloads(tmp_path):
    blobs = {"alpha": os.urandom(1000), "beta": os.urandom(2000)}
    regen_cache = tmp_path / "regen" / "models"
    (regen_cache / "compvis").mkdir(parents=True)
    for name, blob in blobs.items():
        (regen_cache / "compvis" / f"{name}.safetensors").write_bytes(blob)
    with FileServer() as server:
        for name, blob in blobs.items():
            server.files[f"/{name}"] = blob
        ref = small_reference(server.url, blobs)
        plan = plan_catalog(["alpha", "beta"], [], regen_cache, ref, {})
        assert [m.name for m in plan.ready] == ["alpha", "beta"] and plan.to_download == []
        assert server.requests == []
        missing = plan_catalog(["alpha", "beta"], [], tmp_path / "empty", ref, {})
        assert [e.name for e, _ in missing.to_download] == ["alpha", "beta"]
        assert missing.bytes_to_download == 3000


def test_download_models_dry_run_lists_sizes_presence_and_space(tmp_path):
    blobs = {"alpha": os.urandom(1000), "beta": os.urandom(2000)}
    cache = tmp_path / "cache"
    (cache / "compvis").mkdir(parents=True)
    (cache / "compvis" / "alpha.safetensors").write_bytes(blobs["alpha"])
    with FileServer() as server:
        ref = {n: small_reference(server.url, blobs).get(n).raw for n in blobs}
        server.files["/reference.json"] = json.dumps(ref).encode()
        for name, blob in blobs.items():
            server.files[f"/{name}"] = blob
        config = tmp_path / "bridgeData.yaml"
        settings = {"api_key": "k", "cache_home": str(cache), "models_to_load": ["alpha", "beta"],
                    "model_reference_url": f"{server.url}/reference.json"}
        config.write_text(yaml.safe_dump(settings))
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIWORKER_")}
        dry = subprocess.run([sys.executable, "-m", "horde_worker.models.cli", "-c", str(config), "--dry-run"],
                             capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
        assert dry.returncode == 0, dry.stderr
        # Post-processor weights (on by default) are listed too; the real run below leaves them out, since
        # they would come from the internet.
        assert "post-processing: GFPGANv1.4.pth" in dry.stdout and "post-processing: u2net.onnx" in dry.stdout
        config.write_text(yaml.safe_dump({**settings, "allow_post_processing": False}))
        assert "alpha" in dry.stdout and "present" in dry.stdout and "beta" in dry.stdout
        assert "to download" in dry.stdout and "disk space still needed: 0.00 GB" in dry.stdout
        assert not (cache / "compvis" / "beta.safetensors").exists()
        real = subprocess.run([sys.executable, "-m", "horde_worker.models.cli", "-c", str(config)],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
        assert real.returncode == 0, real.stderr
        assert (cache / "compvis" / "beta.safetensors").read_bytes() == blobs["beta"]
        assert [p for p, _ in server.requests if p != "/reference.json"] == ["/beta"]


def test_custom_models_are_validated(tmp_path, reference):
    from horde_worker.config.bridge_data import CustomModel

    good = tmp_path / "mine.safetensors"
    good.write_bytes(b"x")
    customs = [CustomModel(name="mine", baseline="stable_diffusion_1", filepath=str(good)),
               CustomModel(name="gone", baseline="stable_diffusion_1", filepath=str(tmp_path / "nope.safetensors")),
               CustomModel(name="Deliberate", baseline="stable_diffusion_1", filepath=str(good))]
    plan = plan_catalog(["mine", "gone"], [], tmp_path, reference, {}, custom_models=customs)
    assert [m.name for m in plan.ready] == ["mine"]
    assert any("'gone'" in n and "does not exist" in n for n in plan.notices)
    assert any("'Deliberate' is already a model" in n for n in plan.notices)
    assert BridgeData(custom_models=[{"name": "a", "baseline": "b", "filepath": "c"}]).custom_models[0].name == "a"
