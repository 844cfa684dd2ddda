"""The horde's ControlNet files and the annotators' weights: which exist, where they go, fetching them.

ControlNet files come from the horde's `controlnet.json` reference (shipped snapshot; SD1.5
files for every control type, SD2 files for some). Annotator weights come from their public
repositories. Both are downloaded at start when `allow_controlnet` is on, with the verified,
resumable downloader (annotator files have no published hash to check against).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from horde_worker.models.download import DownloadTask

SNAPSHOT = Path(__file__).parent / "data" / "controlnet.json"
CONTROL_TYPES = ("canny", "hed", "depth", "normal", "openpose", "seg", "scribble", "fakescribbles", "hough")

_ANNOTATORS_URL = "https://huggingface.co/lllyasviel/Annotators/resolve/main/"
# Files each annotator needs, as (path under the annotator folder, download URL).
ANNOTATOR_FILES: dict[str, list[tuple[str, str]]] = {
    "canny": [],
    "scribble": [],
    "hed": [("ControlNetHED.pth", _ANNOTATORS_URL + "ControlNetHED.pth")],
    "fakescribbles": [("ControlNetHED.pth", _ANNOTATORS_URL + "ControlNetHED.pth")],
    "hough": [("mlsd_large_512_fp32.pth", _ANNOTATORS_URL + "mlsd_large_512_fp32.pth")],
    "openpose": [(name, _ANNOTATORS_URL + name) for name in ("body_pose_model.pth", "hand_pose_model.pth",
                                                             "facenet.pth")],
    "depth": [(f"dpt-hybrid-midas/{name}", f"https://huggingface.co/Intel/dpt-hybrid-midas/resolve/main/{name}")
              for name in ("config.json", "model.safetensors")],
    "seg": [(f"upernet-convnext-small/{name}",
             f"https://huggingface.co/openmmlab/upernet-convnext-small/resolve/main/{name}")
            for name in ("config.json", "model.safetensors")],
}
ANNOTATOR_FILES["normal"] = ANNOTATOR_FILES["depth"]
CONTROL_BASELINES = ("stable_diffusion_1", "stable_diffusion_2")


def annotator_ready(control_type: str, folder: Path) -> bool:
    """True when every file the annotator needs is on disk."""
    return all((Path(folder) / name).exists() for name, _ in ANNOTATOR_FILES[control_type])


@dataclass(frozen=True)
class ControlFile:
    """The ControlNet file of one control type for one baseline."""

    control_type: str
    baseline: str
    file_name: str
    url: str
    sha256: str | None


def reference_files(data: dict | None = None) -> list[ControlFile]:
    """Every (control type, baseline) the reference has a ControlNet file for."""
    data = data if data is not None else json.loads(SNAPSHOT.read_text())
    files = []
    for name, entry in data.items():
        control_type = str(entry.get("type", "")).removeprefix("control_")
        if control_type not in CONTROL_TYPES:
            continue
        baseline = "stable_diffusion_2" if name.endswith("_sd2") else "stable_diffusion_1"
        for download in entry.get("config", {}).get("download", []):
            file_name = download["file_name"]
            hashes = {f.get("path"): f.get("sha256sum") for f in entry["config"].get("files", [])}
            files.append(ControlFile(control_type, baseline, file_name, download["file_url"], hashes.get(file_name)))
    return files


@dataclass
class ControlSetup:
    """What ControlNet work this worker can take: file per (type, baseline), the annotator folder."""

    folder: Path | None = None
    files: dict[tuple[str, str], Path] = field(default_factory=dict)

    @property
    def annotator_dir(self) -> Path | None:
        return self.folder / "annotators" if self.folder else None

    @property
    def available(self) -> bool:
        return bool(self.files)

    def refusal(self, control_type: str, baseline: str, image_is_control: bool) -> str | None:
        """Why a job of this control type cannot run here, or None."""
        if control_type not in CONTROL_TYPES:
            return f"control type {control_type!r} is unknown"
        if (control_type, baseline) not in self.files:
            return f"no {control_type} ControlNet for {baseline} models on this worker"
        if not image_is_control and not annotator_ready(control_type, self.annotator_dir):
            return f"the {control_type} annotator's weights are missing"
        return None


def plan_control(cache_home: Path, baselines: set[str]) -> tuple[ControlSetup, list[DownloadTask]]:
    """Files present and files to fetch for the served baselines."""
    folder = Path(cache_home) / "controlnet"
    setup, tasks, seen = ControlSetup(folder), [], set()
    for control in reference_files():
        if control.baseline not in baselines:
            continue
        path = folder / control.file_name
        setup.files[(control.control_type, control.baseline)] = path
        if not path.exists() and path not in seen:
            seen.add(path)
            tasks.append(DownloadTask(control.url, path, control.sha256))
    for control_type in CONTROL_TYPES:
        for name, url in ANNOTATOR_FILES[control_type]:
            path = setup.annotator_dir / name
            if not path.exists() and path not in seen:
                seen.add(path)
                tasks.append(DownloadTask(url, path, None))
    return setup, tasks


def ready_setup(setup: ControlSetup) -> ControlSetup:
    """Only the ControlNet files that are really on disk."""
    return ControlSetup(setup.folder, {key: path for key, path in setup.files.items() if path.exists()})
