"""What a job fetches can fail in any way without taking the job down: cut transfers, garbage,
pixel bombs, odd types, forbidden schemes and addresses, broken CivitAI answers. Each failure
becomes the gen_metadata the horde expects and the job goes on without that input."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import time
import zlib

import numpy as np
import pytest
import requests
from PIL import Image

from horde_worker.horde import urls
from horde_worker.horde.client import HordeClient, HordeUnreachable, RetryPolicy
from horde_worker.horde.wire import ExtraSourceImage, JobPayload, PopResponse
from horde_worker.localhorde.civitai import CivitaiModel, LocalCivitai
from horde_worker.models.civitai import AdapterCache
from horde_worker.supervisor import inputs
from horde_worker.supervisor.inputs import AdapterCaches, fetch_adapters, fetch_inputs
from tests.fileserver import FileServer


def webp(size: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype="uint8")).save(out, format="WEBP", lossless=True)
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` and holds almost nothing: a pixel bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def notes_of(result) -> list[tuple[str, str]]:
    return [(n.type.value, n.value.value) for n in result.notes]


@pytest.fixture
def server():
    with FileServer() as files:
        yield files


@pytest.fixture
def client(server):
    return HordeClient(server.url, "0000000000", timeout=5, sleep=lambda s: None)


@pytest.fixture
def connects(monkeypatch):
    """Every address a socket of this process tries to connect to."""
    seen: list[str] = []
    original = socket.socket.connect

    def recording(sock, address):
        seen.append(address[0] if isinstance(address, tuple) else str(address))
        return original(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording)
    return seen


# --- transfers that break ---------------------------------------------------------------------

def test_a_transfer_cut_mid_body_becomes_download_failed(server, client):
    good = webp()
    server.files["/good.webp"] = good
    server.files["/cut.webp"] = webp(256, seed=1)
    server.cut_always["/cut.webp"] = 1000
    pop = PopResponse(id="j", ids=["j"], source_image=f"{server.url}/good.webp", source_mask=f"{server.url}/cut.webp",
                      extra_source_images=[ExtraSourceImage(image=f"{server.url}/cut.webp", strength=0.3),
                                           ExtraSourceImage(image=f"{server.url}/good.webp", strength=0.5)])
    result = fetch_inputs(client, pop)
    assert result.source_image == good and result.source_mask is None
    assert result.extra_images == [(good, 0.5)]
    assert notes_of(result) == [("source_mask", "download_failed"), ("extra_source_images", "download_failed")]
    assert sum(1 for path, _ in server.requests if path == "/cut.webp") >= 2  # a cut transfer is tried again


@pytest.mark.parametrize("error", [requests.exceptions.ChunkedEncodingError("cut"), requests.ConnectionError("reset"),
                                   RuntimeError("odd"), MemoryError(), OSError("disk"),
                                   UnicodeDecodeError("utf-8", b"", 0, 1, "x")])
def test_any_error_of_a_download_becomes_download_failed(client, monkeypatch, error):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(client, "download", failing)
    result = fetch_inputs(client, PopResponse(id="j", ids=["j"], source_image="http://127.0.0.1:9/x.webp"))
    assert result.source_image is None and notes_of(result) == [("source_image", "download_failed")]


def test_a_body_over_the_cap_is_refused(server, client, monkeypatch):
    monkeypatch.setattr(inputs, "MAX_SOURCE_BYTES", 2000)
    server.files["/big.webp"] = webp(256)
    result = fetch_inputs(client, PopResponse(id="j", ids=["j"], source_image=f"{server.url}/big.webp"))
    assert notes_of(result) == [("source_image", "download_failed")]


def test_a_trickling_body_is_given_up_at_the_time_limit(server, client):
    server.files["/slow.webp"] = webp(256)
    server.trickle["/slow.webp"] = (200, 0.02)  # about a minute for the whole body
    started = time.monotonic()
    with pytest.raises(HordeUnreachable, match="time limit"):
        client.download(f"{server.url}/slow.webp", 1 << 20, RetryPolicy(attempts=1), max_seconds=0.5)
    assert time.monotonic() - started < 3


# --- what the bytes turn out to be ------------------------------------------------------------

def truncated_png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (128, 128, 3), dtype="uint8")).save(out, format="PNG")
    return out.getvalue()[: len(out.getvalue()) // 2]


def ppm() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PPM")
    return out.getvalue()


BAD_IMAGES = {
    "garbage": b"this is not an image at all",
    "bomb_100000": png_header(100_000, 100_000),  # Pillow's own DecompressionBombError
    "bomb_5000": png_header(5000, 5000),  # under Pillow's limit, over the worker's
    "truncated": truncated_png(),
    "not_an_allowed_format": ppm(),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_garbage_bombs_and_truncated_images_are_parse_failed(client, name):
    pop = PopResponse(id="j", ids=["j"], source_image=b64(BAD_IMAGES[name]))
    result = fetch_inputs(client, pop)
    assert result.source_image is None and notes_of(result) == [("source_image", "parse_failed")]


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillows_bomb_warning_as_an_error_is_parse_failed(server, client):
    server.files["/bomb.png"] = png_header(10_000, 10_000)  # over Pillow's warning line, under its error line
    pop = PopResponse(id="j", ids=["j"], source_image=f"{server.url}/bomb.png", extra_source_images=[
        ExtraSourceImage(image=b64(png_header(10_000, 10_000)))])
    result = fetch_inputs(client, pop)
    assert notes_of(result) == [("source_image", "parse_failed"), ("extra_source_images", "parse_failed")]


def test_odd_types_anywhere_in_the_pop_never_raise(client):
    good = webp()
    pop = PopResponse.model_construct(
        id="j", ids=["j"], payload=JobPayload(), source_image=12345, source_mask=None,
        extra_source_images=["not an entry", ExtraSourceImage.model_construct(image=None, strength=1.0),
                             ExtraSourceImage.model_construct(image=b64(good), strength="strong"),
                             ExtraSourceImage.model_construct(image=b64(good), strength=0.25)])
    result = fetch_inputs(client, pop)
    assert result.source_image is None and result.extra_images == [(good, 0.25)]
    assert notes_of(result) == [("source_image", "parse_failed")] + [("extra_source_images", "parse_failed")] * 3
    broken = PopResponse.model_construct(id="j", ids=["j"], payload=JobPayload(), source_image=b64(good),
                                         source_mask=b64(good), extra_source_images=42)
    result = fetch_inputs(client, broken)
    assert result.source_image == good and result.source_mask == good
    assert notes_of(result) == [("extra_source_images", "parse_failed")]


def test_good_sources_by_base64_data_uri_and_url(server, client):
    good = webp()
    server.files["/s.webp"] = good
    pop = PopResponse(id="j", ids=["j"], source_image=f"{server.url}/s.webp", source_mask=b64(good),
                      extra_source_images=[ExtraSourceImage(image=f"data:image/webp;base64,{b64(good)}", strength=0.7)])
    result = fetch_inputs(client, pop, allow_unsafe_ip=True)
    assert (result.source_image, result.source_mask, result.extra_images, result.notes) == (good, good, [(good, 0.7)], [])


# --- what may be fetched at all ---------------------------------------------------------------

def test_only_http_urls_are_fetched(server, client, monkeypatch):
    sent: list[str] = []
    real = requests.Session.request
    monkeypatch.setattr(requests.Session, "request", lambda self, method, url, **kw: sent.append(url) or real(
        self, method, url, **kw))
    port = server.httpd.server_address[1]
    for reference in ("file:///etc/passwd", f"ftp://127.0.0.1:{port}/s.webp", f"gopher://127.0.0.1:{port}/_GET",
                      "data:text/plain;base64,aGVsbG8=", "data:image/webp,notbase64", "javascript:alert(1)",
                      f"http://127.0.0.1:{port}:99/s.webp", "http:///nohost.webp"):
        result = fetch_inputs(client, PopResponse(id="j", ids=["j"], source_image=reference))
        assert result.source_image is None and notes_of(result) == [("source_image", "parse_failed")], reference
    assert sent == [] and server.requests == []


def test_loopback_sources_are_fetched_only_while_unsafe_ips_are_allowed(server, client, connects):
    good = webp()
    server.files["/s.webp"] = good
    pop = PopResponse(id="j", ids=["j"], source_image=f"{server.url}/s.webp")
    assert fetch_inputs(client, pop, allow_unsafe_ip=True).source_image == good
    assert len(server.requests) == 1
    connects.clear()
    refused = fetch_inputs(client, pop, allow_unsafe_ip=False)
    assert refused.source_image is None and notes_of(refused) == [("source_image", "download_failed")]
    assert len(server.requests) == 1 and connects == []


NAMES = {"metadata.internal": "169.254.169.254", "printer.lan": "192.168.1.20", "nas.lan": "fd00::5",
         "multi.lan": "224.0.0.251", "public.example": "93.184.215.14",
         "r2.example": "104.18.2.3"}


@pytest.fixture
def fake_dns(monkeypatch):
    real = socket.getaddrinfo

    def lookup(host, port, *args, **kwargs):
        if host in NAMES:
            family = socket.AF_INET6 if ":" in NAMES[host] else socket.AF_INET
            return [(family, socket.SOCK_STREAM, 6, "", (NAMES[host], port or 80))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://metadata.internal/latest/",
                                 "http://printer.lan/scan.png", "https://nas.lan/a.webp", "http://multi.lan/x",
                                 "http://[fe80::1]/x", "http://[::ffff:10.0.0.1]/x", "http://0.0.0.0:8080/x",
                                 "http://10.1.2.3/x", "http://100.64.0.1/x", "http://localhost:1/x"])
def test_private_addresses_are_refused_before_any_connection(client, connects, fake_dns, url):
    result = fetch_inputs(client, PopResponse(id="j", ids=["j"], source_image=url), allow_unsafe_ip=False)
    assert result.source_image is None and notes_of(result) == [("source_image", "download_failed")]
    assert connects == []


def test_each_redirect_hop_is_checked(server, client, connects, monkeypatch):
    good = webp()
    server.files["/s.webp"] = good
    server.redirects.update({"/a": "/b", "/b": f"{server.url}/s.webp", "/loop": "/loop",
                             "/to-file": "file:///etc/passwd", "/to-metadata": "http://169.254.169.254/latest/"})
    ok = fetch_inputs(client, PopResponse(id="j", ids=["j"], source_image=f"{server.url}/a"), allow_unsafe_ip=True)
    assert ok.source_image == good and [p for p, _ in server.requests] == ["/a", "/b", "/s.webp"]
    for path in ("/loop", "/to-file"):
        server.requests.clear()
        result = fetch_inputs(client, PopResponse(id="j", ids=["j"], source_image=f"{server.url}{path}"))
        assert notes_of(result) == [("source_image", "download_failed")], path
        assert len(server.requests) <= 6, path  # a loop ends after a few hops, and is not retried
    # Only 127.0.0.1 is treated as public here, so that the first hop to the file server is allowed
    # and the check of the redirect's target is what refuses it.
    classify = urls.address_refusal
    monkeypatch.setattr(urls, "address_refusal",
                        lambda ip, allow_private=False: None if str(ip) == "127.0.0.1" else classify(ip, allow_private))
    server.requests.clear()
    result = fetch_inputs(client, PopResponse(id="j", ids=["j"], source_image=f"{server.url}/to-metadata"),
                          allow_unsafe_ip=False)
    assert notes_of(result) == [("source_image", "download_failed")]
    assert server.requests == [("/to-metadata", None)]  # the first hop was fetched, the second never connected
    assert "169.254.169.254" not in connects


@pytest.mark.parametrize(("url", "refused"), [
    ("https://r2.example/a.webp?X-Amz-Signature=1", False), ("http://public.example:8080/x", False),
    ("http://[2606:4700::1]/x", False), ("http://8.8.8.8/x", False),
    ("http://127.0.0.1/x", True), ("http://[::1]/x", True), ("http://169.254.169.254/x", True),
    ("http://172.16.0.1/x", True), ("http://[fc00::1]/x", True), ("http://[ff02::1]/x", True),
    ("http://240.0.0.1/x", True), ("http://255.255.255.255/x", True), ("http://[::]/x", True),
    ("http://[2002:c0a8:0101::1]/x", True), ("http://[64:ff9b::a00:1]/x", True), ("http://nas.lan/x", True),
    ("http://unknown.invalid/x", True), ("ftp://8.8.8.8/x", True), ("file:///etc/passwd", True),
    ("http://8.8.8.8:notaport/x", True), ("https:///x", True),
])
def test_refuse_reason(fake_dns, url, refused):
    assert (urls.refuse_reason(url, allow_private=False) is not None) is refused
    scheme_or_form = url.startswith(("ftp:", "file:")) or ":notaport" in url or url == "https:///x"
    # Link-local (cloud metadata), multicast, unspecified and unresolvable hosts are refused whatever the owner allows.
    never = any(host in url for host in ("169.254.169.254", "[ff02::1]", "[::]", "unknown.invalid"))
    assert (urls.refuse_reason(url, allow_private=True) is not None) is (scheme_or_form or never)


# --- LoRAs and TIs ----------------------------------------------------------------------------

class QuirkyCivitai(LocalCivitai):
    """CivitAI with a few broken answers, by model id."""

    def answer(self, path, query):
        status, body = super().answer(path, query)
        quirk = path.rstrip("/").rsplit("/", 1)[-1]
        if quirk == "201":  # no downloadUrl anywhere
            for version in body["modelVersions"]:
                version.pop("downloadUrl")
                for file in version["files"]:
                    file.pop("downloadUrl")
        elif quirk == "202":
            body["modelVersions"][0]["files"] = [5, "x"]
        elif quirk == "203":
            body = ["a", "list"]
        elif quirk == "204":
            body["modelVersions"][0]["id"] = "abc"
        elif quirk == "205":
            status, body = 500, {"error": "down"}
        elif quirk == "206":
            body["modelVersions"][0]["files"][0]["downloadUrl"] = "file:///etc/passwd"
        return status, body


def model(model_id: int, name: str, kind: str = "LORA", **extra) -> CivitaiModel:
    return CivitaiModel(model_id=model_id, version_id=model_id * 10, name=name, kind=kind, base_model="SD 1.5",
                        data=os.urandom(3000 + model_id), **extra)


@pytest.fixture
def civitai():
    server = QuirkyCivitai([model(101, "Good"), model(104, "Good TI", kind="TextualInversion"),
                            *(model(i, f"Broken {i}") for i in range(201, 207))]).start()
    yield server
    server.stop()


def caches_for(civitai, folder) -> AdapterCaches:
    return AdapterCaches(loras=AdapterCache("lora", folder / "lora", 1 << 30, api_url=civitai.url, timeout=5),
                         tis=AdapterCache("ti", folder / "ti", 1 << 30, api_url=civitai.url, timeout=5))


def adapter_pop(loras: list[dict], tis: list[dict] | None = None) -> PopResponse:
    return PopResponse(id="j", ids=["j"], payload={"loras": loras, "tis": tis or []})


def test_one_broken_adapter_never_stops_the_job(civitai, tmp_path):
    names = ["201", "202", "203", "204", "205", "206", "101"]
    notes: list = []
    loras, tis = fetch_adapters(caches_for(civitai, tmp_path), adapter_pop([{"name": n} for n in names], [
        {"name": "104"}, {"name": "205"}]), "stable_diffusion_1", notes, allow_lora=True)
    assert [lora.name for lora in loras] == ["101"] and [ti.name for ti in tis] == ["104"]
    assert [(n.type.value, n.value.value, n.ref) for n in notes] == (
        [("lora", "download_failed", n) for n in names[:-1]] + [("ti", "download_failed", "205")])


def test_any_error_of_the_cache_is_a_note(civitai, tmp_path, monkeypatch):
    caches = caches_for(civitai, tmp_path)
    monkeypatch.setattr(caches.loras, "fetch", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("odd")))
    notes: list = []
    loras, tis = fetch_adapters(caches, adapter_pop([{"name": "101"}], [{"name": "104"}]), "stable_diffusion_1",
                                notes)
    assert loras == [] and [ti.name for ti in tis] == ["104"]
    assert [(n.type.value, n.value.value) for n in notes] == [("lora", "download_failed")]


def test_without_allow_lora_civitai_is_never_contacted(civitai, tmp_path):
    notes: list = []
    loras, tis = fetch_adapters(caches_for(civitai, tmp_path), adapter_pop([{"name": "101"}], [{"name": "104"}]),
                                "stable_diffusion_1", notes, allow_lora=False)
    assert (loras, tis) == ([], [])
    assert [(n.type.value, n.value.value, n.ref) for n in notes] == [("lora", "download_failed", "101"),
                                                                     ("ti", "download_failed", "104")]
    assert civitai.requests == []


def files_under(folder) -> set:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_names_and_file_names_cannot_leave_the_cache_folder(civitai, tmp_path):
    for model_id, file_name in ((301, "../../../../escaped.safetensors"), (302, "/tmp/absolute-escape.safetensors"),
                                (303, "x.\\..\\..\\escaped"), (304, "nul\x00.safetensors"), (305, "..")):
        civitai.add(model(model_id, f"Odd {model_id}", file_name=file_name))
    work = tmp_path / "work"
    caches = caches_for(civitai, work)
    before = files_under(tmp_path)
    notes: list = []
    names = [{"name": "../../x"}, {"name": "/etc/passwd", "is_version": True}, {"name": "a\x00b"},
             {"name": "../../3010", "is_version": True}, *({"name": str(i)} for i in range(301, 306))]
    loras, _ = fetch_adapters(caches, adapter_pop(names), "stable_diffusion_1", notes)
    assert [lora.name for lora in loras] == [str(i) for i in range(301, 306)]
    for lora in loras:
        assert os.path.dirname(os.path.realpath(lora.path)) == os.path.realpath(work / "lora")
    assert [n.ref for n in notes] == ["../../x", "/etc/passwd", "a\x00b", "../../3010"]
    assert all(p.is_relative_to(work / "lora") for p in files_under(tmp_path) - before)
    assert not os.path.exists("/tmp/absolute-escape.safetensors")


def test_a_tampered_index_cannot_delete_files_outside_the_cache(civitai, tmp_path):
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(b"precious" * 1000)
    folder = tmp_path / "lora"
    folder.mkdir()
    entry = {"kind": "lora", "version_id": "../victim", "model_name": "x", "base_model": "SD 1.5",
             "trained_words": [], "file_name": "x.safetensors", "download_url": "http://127.0.0.1:9/x", "size": 8000,
             "sha256": None, "last_used": 0.0}
    (folder / "index.json").write_text(json.dumps({"versions": {"1": entry}, "refs": {}}))
    cache = AdapterCache("lora", folder, 4000, api_url=civitai.url, timeout=5)  # full: everything must go
    path, _ = cache.fetch("101")
    assert path.exists() and victim.read_bytes() == b"precious" * 1000
