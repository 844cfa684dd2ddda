"""Split-file reference entries (Qwen-Image, Z-Image-Turbo, Stable Cascade): read from both branches of the
reference, resolved by the new meta-instructions, and their parts downloaded into their own directories,
verified and resumable, a part two models share fetched once."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest

from horde_worker.models.catalog import checkpoint_path, file_path, plan_catalog, unique_tasks
from horde_worker.models.download import download_all
from horde_worker.models.reference import ModelReference, load_reference
from horde_worker.models.resolve import resolve
from tests.conftest import SHARED_DATA
from tests.fileserver import FileServer

MAIN = json.loads((SHARED_DATA / "stable_diffusion.json").read_text())
ZMODEL = json.loads((SHARED_DATA / "stable_diffusion.zmodel.json").read_text())


@pytest.fixture(scope="module")
def merged() -> ModelReference:
    return ModelReference({**MAIN, **{k: v for k, v in ZMODEL.items() if k not in MAIN}}, "test")


def test_split_entries_name_each_part_its_type_and_directory(merged):
    zimage = merged.get("Z-Image-Turbo")
    assert zimage.baseline == "z_image_turbo" and zimage.is_split and zimage.is_large
    assert zimage.checkpoint.name == "z_image_turbo_bf16.safetensors" and zimage.checkpoint.file_type == "unet"
    parts = {f.file_type: (f.name, f.directory) for f in zimage.files}
    assert parts == {"unet": ("z_image_turbo_bf16.safetensors", ""), "vae": ("ae.safetensors", "../vae"),
                     "text_encoders": ("qwen_3_4b.safetensors", "../text_encoders")}
    assert all(f.sha256 and len(f.sha256) == 64 and f.url for f in zimage.files)
    cascade = merged.get("Stable Cascade 1.0")
    assert cascade.is_split and cascade.checkpoint.file_type == "stable_cascade_stage_c"
    assert {f.file_type for f in cascade.files} == {"stable_cascade_stage_b", "stable_cascade_stage_c"}
    assert not merged.get("stable_diffusion").is_split  # the one-file entries read as before


def test_the_new_baselines_come_from_the_zmodel_branch_for_names_the_main_one_lacks(tmp_path):
    main = {name: MAIN[name] for name in ("stable_diffusion", "Deliberate")}
    zmodel = {name: ZMODEL[name] for name in ("Z-Image-Turbo", "Qwen-Image_fp8", "Deliberate")}
    zmodel["Deliberate"] = {**zmodel["Deliberate"], "description": "the zmodel branch's copy"}
    with FileServer() as server:
        server.files["/main.json"] = json.dumps(main).encode()
        server.files["/zmodel.json"] = json.dumps(zmodel).encode()
        reference = load_reference(tmp_path, f"{server.url}/main.json", new_baselines_url=f"{server.url}/zmodel.json")
        assert sorted(reference.names()) == ["Deliberate", "Qwen-Image_fp8", "Z-Image-Turbo", "stable_diffusion"]
        assert reference.get("Deliberate").raw["description"] != "the zmodel branch's copy"  # main wins
        # A custom reference URL is taken as it is.
        assert len(load_reference(tmp_path / "custom", f"{server.url}/main.json")) == 2
    # Offline: the last good copies, then the shipped snapshots (which have the new baselines).
    offline = load_reference(tmp_path, "http://127.0.0.1:9/main.json", new_baselines_url="http://127.0.0.1:9/z.json")
    assert offline.get("Z-Image-Turbo") is not None and offline.source.startswith("last good copy")
    shipped = load_reference(tmp_path / "fresh", None)
    assert shipped.get("Z-Image-Turbo") is not None and shipped.get("Qwen-Image_fp8") is not None


def test_meta_instructions_for_the_new_baselines_and_the_regen_forms(merged):
    def names(*items, large=True):
        return resolve(list(items), [], merged, {}, large).names

    assert names("ALL ZIMAGE") == ["Z-Image-Turbo"] == names("all z-image models")
    assert names("ALL QWEN") == ["Qwen-Image_fp8"]
    assert names("ALL CASCADE") == ["Stable Cascade 1.0"]
    assert set(names("ALL FLUX")) == {e.name for e in merged.entries.values() if e.baseline == "flux_1"}
    assert names("ALL SDXL MODELS") == names("ALL SDXL") and len(names("ALL SDXL")) > 10
    assert names("ALL ZIMAGE", large=False) == []  # gated as Flux is
    notices = resolve(["Z-Image-Turbo"], [], merged, {}, False).notices
    assert any("load_large_models" in n for n in notices)


def _served_copy(entry: dict, name: str, unet: str) -> dict:
    """A second model of the same baseline sharing the first one's VAE and text encoder."""
    other = copy.deepcopy(entry)
    other["name"] = name
    other["config"]["files"][0]["path"] = unet
    other["config"]["download"][0]["file_name"] = unet
    return other


def test_split_parts_download_into_their_directories_verified_and_a_shared_part_once(tmp_path, monkeypatch):
    from horde_worker.models import catalog

    monkeypatch.setattr("time.sleep", lambda s: None)
    contents = {"z_image_turbo_bf16.safetensors": b"u" * 3000, "ae.safetensors": b"v" * 2000,
                "qwen_3_4b.safetensors": b"t" * (3 << 20), "second_unet.safetensors": b"s" * 1000}
    with FileServer() as server:
        entry = copy.deepcopy(ZMODEL["Z-Image-Turbo"])
        second = _served_copy(entry, "Z-Second", "second_unet.safetensors")
        for raw in (entry, second):
            for item, download in zip(raw["config"]["files"], raw["config"]["download"], strict=True):
                item["sha256sum"] = hashlib.sha256(contents[item["path"]]).hexdigest()
                download["file_url"] = f"{server.url}/{item['path']}"
        for name, data in contents.items():
            server.files[f"/{name}"] = data
        # The Qwen3 tokenizer comes from its own release: here from the loopback server too.
        for name in ("tokenizer.json", "tokenizer_config.json"):
            server.files[f"/qwen/{name}"] = b"{}"
        monkeypatch.setitem(catalog.SPLIT_TOKENIZERS, "z_image_turbo", (
            "qwen3-tokenizer", {n: f"{server.url}/qwen/{n}" for n in ("tokenizer.json", "tokenizer_config.json")}))
        server.cut_once["/qwen_3_4b.safetensors"] = 3 << 19  # cut half way: resumed with a Range request
        reference = ModelReference({"Z-Image-Turbo": entry, "Z-Second": second}, "test")
        home = tmp_path / "models"
        plan = plan_catalog(["Z-Image-Turbo", "Z-Second"], [], home, reference, {}, load_large_models=True)
        assert not plan.ready and len(plan.to_download) == 10
        tasks = unique_tasks([task for _, task in plan.to_download])
        assert len(tasks) == 6 and plan.bytes_to_download == 0  # sizes unknown for split parts
        tokenizer = home / "text_encoders" / "qwen3-tokenizer"
        assert {t.dest for t in tasks} == {home / "compvis" / "z_image_turbo_bf16.safetensors",
                                           home / "compvis" / "second_unet.safetensors",
                                           home / "vae" / "ae.safetensors",
                                           home / "text_encoders" / "qwen_3_4b.safetensors",
                                           tokenizer / "tokenizer.json", tokenizer / "tokenizer_config.json"}
        assert download_all(tasks, show_progress=False) == []
        fetched = [path for path, _ in server.requests]
        assert fetched.count("/ae.safetensors") == 1 and fetched.count("/qwen_3_4b.safetensors") == 2
        assert any(path == "/qwen_3_4b.safetensors" and rng for path, rng in server.requests), server.requests
    again = plan_catalog(["Z-Image-Turbo", "Z-Second"], [], home, reference, {}, load_large_models=True)
    assert not again.to_download and [m.name for m in again.ready] == ["Z-Image-Turbo", "Z-Second"]
    manifest = json.loads(again.ready[0].path.read_text())
    assert again.ready[0].path == checkpoint_path(reference.get("Z-Image-Turbo"), home)
    assert manifest["baseline"] == "z_image_turbo"
    folder = again.ready[0].path.parent
    for kind, files in manifest["parts"].items():
        for relative in files:
            assert (folder / relative).resolve().read_bytes() == contents[(folder / relative).name], kind
    assert file_path(reference.get("Z-Second").files[1], home) == home / "vae" / "ae.safetensors"


def test_the_references_requirements_and_unsupported_features_are_refused_with_a_reason(merged, tmp_path):
    from horde_worker.horde.wire import PopResponse
    from horde_worker.models.catalog import ModelCatalog, served_from_entry
    from horde_worker.supervisor.bounds import bounds_reason
    from horde_worker.supervisor.job import Job
    from horde_worker.supervisor.jobspec import unsupported_reason

    entry = merged.get("Z-Image-Turbo")
    served = served_from_entry(entry, tmp_path)
    assert served.requirements == {"min_steps": 9, "max_steps": 9, "min_cfg_scale": 1.0, "max_cfg_scale": 1.0}
    assert served.samplers == ("k_euler",) and set(served.features_not_supported) == {"hires_fix", "inpainting",
                                                                                       "controlnet"}
    catalog = ModelCatalog([served])

    def why(**payload):
        pop = PopResponse.model_validate({"id": "a", "ids": ["a"], "model": "Z-Image-Turbo",
                                          "payload": {"ddim_steps": 9, "cfg_scale": 1.0, "sampler_name": "k_euler",
                                                      **payload}})
        return (bounds_reason(pop, max_pixels=1024 * 1024, max_batch=4, requirements=served.requirements)
                or unsupported_reason(Job(pop=pop), catalog))

    assert why() is None
    assert "steps 20 is outside 9..9" in why(ddim_steps=20)
    assert "cfg_scale 5 is outside 1..1" in why(cfg_scale=5.0)
    assert "k_euler only" in why(sampler_name="k_euler_a")
    assert "hires_fix is not supported by Z-Image-Turbo" in why(hires_fix=True)
    assert "LoRAs" in why(loras=[{"name": "123"}])


def test_qwen_image_and_cascade_plan_their_parts_and_qwen_its_tokenizer(merged, tmp_path):
    plan = plan_catalog(["Qwen-Image_fp8", "Stable Cascade 1.0"], [], tmp_path, merged, {}, load_large_models=True)
    assert not plan.ready
    assert {t.dest.relative_to(tmp_path).as_posix() for _, t in plan.to_download} == {
        "compvis/qwen_image_fp8_e4m3fn.safetensors", "vae/qwen_image_vae.safetensors",
        "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors",
        "text_encoders/qwen2.5-vl-tokenizer/tokenizer.json", "text_encoders/qwen2.5-vl-tokenizer/tokenizer_config.json",
        "compvis/stable_cascade_stage_b.safetensors", "compvis/stable_cascade_stage_c.safetensors"}
    hashed = {t.dest.name for _, t in plan.to_download if t.sha256}
    assert hashed == {"qwen_image_fp8_e4m3fn.safetensors", "qwen_image_vae.safetensors",
                      "qwen_2.5_vl_7b_fp8_scaled.safetensors", "stable_cascade_stage_b.safetensors",
                      "stable_cascade_stage_c.safetensors"}  # the tokenizer has no hash in the reference
    assert not plan.notices


def test_download_mirror_redirects_the_reference_and_every_file_of_a_model(tmp_path, monkeypatch):
    from urllib.parse import urlsplit

    from horde_worker.config.bridge_data import BridgeData
    from horde_worker.models.setup import prepare_models

    monkeypatch.setattr("time.sleep", lambda s: None)
    entry = copy.deepcopy(ZMODEL["Qwen-Image_fp8"])
    contents = {item["path"]: item["path"].encode() * 100 for item in entry["config"]["files"]}
    for item in entry["config"]["files"]:
        item["sha256sum"] = hashlib.sha256(contents[item["path"]]).hexdigest()
    reference_url = "https://raw.githubusercontent.com/example/reference/main/stable_diffusion.json"
    with FileServer() as mirror:
        # The mirror holds each file under <host>/<path> of its origin (the reference's own URLs, untouched).
        mirror.files[urlsplit(reference_url).hostname + urlsplit(reference_url).path] = json.dumps(
            {"Qwen-Image_fp8": entry}).encode()
        for item, download in zip(entry["config"]["files"], entry["config"]["download"], strict=True):
            origin = urlsplit(download["file_url"])
            assert origin.hostname == "huggingface.co"
            mirror.files[f"/{origin.hostname}{origin.path}"] = contents[item["path"]]
        for name in ("tokenizer.json", "tokenizer_config.json"):
            mirror.files[f"/huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/resolve/main/{name}"] = b"{}"
        mirror.files = {("/" + k.lstrip("/")): v for k, v in mirror.files.items()}
        settings = BridgeData.model_validate({
            "dreamer_name": "m", "api_key": "k" * 22, "cache_home": str(tmp_path / "models"),
            "models_to_load": ["Qwen-Image_fp8"], "load_large_models": True, "allow_post_processing": False,
            "model_reference_url": reference_url, "download_mirror": mirror.url + "/"})
        catalog, notices = prepare_models(settings, show_progress=False)
        fetched = [path for path, _ in mirror.requests]
    assert catalog.names() == ["Qwen-Image_fp8"], notices
    assert fetched[0] == "/raw.githubusercontent.com/example/reference/main/stable_diffusion.json"
    assert all(path.startswith(("/huggingface.co/", "/raw.githubusercontent.com/")) for path in fetched)
    assert (tmp_path / "models" / "vae" / "qwen_image_vae.safetensors").read_bytes() == contents[
        "qwen_image_vae.safetensors"]
