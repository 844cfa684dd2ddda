"""`horde-worker` / `python -m horde_worker`: read the settings, pick the horde, run the supervisor."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from loguru import logger

from horde_worker import BRIDGE_AGENT
from horde_worker.config import ConfigError, ConfigWatcher, load_config
from horde_worker.config.bridge_data import MODEL_KEYS, BridgeData
from horde_worker.inference.messages import SlotSpec

# The summary of the last supervisor run, printed as the very last line of output.
LAST_SUMMARY: list[str] = [""]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="horde-worker", description="Image worker for the AI Horde.")
    parser.add_argument("-c", "--config", default="bridgeData.yaml", help="settings file (default bridgeData.yaml)")
    parser.add_argument("-n", "--name", help="worker name; overrides dreamer_name")
    parser.add_argument("--local", action="store_true", help="serve an embedded local horde instead of the real one")
    parser.add_argument("--jobs", type=int, help="local mode: serve this many sample requests, then exit")
    parser.add_argument("--requests", type=Path, help="local mode: JSON list of /v2/generate/async bodies to serve")
    parser.add_argument("--out", type=Path, help="local mode: save the returned images and results.json here")
    parser.add_argument("--device", default=os.environ.get("HORDE_WORKER_DEVICE", "auto"),
                        help="auto (default), cpu, cuda, cuda:N or directml")
    parser.add_argument("--log-dir", type=Path, default=Path("logs"), help="where the logs go (default logs/)")
    parser.add_argument("--benchmark", action="store_true",
                        help="measure this machine (a few minutes) and print the settings it should run with")
    parser.add_argument("--write", action="store_true", help="with --benchmark: put them into the settings file")
    parser.add_argument("--benchmark-quick", action="store_true",
                        help="with --benchmark: a tiny model instead (checks that it runs; the figures mean nothing)")
    return parser.parse_args(argv)


def detect_devices(choice: str) -> list[str]:
    """Devices for the inference slots. Probed in a child process so this one never imports torch."""
    if choice not in ("auto", "cuda"):
        return [choice]
    probe = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
    try:
        count = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                                   check=True).stdout.strip() or 0)
    except (subprocess.SubprocessError, ValueError, OSError):
        count = 0
    if count == 0:
        if choice == "cuda":
            raise ConfigError("--device cuda: no CUDA GPU is visible to torch (run update-runtime.sh, check drivers)")
        return ["cpu"]
    return [f"cuda:{i}" for i in range(count)]


# RAM the safety checker's process holds (CLIP ViT-L/14 in float32, its activations, torch itself), set aside
# from the RAM budget before the inference processes share the rest.
SAFETY_PROCESS_RAM = 3 * 2**30


def slot_specs(devices: list[str], settings: BridgeData, log_dir: Path) -> list[SlotSpec]:
    """One inference process per device, its engine running up to max_threads jobs at once; the devices share
    the RAM budget (total RAM less ram_to_leave_free, less the safety checker's process)."""
    import psutil

    from horde_worker.config.bridge_data import parse_amount

    total_ram = psutil.virtual_memory().total
    ram_budget = max(0, total_ram - parse_amount(settings.ram_to_leave_free, total_ram) - SAFETY_PROCESS_RAM)
    keep_on_device, keep_in_ram = settings.memory_tier()
    return [SlotSpec(slot=index, device=device, log_dir=str(log_dir), ram_budget=ram_budget // len(devices),
                     post_process_overlap=settings.post_process_job_overlap,
                     vram_to_leave_free=settings.vram_to_leave_free, max_jobs=settings.max_threads,
                     compile_denoisers=settings.compile_denoisers, cache_home=settings.cache_home,
                     flux_fp8_matmuls=settings.flux_fp8_matmuls, keep_on_device=keep_on_device,
                     keep_in_ram=keep_in_ram)
            for index, device in enumerate(devices)]


def _console_sink():
    from rich.console import Console
    from rich.text import Text

    console = Console(stderr=True)
    if not console.is_terminal:  # a file or pipe: plain lines, never wrapped
        return console, sys.stderr

    def sink(message) -> None:
        console.print(Text.from_ansi(str(message)), end="")

    return console, sink


def run_advisor(args: argparse.Namespace, devices: list[str], config_path: Path) -> int:
    """--benchmark: measure, recommend, and with --write put the settings into the file."""
    from horde_worker.advisor.measure import measure
    from horde_worker.advisor.recommend import recommend, report
    from horde_worker.advisor.write import write_settings

    logger.info("measuring {} with SD1.5 at 512x512 (a few minutes)", ", ".join(devices))
    measurement = measure(devices, quick=args.benchmark_quick)
    advice = recommend(measurement)
    print(report(measurement, advice), flush=True)
    if args.write:
        existed = config_path.exists()
        try:
            changed = write_settings(config_path, advice.settings)
        except ValueError as exc:
            logger.error(str(exc))
            return 2
        logger.info("{}: {}{}", config_path, f"set {', '.join(changed)}" if changed else "already had these settings",
                    f" (the previous file is {config_path.name}.bak)" if existed else "")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = parse_args(argv)
    console, sink = _console_sink()
    from horde_worker.ui.logs import setup_logging

    setup_logging(args.log_dir, console=sink)
    config_path = Path(args.config)
    overrides = {"dreamer_name": args.name} if args.name else {}
    try:
        loaded = load_config(config_path if config_path.exists() else None, overrides)
    except ConfigError as exc:
        for line in str(exc).splitlines():
            logger.error(line)
        logger.error("fix the setting(s) above (see bridgeData_template.yaml for every key) and start again")
        return 2
    settings = loaded.data
    local = args.local or (not config_path.exists() and settings.is_anonymous)
    if (args.jobs or args.requests or args.out) and not local:
        logger.error("--jobs, --requests and --out only apply to local mode: add --local")
        return 2
    for notice in loaded.notices:
        logger.warning(notice)
    logger.info("{} starting", BRIDGE_AGENT)
    try:
        devices = detect_devices(args.device)
    except ConfigError as exc:
        logger.error(str(exc))
        return 2
    if args.benchmark:
        return run_advisor(args, devices, config_path)
    try:
        if local:
            from horde_worker.local_mode import run_local

            code = run_local(settings, args, devices, console)
        else:
            code = run_horde(loaded, overrides, args, devices, console)
    except KeyboardInterrupt:  # before the supervisor took over Ctrl+C: nothing was popped yet
        logger.warning("interrupted while starting; no job was taken")
        return 130
    if LAST_SUMMARY[0]:
        print(LAST_SUMMARY[0], flush=True)
    return code


def run_horde(loaded, overrides, args, devices: list[str], console) -> int:
    """Serve the horde at horde_url."""
    from horde_worker.horde.client import HordeClient
    from horde_worker.models.setup import prepare_models

    settings = loaded.data
    if settings.is_anonymous:
        logger.error("api_key: the anonymous key cannot run a worker. Register at https://aihorde.net/register "
                     "and put your key in bridgeData.yaml (api_key) or AIWORKER_API_KEY")
        return 2
    catalog, notices = prepare_models(settings, show_progress=console.is_terminal)
    for notice in notices:
        logger.warning(notice)
    if not len(catalog):
        logger.error("models_to_load: no model can be served (see the warnings above)")
        return 2
    logger.info("serving {} model(s): {}", len(catalog), ", ".join(catalog.names()))
    client = HordeClient(settings.horde_url, settings.api_key)
    watcher = ConfigWatcher(loaded, overrides)
    return run_supervisor(settings, client, catalog, devices, args, console, watcher=watcher)


def run_supervisor(settings: BridgeData, client, catalog, devices: list[str], args, console, *,
                   stop_condition=None, watcher: ConfigWatcher | None = None, pop_interval: float = 1.0) -> int:
    """Run the supervisor with Ctrl+C handling and the status line; returns the exit code."""
    from horde_worker.supervisor.loop import Supervisor
    from horde_worker.ui.status import StatusLine

    last_poll = [0.0]

    def poll_config() -> None:
        if watcher is None or time.monotonic() - last_poll[0] < 5:
            return
        last_poll[0] = time.monotonic()
        try:
            applied, restart = watcher.poll()
        except ConfigError as exc:
            logger.error("{} changed but is not valid; keeping the previous settings:\n{}", watcher.current.path, exc)
            return
        except Exception as exc:  # whatever reading it raised, the running worker keeps going
            logger.error("{} changed but could not be read ({}: {}); keeping the previous settings",
                         watcher.current.path, type(exc).__name__, exc)
            return
        for key, value in applied.items():
            logger.info("setting applied: {} = {!r}", key, "********" if "key" in key else value)
        for message in restart:
            logger.warning(message)
        if MODEL_KEYS & set(applied):
            threading.Thread(target=reload_models, name="model-reload", daemon=True).start()

    def reload_models() -> None:
        from horde_worker.models.setup import prepare_models

        try:
            new_catalog, notices = prepare_models(settings, show_progress=False)
        except Exception as exc:  # keep serving what we have
            logger.error("the new model list could not be prepared: {}", exc)
            return
        for notice in notices:
            logger.warning(notice)
        if not len(new_catalog):
            logger.error("models_to_load: the new list has no model that can be served; keeping the old one")
            return
        supervisor.replace_catalog_threadsafe(new_catalog)

    safety = start_safety(settings, devices, args.log_dir, console)
    if safety is None:
        return 2
    supervisor = Supervisor(settings, client, catalog, slot_specs(devices, settings, args.log_dir),
                            journal_dir(settings), stop_condition=stop_condition,
                            config_poll=poll_config, pop_interval=pop_interval, safety=safety)
    status = StatusLine(supervisor.status_text, every=settings.stats_output_frequency, console=console,
                        live=None if not settings.limited_console_messages else False, busy=supervisor.busy)
    supervisor.on_tick = status.tick
    interrupts = [0]

    def on_interrupt(*_args) -> None:
        interrupts[0] += 1
        if interrupts[0] == 1:
            supervisor.request_stop()
            return
        logger.warning("second Ctrl+C: quitting now")
        if supervisor.pool is not None:
            supervisor.pool.kill_all()
        safety.kill()
        os._exit(130)

    async def main_loop() -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_interrupt)
            except (NotImplementedError, RuntimeError):  # Windows
                signal.signal(sig, on_interrupt)
        return await supervisor.run()

    status.start()
    try:
        code = asyncio.run(main_loop())
    finally:
        status.stop()
        safety.stop()
    logger.info(supervisor.stats.summary())
    if supervisor.fatal:
        logger.error(supervisor.fatal)
    LAST_SUMMARY[0] = supervisor.stats.summary()
    return code


def start_safety(settings: BridgeData, devices: list[str], log_dir: str, console):
    """The safety process, started and ready; None (after saying why) when it cannot be."""
    from horde_worker.models.safety_files import SafetyWeightsMissing, prepare_safety
    from horde_worker.supervisor.safety_client import SafetyClient, SafetyUnavailable

    try:
        weights = prepare_safety(settings.safety_model, settings.cache_home, show_progress=console.is_terminal,
                                 mirror=settings.download_mirror)
    except SafetyWeightsMissing as exc:
        logger.error(str(exc))
        return None
    gpu = next((d for d in devices if d.startswith("cuda")), None)
    device = gpu if settings.safety_on_gpu and gpu else "cpu"
    client = SafetyClient(weights, device, str(log_dir))
    try:
        client.start()
    except SafetyUnavailable as exc:
        logger.error("the safety checker could not start: {}. The worker does not run without it.", exc)
        return None
    return client


def journal_dir(settings: BridgeData) -> Path:
    """Each worker name keeps its own journal, so workers may share one cache_home."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in settings.dreamer_name)
    return Path(settings.cache_home) / "journal" / safe


if __name__ == "__main__":
    raise SystemExit(main())
