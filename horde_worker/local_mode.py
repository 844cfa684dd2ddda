"""Local mode: the worker serves an embedded horde on 127.0.0.1 with the tiny demo model.

Nothing leaves the machine. Sample requests (or the user's own, from `--requests FILE`) go to
the local horde over HTTP, the worker pops and submits them exactly as it would on the real
horde, and `--out DIR` saves what came back.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from loguru import logger

from horde_worker.config.bridge_data import BridgeData
from horde_worker.inference.tiny import DEMO_MODEL_NAME, LOCAL_SAFETY_MODEL, ensure_local_models
from horde_worker.localhorde import LocalHorde
from horde_worker.localhorde.samples import sample_requests
from horde_worker.models.catalog import ModelCatalog, ServedModel

LOCAL_NAME_DEFAULT = "local-demo-worker"


def load_request_file(path: Path, model: str) -> list[dict]:
    """A JSON list of /v2/generate/async bodies; bodies without `models` get the demo model."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--requests {path}: cannot read a JSON list of requests: {exc}") from None
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ValueError(f"--requests {path}: must be a JSON list of request objects")
    return [{**item, "models": item.get("models") or [model]} for item in data]


def run_local(settings: BridgeData, args, devices: list[str], console) -> int:
    """Run the worker against an embedded local horde; returns the exit code."""
    from horde_worker.cli import run_supervisor
    from horde_worker.horde.client import HordeClient, RetryPolicy

    logger.warning("LOCAL MODE: serving an embedded horde on 127.0.0.1 with tiny random-weight models (SD1 {!r} by "
                   "default; also horde-worker-tiny-sd2, -sdxl, -flux, -zimage, -qwen and -cascade); nothing goes to "
                   "the real horde. "
                   "To serve it, copy bridgeData_template.yaml to bridgeData.yaml, set api_key and dreamer_name, and start "
                   "without --local.", DEMO_MODEL_NAME)
    local_models = ensure_local_models(Path(settings.cache_home))
    from horde_worker.models.controlnets import plan_control, ready_setup

    control, _missing = plan_control(Path(settings.cache_home), {"stable_diffusion_1"})
    from horde_worker.models.postprocessors import plan_postprocessors

    catalog = ModelCatalog([ServedModel(name, path, baseline) for name, (path, baseline) in local_models.items()],
                           ready_setup(control), plan_postprocessors(Path(settings.cache_home))[0])
    if args.requests:
        try:
            bodies = load_request_file(args.requests, DEMO_MODEL_NAME)
        except ValueError as exc:
            logger.error(str(exc))
            return 2
    elif args.jobs is not None:
        bodies = sample_requests(args.jobs, DEMO_MODEL_NAME)
    else:
        bodies = []
    horde = LocalHorde(list(local_models), flux_models={n for n, (_, b) in local_models.items() if b == "flux_1"}).start()
    civitai = local_civitai(Path(settings.cache_home)).start()
    settings = settings.model_copy(update={
        "horde_url": horde.url, "api_key": horde.api_key, "civitai_api_url": civitai.url,
        "allow_lora": True, "allow_controlnet": True, "allow_post_processing": True,
        "safety_model": settings.safety_model or str(Path(settings.cache_home) / "compvis" / LOCAL_SAFETY_MODEL),
        "dreamer_name": args.name or LOCAL_NAME_DEFAULT,
    })
    request_ids = []
    for body in bodies:
        try:
            request_ids.append(horde.state.add_request(body)["id"])
        except Exception as exc:  # a request the horde would refuse
            logger.error("request refused by the local horde: {}", getattr(exc, "errors", None) or exc)
            horde.stop()
            return 2
    stop_feeding = threading.Event()
    finite = bool(bodies) or args.jobs is not None
    if not finite:
        threading.Thread(target=feed_samples_forever, args=(horde, DEMO_MODEL_NAME, stop_feeding),
                         daemon=True).start()
    client = HordeClient(horde.url, horde.api_key, retry=RetryPolicy(attempts=5, base_delay=0.2, max_delay=2))

    def finished() -> bool:
        if horde.state.all_done():
            return True
        left_out = horde.state.unservable(settings.dreamer_name)
        for request_id, reason in left_out.items():
            position = request_ids.index(request_id) + 1 if request_id in request_ids else "?"
            logger.warning("request {} was never handed to this worker: the local horde skipped it for '{}' "
                           "(a capability this worker does not offer, or a setting of yours)", position, reason)
        return bool(left_out)

    try:
        code = run_supervisor(settings, client, catalog, devices, args, console,
                              stop_condition=finished if finite else None, pop_interval=0.2)
        if args.out and code == 0:
            collect_results(horde, request_ids, args.out)
    finally:
        stop_feeding.set()
        horde.stop()
        civitai.stop()
    return code


def local_civitai(cache_home: Path):
    """A loopback CivitAI serving the tiny LoRAs and TIs of local mode (ids 1-5, see the README)."""
    from horde_worker.inference.tiny import LOCAL_ADAPTER_DIR
    from horde_worker.inference.tiny_adapters import LOCAL_ADAPTERS
    from horde_worker.localhorde.civitai import CivitaiModel, LocalCivitai

    folder = cache_home / "compvis" / LOCAL_ADAPTER_DIR
    return LocalCivitai([
        CivitaiModel(model_id=model_id, version_id=model_id * 100, name=name, kind=kind, base_model=base,
                     data=(folder / file_name).read_bytes(), trained_words=list(words), file_name=file_name)
        for model_id, (name, kind, base, file_name, words) in LOCAL_ADAPTERS.items()
    ])


def collect_results(horde, request_ids: list[str], out_dir: Path) -> None:
    """Save every image of every request as WebP and write results.json (local mode)."""
    import requests

    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for index, request_id in enumerate(request_ids):
        status = requests.get(f"{horde.url}/v2/generate/status/{request_id}", timeout=30).json()
        generations = []
        for gen_index, gen in enumerate(status.get("generations", [])):
            img = gen["img"]
            if img.startswith("http"):
                data = requests.get(img, timeout=30).content
            else:
                import base64

                data = base64.b64decode(img)
            name = f"{index:03d}_{gen_index}.webp"
            (out_dir / name).write_bytes(data)
            from PIL import Image

            with Image.open(out_dir / name) as image:
                width, height = image.size
            generations.append({"file": name, "id": gen["id"], "seed": gen["seed"], "state": gen["state"],
                                "censored": gen["censored"], "gen_metadata": gen["gen_metadata"],
                                "model": gen["model"], "width": width, "height": height})
        results.append({"request_id": request_id, "done": status.get("done"), "faulted": status.get("faulted"),
                        "generations": generations})
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    logger.info("saved {} request(s) to {}", len(results), out_dir)


def feed_samples_forever(horde, model: str, stop: threading.Event) -> None:
    """Keep one sample request waiting, so the demo loop never runs dry (local mode without --jobs)."""
    index = 0
    while not stop.wait(1.0):
        if horde.state.counters()["pending"] == 0:
            horde.state.add_request(sample_requests(1, model, start=index)[0])
            index += 1
