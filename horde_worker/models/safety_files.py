"""The safety checker's CLIP weights: the horde's `clip.json` reference (ViT-L/14), or `safety_model`."""

from __future__ import annotations

import json
from pathlib import Path

from loguru import logger

from horde_worker.models.download import DownloadTask, download_all

SNAPSHOT = Path(__file__).parent / "data" / "clip.json"


class SafetyWeightsMissing(RuntimeError):
    """No CLIP weights for the safety check: the worker cannot serve."""


def reference_clip_task(cache_home: Path) -> DownloadTask:
    """Where the reference's ViT-L/14 goes and how it is fetched."""
    entry = json.loads(SNAPSHOT.read_text())["ViT-L/14"]
    download = entry["config"]["download"][0]
    sha = {f["path"]: f.get("sha256sum") for f in entry["config"]["files"]}.get(download["file_name"])
    return DownloadTask(download["file_url"], Path(cache_home) / "clip" / download["file_name"], sha)


def prepare_safety(safety_model: str, cache_home: str, show_progress: bool = True, mirror: str = "") -> Path:
    """The CLIP weights the safety process loads, downloaded (sha256-checked) when missing. Offline, this
    fails within seconds with an error that says where to put the file by hand."""
    if safety_model:
        path = Path(safety_model)
        if not path.exists():
            raise SafetyWeightsMissing(f"safety_model: {path} does not exist; remove the key to use the horde's CLIP")
        return path
    task = reference_clip_task(Path(cache_home))
    if not task.dest.exists():
        logger.info("downloading the safety checker's CLIP model (ViT-L/14, 890 MB)")
        errors = download_all([task], show_progress=show_progress, mirror=mirror)
        if errors or not task.dest.exists():
            raise SafetyWeightsMissing("the safety checker's CLIP model could not be downloaded: "
                                       f"{'; '.join(errors) or 'unknown error'}. Every image must be checked before "
                                       "it is submitted, so the worker cannot start without it (or set "
                                       "safety_model to a copy of the file elsewhere).")
    return task.dest
