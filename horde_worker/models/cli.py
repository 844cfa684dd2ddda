"""`download-models`: fetch (or with --dry-run, list) the models bridgeData.yaml asks for."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from loguru import logger

from horde_worker.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    """Resolve models_to_load and download what is missing; exit 0 when every model is present."""
    parser = argparse.ArgumentParser(prog="download-models", description=__doc__)
    parser.add_argument("-c", "--config", default="bridgeData.yaml", help="settings file (default bridgeData.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="list models, sizes and disk space needed; fetch nothing")
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level="INFO", format="{level: <7} {message}", diagnose=False)
    path = Path(args.config)
    try:
        settings = load_config(path if path.exists() else None).data
    except ConfigError as exc:
        logger.error(str(exc))
        return 2
    from horde_worker.models.setup import plan_for, prepare_models

    if args.dry_run:
        plan, reference = plan_for(settings)
        for notice in plan.notices:
            logger.warning(notice)
        print(f"model reference: {reference.source}")
        print(f"{'model':<48} {'size':>9}  status")
        for model in plan.ready:
            print(f"{model.name:<48} {model.path.stat().st_size / 1e9:>7.2f}GB  present ({model.path})")
        for entry, task in plan.to_download:
            print(f"{entry.name:<48} {(task.size or 0) / 1e9:>7.2f}GB  to download -> {task.dest}")
        if settings.allow_post_processing:
            from horde_worker.models.postprocessors import plan_postprocessors

            _, tasks = plan_postprocessors(Path(settings.cache_home))
            for task in tasks:
                print(f"{'post-processing: ' + task.dest.name:<48} {'?':>9}    to download -> {task.dest}")
        folder = Path(settings.cache_home)
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        print(f"disk space still needed: {plan.bytes_to_download / 1e9:.2f} GB (free in {folder}: {free / 1e9:.1f} GB)")
        return 0
    catalog, notices = prepare_models(settings)
    for notice in notices:
        logger.warning(notice)
    logger.info("{} model(s) ready: {}", len(catalog), ", ".join(catalog.names()))
    return 0 if not notices else 1


if __name__ == "__main__":
    raise SystemExit(main())
