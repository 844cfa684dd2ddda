"""LoRAs and textual inversions: applied with their strengths, removed after the job, refused with
the right gen_metadata when they do not fit; fetched from a CivitAI stand-in into an LRU cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from horde_worker.inference.generate import run_job
from horde_worker.inference.messages import AdapterFile, GenerateRequest
from horde_worker.inference.pipelines import load_pipeline
from horde_worker.inference.tiny import (
    tiny_flux_components,
    tiny_sd15_components,
    tiny_sdxl_components,
    write_tiny_checkpoint,
    write_tiny_flux_checkpoint,
)
from horde_worker.inference.tiny_adapters import write_tiny_flux_lora, write_tiny_lora, write_tiny_ti
from horde_worker.localhorde.civitai import CivitaiModel, LocalCivitai
from horde_worker.models.civitai import AdapterCache, AdapterUnavailable, pick_trigger
from tests.conftest import job_request


@pytest.fixture(scope="module")
def sd1(tiny_checkpoint):
    return load_pipeline(tiny_checkpoint, torch.device("cpu"), torch.float32, name="tiny")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    unet, _vae, text_encoder = tiny_sd15_components()
    xl_unet, _xl_vae, xl_te, xl_te2 = tiny_sdxl_components()
    return {
        "sd1": write_tiny_lora(folder / "sd1.safetensors", unet, [text_encoder], seed=1),
        "sd1b": write_tiny_lora(folder / "sd1b.safetensors", unet, [text_encoder], seed=2),
        "xl": write_tiny_lora(folder / "xl.safetensors", xl_unet, [xl_te, xl_te2], seed=3),
        "ti": write_tiny_ti(folder / "ti.safetensors", 64, vectors=2, seed=4),
        "ti_xl": write_tiny_ti(folder / "ti_xl.safetensors", {"clip_l": 64, "clip_g": 64}, seed=5),
        "ti_wide": write_tiny_ti(folder / "ti_wide.safetensors", 768, seed=6),
        "folder": folder,
    }


def request(**overrides) -> GenerateRequest:
    return job_request(**{"negative_prompt": "blurry", "steps": 3, **overrides})


def lora(path, model: float = 1.0, clip: float = 1.0, name: str = "123", inject: str | None = None) -> AdapterFile:
    return AdapterFile(name=name, path=str(path), model_strength=model, clip_strength=clip, inject=inject)


def ti(path, inject: str | None = "prompt", strength: float = 1.0, name: str = "777") -> AdapterFile:
    return AdapterFile(name=name, path=str(path), clip_strength=strength, inject=inject, token="<ti777>")


def diff(a, b) -> float:
    return float(np.abs(a.images[0].astype(int) - b.images[0].astype(int)).mean())


def test_lora_strengths_and_removal(sd1, files):
    base = run_job(sd1, request())
    zero = run_job(sd1, request(loras=[lora(files["sd1"], 0.0, 0.0)]))
    assert diff(base, zero) == 0 and zero.notes == []
    full = run_job(sd1, request(loras=[lora(files["sd1"])]))
    assert diff(base, full) > 3
    text_only = run_job(sd1, request(loras=[lora(files["sd1"], model=0.0, clip=1.0)]))
    assert diff(base, text_only) > 0 and diff(full, text_only) > 1  # the text-encoder part is its own strength
    both = run_job(sd1, request(loras=[lora(files["sd1"]), lora(files["sd1b"], name="456")]))
    assert diff(both, full) > 1
    assert diff(base, run_job(sd1, request())) == 0  # nothing stays behind after the job
    for module in (sd1.pipeline.unet, sd1.pipeline.text_encoder):  # not even peft's wrappers
        assert not [k for k in module.state_dict() if "lora" in k or "base_layer" in k]


def test_lora_of_another_baseline_is_reported_and_left_out(sd1, files):
    base = run_job(sd1, request())
    out = run_job(sd1, request(loras=[lora(files["xl"], name="xl-one"), lora(files["sd1"], name="fits")]))
    assert out.notes == [("lora", "baseline_mismatch", "xl-one")]
    alone = run_job(sd1, request(loras=[lora(files["sd1"], name="fits")]))
    assert diff(out, alone) == 0 and diff(out, base) > 3


def test_lora_trigger_is_injected(sd1, files):
    plain = run_job(sd1, request(loras=[lora(files["sd1"])]))
    triggered = run_job(sd1, request(loras=[lora(files["sd1"], inject="shiny armor")]))
    assert diff(plain, triggered) > 0.5


def test_textual_inversion_in_prompt_negative_and_by_reference(sd1, files):
    base = run_job(sd1, request())
    in_prompt = run_job(sd1, request(tis=[ti(files["ti"], "prompt")]))
    in_negative = run_job(sd1, request(tis=[ti(files["ti"], "negprompt")]))
    assert diff(base, in_prompt) > 0.5 and diff(base, in_negative) > 0.5 and diff(in_prompt, in_negative) > 0.5
    weaker = run_job(sd1, request(tis=[ti(files["ti"], "prompt", strength=0.5)]))
    assert diff(weaker, in_prompt) > 0.1
    referenced = run_job(sd1, request(prompt="a cat, embedding:777", tis=[ti(files["ti"], None)]))
    unreferenced = run_job(sd1, request(prompt="a cat, embedding:777"))
    assert diff(referenced, unreferenced) > 0.5
    assert "<ti777>" not in sd1.pipeline.tokenizer.get_vocab()  # unloaded after the job
    assert diff(base, run_job(sd1, request())) == 0


def test_textual_inversion_of_another_width_is_reported(sd1, files):
    out = run_job(sd1, request(tis=[ti(files["ti_wide"], "prompt", name="wide")]))
    assert out.notes == [("ti", "baseline_mismatch", "wide")]
    assert diff(out, run_job(sd1, request())) == 0


def half_fitting_lora(path, source):
    """A LoRA whose UNet part fits and whose text-encoder part has the wrong width: diffusers loads the UNet
    part, then refuses the rest."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source))
    for key, tensor in tensors.items():
        if key.startswith("lora_te") and key.endswith("lora_down.weight"):
            tensors[key] = torch.randn(tensor.shape[0], tensor.shape[1] + 3)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def fresh(tiny_checkpoint):
    """The images of a model that never saw a LoRA or TI."""
    model = load_pipeline(tiny_checkpoint, torch.device("cpu"), torch.float32, name="tiny")
    return run_job(model, request())


def no_adapters_left(pipe) -> bool:
    modules = (pipe.unet, pipe.text_encoder)
    return not [k for m in modules for k in m.state_dict() if "lora" in k or "base_layer" in k]


def test_a_lora_that_fails_half_way_is_left_out_and_leaves_nothing_behind(sd1, files, fresh, tmp_path):
    broken = half_fitting_lora(tmp_path / "half.safetensors", files["sd1"])
    out = run_job(sd1, request(loras=[lora(broken, name="half")]))
    assert out.notes == [("lora", "baseline_mismatch", "half")]
    assert diff(out, fresh) == 0  # made without it, as the note says
    assert diff(run_job(sd1, request()), fresh) == 0 and no_adapters_left(sd1.pipeline)
    alone = run_job(sd1, request(loras=[lora(files["xl"], name="xl-only")]))  # refused before any layer
    assert alone.notes == [("lora", "baseline_mismatch", "xl-only")] and diff(alone, fresh) == 0
    with_good = run_job(sd1, request(loras=[lora(broken, name="half"), lora(files["sd1"], name="fits")]))
    assert diff(with_good, run_job(sd1, request(loras=[lora(files["sd1"], name="fits")]))) == 0
    assert diff(run_job(sd1, request()), fresh) == 0 and no_adapters_left(sd1.pipeline)


def test_a_job_stopped_mid_sampling_takes_its_lora_and_ti_off(sd1, files, fresh):
    from horde_worker.inference.runner import JobCancelled

    def stop(step: int, total: int) -> None:
        raise JobCancelled("j", "stopped by the test")

    with pytest.raises(JobCancelled):
        run_job(sd1, request(loras=[lora(files["sd1"])], tis=[ti(files["ti"])]), on_step=stop)
    assert diff(run_job(sd1, request()), fresh) == 0 and no_adapters_left(sd1.pipeline)
    assert "<ti777>" not in sd1.pipeline.tokenizer.get_vocab()


def test_sdxl_lora_and_ti(tmp_path, files):
    path = write_tiny_checkpoint(tmp_path / "xl.safetensors", "stable_diffusion_xl")
    xl = load_pipeline(path, torch.device("cpu"), torch.float32, name="xl")
    job = dict(baseline="stable_diffusion_xl")
    base = run_job(xl, request(**job))
    assert diff(base, run_job(xl, request(loras=[lora(files["xl"], 0.0, 0.0)], **job))) == 0
    with_lora = run_job(xl, request(loras=[lora(files["xl"])], **job))
    assert with_lora.notes == [] and diff(base, with_lora) > 1
    with_ti = run_job(xl, request(tis=[ti(files["ti_xl"])], **job))
    assert with_ti.notes == [] and diff(base, with_ti) > 0.1
    mismatch = run_job(xl, request(loras=[lora(files["sd1"], name="sd1-one")], **job))
    assert mismatch.notes == [("lora", "baseline_mismatch", "sd1-one")]


def test_flux_lora(tmp_path):
    path = write_tiny_flux_checkpoint(tmp_path / "flux.safetensors", fp8=False)
    flux = load_pipeline(path, torch.device("cpu"), torch.float32, name="flux")
    lora_path = write_tiny_flux_lora(tmp_path / "flux_lora.safetensors", tiny_flux_components()[0], seed=8)
    job = dict(baseline="flux_1", negative_prompt="", cfg_scale=1.0)
    base = run_job(flux, request(**job))
    # Flux on the CPU differs run to run by a few hundredths of a level; a LoRA at 0 stays within that.
    assert diff(base, run_job(flux, request(loras=[lora(lora_path, 0.0, 0.0)], **job))) < 0.2
    with_lora = run_job(flux, request(loras=[lora(lora_path)], **job))
    assert with_lora.notes == [] and diff(base, with_lora) > 0.5


# --- CivitAI and the cache -----------------------------------------------------------------------


@pytest.fixture
def civitai(files):
    def model(model_id, name, path, kind="LORA", base="SD 1.5", **extra):
        return CivitaiModel(model_id=model_id, version_id=model_id * 10, name=name, kind=kind, base_model=base,
                            data=path.read_bytes(), **extra)

    server = LocalCivitai([
        model(101, "Shiny Armor", files["sd1"], trained_words=["shiny armor", "metal plates"]),
        model(102, "Other Style", files["sd1b"]),
        model(103, "XL Thing", files["xl"], base="SDXL 1.0"),
        model(104, "Bad Hands", files["ti"], kind="TextualInversion"),
        model(105, "Damaged", files["sd1"], claimed_sha256="00" * 32),
        model(106, "Huge", files["sd1"], claimed_size_kb=5 * 1024 * 1024),
    ]).start()
    yield server
    server.stop()


def test_lookup_by_id_name_and_version(civitai, tmp_path):
    cache = AdapterCache("lora", tmp_path / "lora", 1 << 30, api_url=civitai.url)
    by_id, version = cache.fetch("101")
    assert by_id.read_bytes() == civitai.models[101].data and version.trained_words[0] == "shiny armor"
    assert cache.fetch("shiny armor")[1].version_id == 1010
    assert cache.fetch("1020", is_version=True)[1].model_name == "Other Style"
    with pytest.raises(AdapterUnavailable) as missing:
        cache.fetch("999")
    assert missing.value.value == "download_failed"
    with pytest.raises(AdapterUnavailable) as wrong_kind:
        cache.fetch("104")
    assert wrong_kind.value.value == "download_failed"
    with pytest.raises(AdapterUnavailable) as mismatch:
        cache.fetch("103", baseline="stable_diffusion_1")
    assert mismatch.value.value == "baseline_mismatch"
    assert not (tmp_path / "lora" / "1030.safetensors").exists()  # never downloaded


def test_damaged_and_oversized_files_are_refused(civitai, tmp_path):
    cache = AdapterCache("lora", tmp_path / "lora", 1 << 30, api_url=civitai.url)
    with pytest.raises(AdapterUnavailable, match="sha256 mismatch"):
        cache.fetch("105")
    with pytest.raises(AdapterUnavailable, match="over the"):
        cache.fetch("106")
    assert not list((tmp_path / "lora").glob("*.safetensors"))


def test_cache_evicts_least_recently_used_and_works_offline(civitai, tmp_path, files):
    size = files["sd1"].stat().st_size
    cache = AdapterCache("lora", tmp_path / "lora", int(size * 2.5), api_url=civitai.url)
    cache.fetch("101")
    cache.fetch("102")
    cache.fetch("101")  # now 102 is the least recently used
    civitai.add(CivitaiModel(107, 1070, "Third", "LORA", "SD 1.5", files["sd1b"].read_bytes()))
    cache.fetch("107")
    kept = sorted(p.name for p in (tmp_path / "lora").glob("*.safetensors"))
    assert kept == ["1010.safetensors", "1070.safetensors"]
    assert cache.cached_bytes() <= int(size * 2.5)
    civitai.stop()
    reopened = AdapterCache("lora", tmp_path / "lora", int(size * 2.5), api_url=civitai.url, timeout=2)
    path, version = reopened.fetch("101")  # CivitAI is down: the remembered lookup and file serve
    assert path.exists() and version.version_id == 1010
    with pytest.raises(AdapterUnavailable):
        reopened.fetch("102")


def test_trigger_choice(civitai, tmp_path):
    version = AdapterCache("lora", tmp_path / "lora", 1 << 30, api_url=civitai.url).lookup("101")
    assert pick_trigger(version, "any") == "shiny armor"
    assert pick_trigger(version, "all") == "shiny armor, metal plates"
    assert pick_trigger(version, "metal plate") == "metal plates"
    assert pick_trigger(version, "a dragon") == "a dragon"
    assert pick_trigger(version, None) is None
