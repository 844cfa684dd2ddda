"""The horde's post-processors: which this worker has, where their weights go, fetching them.

Weights named by the horde's reference (`esrgan.json`, `gfpgan.json`, `codeformer.json`, shipped
snapshots) are downloaded into `cache_home/` with the verified, resumable downloader and their
sha256; background removal uses rembg's U^2-Net, checked by the md5 rembg publishes. The horde
also sends eight names the reference has no file for (GFPGANv1.3, RestoreFormer and six newer
upscalers): the worker runs them when their weights are placed by hand under `cache_home`
(spandrel recognises the architectures), and otherwise delivers the image without that step and
says so in gen_metadata.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from horde_worker.models.download import DownloadTask

DATA = Path(__file__).parent / "data"

FACE_FIXERS = ("GFPGAN", "GFPGANv1.3", "RestoreFormer", "CodeFormers")
UPSCALERS = (
    "RealESRGAN_x4plus", "RealESRGAN_x2plus", "RealESRGAN_x4plus_anime_6B", "NMKD_Siax", "4x_AnimeSharp",
    "4xNomos8kSC", "4xLSDIRplus", "4xNomosWebPhoto_RealPLKSR", "4xNomos2_realplksr_dysample", "4xNomos2_hq_dat2",
    "2xModernSpanimationV1",
)
STRIP_BACKGROUND = "strip_background"
# Every post-processor a horde job can name.
HORDE_POSTPROCESSORS = (*FACE_FIXERS, *UPSCALERS, STRIP_BACKGROUND)

# The face detector and face parser every face fixer runs around its restorer (listed in gfpgan.json).
FACE_HELPER_FILES = ("detection_Resnet50_Final.pth", "parsing_parsenet.pth")
FACE_DIR = "gfpgan"
# Where a name's weights live when the reference gives no file for it: placed there by hand.
BY_HAND = {
    "GFPGANv1.3": ("gfpgan", ("GFPGANv1.3.pth",)),
    "RestoreFormer": ("gfpgan", ("RestoreFormer.pth",)),
    **{name: ("esrgan", (f"{name}.pth", f"{name}.safetensors")) for name in UPSCALERS[5:]},
}
REFERENCE_FOLDERS = {"esrgan.json": "esrgan", "gfpgan.json": FACE_DIR, "codeformer.json": "codeformer"}
# rembg's general-purpose U^2-Net and the md5 rembg itself checks it against.
U2NET = DownloadTask("https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2net.onnx",
                     Path("rembg") / "u2net.onnx", None, md5="60024c5c889badc19c04ad937298a77b")


def kind_of(name: str) -> str:
    """"facefixer", "upscaler" or "background"."""
    if name in FACE_FIXERS:
        return "facefixer"
    return "background" if name == STRIP_BACKGROUND else "upscaler"


@dataclass(frozen=True)
class ReferenceFile:
    """One file a reference entry needs."""

    name: str  # the post-processor it belongs to
    relative: Path  # under cache_home
    url: str
    sha256: str | None


def reference_files() -> list[ReferenceFile]:
    """The files of the reference's post-processors that this worker uses."""
    found = []
    for file_name, folder in REFERENCE_FOLDERS.items():
        for name, entry in json.loads((DATA / file_name).read_text()).items():
            if name not in HORDE_POSTPROCESSORS:
                continue
            config = entry.get("config", {})
            hashes = {f.get("path"): f.get("sha256sum") for f in config.get("files", [])}
            downloads = config.get("download", [])
            if name in FACE_FIXERS:  # the restorer, then the shared helpers; not the other detectors
                wanted = [downloads[0]] + [d for d in downloads if d["file_name"] in FACE_HELPER_FILES]
            else:
                wanted = downloads[:1]
            for download in wanted:
                stored_as = hashes_key(download, hashes)
                found.append(ReferenceFile(name, Path(folder) / stored_as, download["file_url"], hashes.get(stored_as)))
    return found


@functools.cache
def downloadable_names() -> frozenset[str]:
    """Post-processors whose weights the worker can fetch itself (asked on every pop: read once)."""
    return frozenset({f.name for f in reference_files()} | {STRIP_BACKGROUND})


def hashes_key(download: dict, hashes: dict[str, str | None]) -> str:
    """The file name a download is stored under: its name in `files` (CodeFormers.pth, not codeformer.pth)."""
    name = download["file_name"]
    if name in hashes or len(hashes) != 1:
        return name
    return next(iter(hashes))


@dataclass
class PostProcessSetup:
    """Post-processor name -> weights on disk, and where the face fixers' detector and parser are."""

    files: dict[str, Path] = field(default_factory=dict)
    face_dir: Path | None = None  # the detector and parser, when both are here

    def has(self, name: str) -> bool:
        if name in FACE_FIXERS:
            return name in self.files and self.face_dir is not None
        return name in self.files

    @property
    def offered(self) -> bool:
        """Everything the worker can fetch is here (a face fixer counts only with the detector and parser):
        only then is post-processing offered to the horde."""
        return all(self.has(name) for name in downloadable_names())

    def steps(self, names: list[str]) -> list[tuple[str, str]]:
        """(name, weights path or "" when not on this worker) in the job's order."""
        return [(name, str(self.files[name]) if self.has(name) else "") for name in names]


def plan_postprocessors(cache_home: Path) -> tuple[PostProcessSetup, list[DownloadTask]]:
    """Post-processor weights present, and those to fetch."""
    cache_home = Path(cache_home)
    setup, tasks = PostProcessSetup(), []
    for item in reference_files():
        path = cache_home / item.relative
        if not path.exists():
            tasks.append(DownloadTask(item.url, path, item.sha256))
        elif item.relative.name not in FACE_HELPER_FILES:
            setup.files[item.name] = path
    face_dir = cache_home / FACE_DIR
    if all((face_dir / name).exists() for name in FACE_HELPER_FILES):
        setup.face_dir = face_dir
    for name, (folder, candidates) in BY_HAND.items():
        for candidate in candidates:
            if (cache_home / folder / candidate).exists():
                setup.files[name] = cache_home / folder / candidate
                break
    u2net = cache_home / U2NET.dest
    if u2net.exists():
        setup.files[STRIP_BACKGROUND] = u2net
    else:
        tasks.append(replace(U2NET, dest=u2net))
    return setup, tasks
