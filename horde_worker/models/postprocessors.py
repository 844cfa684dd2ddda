"""The horde's post-processors: which this worker has, where their weights go, fetching them.

Upscaler weights come from the horde's `esrgan.json` reference (shipped snapshot), downloaded
into `cache_home/esrgan/` with the verified, resumable downloader and sha256. Face fixers and
background removal are not built yet, so the worker tells the real horde it does no
post-processing (`allow_post_processing: false`) until every horde post-processor is here:
the horde would otherwise send jobs this worker can only fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from horde_worker.models.download import DownloadTask

SNAPSHOT = Path(__file__).parent / "data" / "esrgan.json"
# Every post-processor a horde job can name.
HORDE_POSTPROCESSORS = (
    "GFPGAN", "GFPGANv1.3", "RestoreFormer", "CodeFormers", "RealESRGAN_x4plus", "RealESRGAN_x2plus",
    "RealESRGAN_x4plus_anime_6B", "NMKD_Siax", "4x_AnimeSharp", "4xNomos8kSC", "4xLSDIRplus",
    "4xNomosWebPhoto_RealPLKSR", "4xNomos2_realplksr_dysample", "4xNomos2_hq_dat2", "2xModernSpanimationV1",
    "strip_background",
)


# What this worker can run so far: the upscalers. Face fixers and strip_background are not built.
IMPLEMENTED = frozenset({"RealESRGAN_x4plus", "RealESRGAN_x2plus", "RealESRGAN_x4plus_anime_6B", "NMKD_Siax",
                         "4x_AnimeSharp", "4xNomos8kSC", "4xLSDIRplus", "4xNomosWebPhoto_RealPLKSR",
                         "4xNomos2_realplksr_dysample", "4xNomos2_hq_dat2", "2xModernSpanimationV1"})


def all_postprocessors_implemented() -> bool:
    return set(HORDE_POSTPROCESSORS) <= IMPLEMENTED


@dataclass(frozen=True)
class PostProcessorFile:
    """The weights of one upscaler in the reference."""

    name: str
    file_name: str
    url: str
    sha256: str | None


def reference_upscalers(data: dict | None = None) -> list[PostProcessorFile]:
    """The upscalers of the reference that are horde post-processor names."""
    data = data if data is not None else json.loads(SNAPSHOT.read_text())
    found = []
    for name, entry in data.items():
        if name not in HORDE_POSTPROCESSORS:
            continue
        hashes = {f.get("path"): f.get("sha256sum") for f in entry.get("config", {}).get("files", [])}
        for download in entry.get("config", {}).get("download", [])[:1]:
            found.append(PostProcessorFile(name, download["file_name"], download["file_url"],
                                           hashes.get(download["file_name"])))
    return found


@dataclass
class PostProcessSetup:
    """Post-processor name -> weights on disk."""

    files: dict[str, Path] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every horde post-processor is here: only then is post-processing offered to the horde."""
        return all(name in self.files for name in HORDE_POSTPROCESSORS)

    def refusal(self, names: list[str]) -> str | None:
        missing = [name for name in names if name not in self.files]
        return f"post-processors not available on this worker: {', '.join(missing)}" if missing else None


def plan_postprocessors(cache_home: Path) -> tuple[PostProcessSetup, list[DownloadTask]]:
    """Upscaler weights present, and those to fetch."""
    folder = Path(cache_home) / "esrgan"
    setup, tasks = PostProcessSetup(), []
    for upscaler in reference_upscalers():
        path = folder / upscaler.file_name
        if path.exists():
            setup.files[upscaler.name] = path
        else:
            tasks.append(DownloadTask(upscaler.url, path, upscaler.sha256))
    return setup, tasks
