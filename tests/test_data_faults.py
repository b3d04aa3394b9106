"""The data stage under faults: real kills at named points, and (further down) hostile servers and files."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import tiny_world_cfg, tiny_world_params, venv_env
from PIL import ExifTags, Image

from dinorankclip.config import resolve
from dinorankclip.data.decode import UnusableImage, upright_8_bit
from dinorankclip.data.download import build_shards
from dinorankclip.data.egress import AddressPolicy, Limits, egress_proxy
from dinorankclip.data.source import build_source
from dinorankclip.data.tsv import clean_caption_list
from dinorankclip.faults import KILL_ENV
from dinorankclip.io import atomic_dir, read_json, write_json

UMASK = 0o027  # group may read, others nothing: a shared cluster project folder


def data_stage(cwd: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`dinorankclip data` in `cwd` (its params.yaml), as Snakemake and DVC run it, optionally told to kill itself."""
    env = venv_env()
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "dinorankclip", "--params", "params.yaml", "data"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600, umask=UMASK)


def published(cwd: Path) -> dict:
    """What a data stage output holds: its counts, index, manifest, the bytes of every shard, and every mode."""
    out = cwd / "results" / "demo" / "data"
    return {"stats": read_json(out / "stats.json"), "index": read_json(out / "shards.json"),
            "downloads": (out / "downloads.tsv").read_text(),
            "shards": {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))},
            "modes": {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in [out, *out.rglob("*")]}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A study folder with the tiny world's source stage done, and the output of an uninterrupted data stage."""
    params = tiny_world_params()
    clean = tmp_path_factory.mktemp("uninterrupted")
    (clean / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (clean / "results" / "demo" / "source").mkdir(parents=True)
    build_source(resolve(params, "demo"), clean / "results" / "demo" / "source")
    fresh = tmp_path_factory.mktemp("fresh")
    shutil.copytree(clean, fresh, dirs_exist_ok=True)  # the same world (same URLs) before any data stage ran
    done = data_stage(clean)
    assert done.returncode == 0, done.stderr[-3000:]
    output = published(clean)
    # the modes the umask gives, so a group shares the output on a cluster filesystem (not tempfile's 0600/0700)
    assert {p: mode for p, mode in output["modes"].items() if mode != (0o750 if p in (".", "shards") else 0o640)} == {}
    return fresh, output


def test_a_kill_while_publishing_loses_nothing_and_the_rerun_equals_an_uninterrupted_run(reference):
    cwd, expected = reference
    results, staging = cwd / "results" / "demo", cwd / "results" / "demo" / "state" / "data"
    assert expected["stats"]["stored"] == 40 and len(expected["shards"]) == 3

    killed = data_stage(cwd, kill_at="data:publish")  # the output is complete but not yet renamed into place
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "kill point data:publish reached" in killed.stderr
    assert not (results / "data").exists()
    assert len(list((staging / "shards").glob("*.tar"))) == 3  # the staging still holds every shard
    assert len(list(results.glob(".data.tmp-*"))) == 1  # the unpublished output, hidden

    killed = data_stage(cwd, kill_at="data:published")  # renamed, but the staging is not yet removed
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert published(cwd) == expected and staging.exists()
    assert list(results.glob(".data.tmp-*")) == []  # the next attempt removed the killed one's leftovers

    rerun = data_stage(cwd)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert published(cwd) == expected
    assert not staging.exists()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(cfg, folder) of the tiny world downloaded in-process: folder/source, folder/staging, folder/data."""
    cfg, root = tiny_world_cfg(), tmp_path_factory.mktemp("built")
    for name in ("source", "data"):
        (root / name).mkdir()
    build_source(cfg, root / "source")
    build_shards(cfg, root / "source", root / "staging", root / "data")
    return cfg, root


def rebuild(built, tmp_path, damage) -> Path:
    """A copy of `built`'s staging, damaged by `damage(shard folder)`, built again into tmp_path/again."""
    cfg, root = built
    shutil.copytree(root / "staging", tmp_path / "staging")
    damage(tmp_path / "staging" / "shards")
    (tmp_path / "again").mkdir()
    build_shards(cfg, root / "source", tmp_path / "staging", tmp_path / "again")
    return tmp_path / "again"


def test_a_shard_recorded_as_done_without_its_tar_is_downloaded_again(built, tmp_path):
    """The fault behind a lost output: img2dataset's `<shard>_stats.json` survives, its tar does not. The stage
    must store the shard again, not count its images from the parquet file and publish an empty shard list."""
    _, root = built
    assert (root / "staging" / "shards" / "00001_stats.json").exists()
    again = rebuild(built, tmp_path, lambda shards: (shards / "00001.tar").unlink())
    assert read_json(again / "stats.json") == read_json(root / "data" / "stats.json")
    assert read_json(again / "shards.json") == read_json(root / "data" / "shards.json")
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        assert (again / "shards" / name).read_bytes() == (root / "data" / "shards" / name).read_bytes()


def test_a_shard_holding_samples_nobody_downloaded_is_not_published(built, tmp_path):
    def plant(shards):
        shard = shards / "00000.tar"
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar]
        shard.unlink()  # a new file: the published hard link keeps the old bytes
        first = members[0][0].name.split(".")[0]
        with tarfile.open(shard, "w") as tar:
            for m, payload in members:
                m.name = m.name.replace(first, "9999999") if m.name.startswith(f"{first}.") else m.name
                tar.addfile(m, io.BytesIO(payload))

    with pytest.raises(RuntimeError, match=r"00000.tar holds samples with no recorded download \(\['9999999'\]\)"):
        rebuild(built, tmp_path, plant)
    assert os.listdir(tmp_path / "again") == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_outputs_get_the_modes_the_umask_gives(tmp_path, umask):
    """tempfile's 0600/0700 made every published output unreadable to the group on a shared filesystem."""
    before = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "stage") as out:
            write_json(out / "stats.json", {"n": 1})
            (out / "shards").mkdir()
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "stage").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "stage" / "shards").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "stage" / "stats.json").stat().st_mode) == 0o666 & ~umask


def test_a_killed_writers_temporary_folders_are_removed_by_the_next_attempt(tmp_path):
    (tmp_path / ".stage.tmp-0a1b2c3d4e5f").mkdir()  # what a kill inside `atomic_dir` leaves
    (tmp_path / ".stage.tmp-0a1b2c3d4e5f" / "half.tar").write_bytes(b"x" * 100)
    (tmp_path / ".stage-other.tmp-0a1b2c3d4e5f").mkdir()  # another output's: not ours to remove
    with atomic_dir(tmp_path / "stage") as out:
        (out / "done").write_text("yes")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stage-other.tmp-0a1b2c3d4e5f", "stage"]


# --- hostile servers -------------------------------------------------------------------------------------------


class Web(ThreadingHTTPServer):
    """A local stand-in for the web: a page function per path, every request counted and timed."""

    daemon_threads = True

    def __init__(self, pages: dict):
        super().__init__(("127.0.0.1", 0), _Page)
        self.pages, self.hits, self.started = pages, Counter(), {}

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Page(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self):  # noqa: N802
        self.server.hits[self.path] += 1
        self.server.started[self.path] = time.monotonic()
        page = self.server.pages.get(self.path)
        with contextlib.suppress(OSError):  # a client that gives up mid-body
            page(self) if page else self.send_error(404)


@contextlib.contextmanager
def web(pages: dict):
    server = Web(pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def body(data: bytes):
    def page(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)
    return page


def redirect(location: str):
    def page(h):
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return page


def drip(size: int, every: float):
    """A body of `size` bytes, one byte every `every` seconds: each read is quick, the whole is not."""
    def page(h):
        h.send_response(200)
        h.send_header("Content-Length", str(size))
        h.end_headers()
        for _ in range(size):
            h.wfile.write(b"\xff")
            h.wfile.flush()
            time.sleep(every)
    return page


def endless(announced: int):
    """A response announcing `announced` bytes and streaming zeros for as long as the client reads."""
    def page(h):
        h.send_response(200)
        h.send_header("Content-Length", str(announced))
        h.end_headers()
        while True:
            h.wfile.write(bytes(1 << 16))
    return page


def picture(colour=(200, 40, 40), size=48, fmt="JPEG", mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), colour).save(buf, format=fmt, **save)
    return buf.getvalue()


def download(tmp_path: Path, rows: list[tuple[str, str]], allow: list[str], **data) -> tuple[dict, dict]:
    """The data stage (in-process) on a caption list of `rows` (caption, url): its stats, and {url: (status,
    error)} from its manifest."""
    cfg = tiny_world_cfg()
    cfg["source"] = {"kind": "cc3m", "tsv": "the rows below"}
    cfg["data"].update(allow=allow, retries=0, **data)
    source = tmp_path / "source"
    source.mkdir()
    (source / "raw.tsv").write_text("".join(f"{caption}\t{url}\n" for caption, url in rows))
    clean_caption_list(source / "raw.tsv", source / "train.tsv")
    (tmp_path / "data").mkdir()
    stats = build_shards(cfg, source, tmp_path / "staging", tmp_path / "data")
    table = pd.read_csv(tmp_path / "data" / "downloads.tsv", sep="\t", dtype=str, keep_default_na=False)
    return stats, {row.url: (row.status, row.error_message) for row in table.itertuples()}


def test_no_row_or_redirect_reaches_a_private_loopback_or_link_local_address(tmp_path):
    secret = picture((10, 200, 10))
    with web({"/secret.jpg": body(secret)}) as internal:
        port = internal.server_address[1]
        pages = {"/0.jpg": body(picture()), "/1.jpg": body(picture((40, 40, 200))),
                 "/to-metadata": redirect("http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
                 "/to-internal": redirect(f"http://127.0.0.1:{port}/secret.jpg"),
                 "/to-internal-by-name": redirect(f"http://localhost:{port}/secret.jpg"),
                 "/to-ftp": redirect(f"ftp://127.0.0.1:{port}/secret.jpg"),
                 "/to-file": redirect("file:///etc/hostname"),
                 "/loop": redirect("/loop"),
                 "/huge": endless(10**10)}
        with web(pages) as public:
            hostile = {
                "http://169.254.169.254/latest/meta-data/": "refused: 169.254.169.254 is link-local",
                f"http://127.0.0.1:{port}/secret.jpg": "refused: 127.0.0.1 is loopback",
                f"http://localhost:{port}/secret.jpg": "refused: localhost resolves to 127.0.0.1, which is loopback",
                f"http://2130706433:{port}/secret.jpg": "refused: 2130706433 resolves to 127.0.0.1",
                f"http://0.0.0.0:{port}/secret.jpg": "refused: 0.0.0.0 is unspecified",
                f"http://[::ffff:127.0.0.1]:{port}/secret.jpg": "refused: ::ffff:127.0.0.1 is",
                f"https://127.0.0.1:{port}/secret.jpg": "Tunnel connection failed: 403 refused: 127.0.0.1 is loopback",
                f"http://10.11.12.13:{port}/secret.jpg": "refused: 10.11.12.13 is private",
                f"{public.base}/to-metadata": "refused: 169.254.169.254 is link-local",
                f"{public.base}/to-internal": "refused: 127.0.0.1 is loopback",
                f"{public.base}/to-internal-by-name": "refused: localhost resolves to 127.0.0.1",
                f"{public.base}/to-ftp": "refused: ftp URL",
                f"{public.base}/to-file": "Redirection to url 'file:///etc/hostname' is not allowed",
                f"{public.base}/loop": "infinite loop",
                f"{public.base}/huge": "announces 10000000000 bytes, over data.max_bytes",
            }
            rows = [("a red square", f"{public.base}/0.jpg"), ("a blue square", f"{public.base}/1.jpg")]
            rows += [(f"hostile {i}", url) for i, url in enumerate(hostile)]
            stats, outcomes = download(tmp_path, rows, allow=[f"127.0.0.1:{public.server_address[1]}"])
    assert internal.hits == Counter()  # nothing, not even a redirect, got through to the internal server
    assert (stats["stored"], stats["dead_links"], stats["corrupt"]) == (2, len(hostile), 0)
    for url, error in hostile.items():
        status, message = outcomes[url]
        assert status == "failed_to_download" and error in message, (url, message)


def test_a_server_that_drips_is_cut_at_the_deadline(tmp_path):
    """Each byte comes within `data.timeout`, so only a total deadline stops the download (200 s uncut)."""
    deadline = 5
    with web({"/0.jpg": body(picture()), "/drip.jpg": drip(100, every=2)}) as slow:
        rows = [("a red square", f"{slow.base}/0.jpg"), ("a slow picture", f"{slow.base}/drip.jpg")]
        stats, outcomes = download(tmp_path, rows, allow=[f"127.0.0.1:{slow.server_address[1]}"],
                                   timeout=3, deadline=deadline)
        finished = time.monotonic()
    assert finished - slow.started["/drip.jpg"] <= 3 * deadline  # from the drip's first byte to the stage's end
    assert (stats["stored"], stats["dead_links"]) == (1, 1)
    status, message = outcomes[f"{slow.base}/drip.jpg"]
    assert status == "failed_to_download"
    assert message == f"HTTP Error 504: no complete response from 127.0.0.1:{slow.server_address[1]} within " \
                      f"data.deadline = {deadline} s"
    assert stats["errors"] == {message: 1}


@pytest.mark.parametrize(("address", "port", "kind"), [
    ("93.184.215.14", 80, None), ("2606:4700::6810:84e5", 443, None),  # public
    ("169.254.169.254", 80, "link-local"), ("100.100.100.200", 80, "non-global"),  # cloud metadata services
    ("10.0.0.1", 80, "private"), ("192.168.1.1", 80, "private"), ("0.0.0.0", 80, "unspecified"),
    ("224.0.0.1", 80, "multicast"), ("fe80::1%eth0", 80, "link-local"), ("fd12::1", 80, "private"),
    ("::ffff:169.254.169.254", 80, "private"), ("64:ff9b::7f00:1", 80, "loopback"),  # IPv4 inside IPv6: NAT64,
    ("2002:a9fe:a9fe::1", 80, "link-local"),  # and 6to4 of 169.254.169.254
    ("127.0.0.1", 8765, None), ("127.0.0.1", 8766, "loopback"), ("10.1.2.3", 9000, None), ("::1", 8080, None),
])
def test_the_address_policy(address, port, kind):
    policy = AddressPolicy.parse(["127.0.0.1:8765", "10.1.0.0/16", "[::1]:8080"])
    assert policy.refusal(address, port) == kind


@pytest.mark.parametrize("entry", ["localhost:8080", "10.0.0.0/33", "[::1:8080", "127.0.0.1:port"])
def test_a_bad_allow_entry_is_one_error_naming_the_key(entry):
    with pytest.raises(ValueError, match=rf"data.allow: {re.escape(repr(entry))} is not an address or network"):
        AddressPolicy.parse([entry])


# --- images that decode wrong -----------------------------------------------------------------------------------


def halves(size=48) -> Image.Image:
    """Left half red, right half blue: where the halves land shows the orientation."""
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:, : size // 2], pixels[:, size // 2:] = (200, 30, 30), (30, 30, 200)
    return Image.fromarray(pixels)


def encoded(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def stored_images(data_dir: Path) -> dict[str, np.ndarray]:
    """{url: decoded RGB pixels} of every sample in a data stage output."""
    images = {}
    for shard in sorted((data_dir / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, payload in files.items():
            if name.endswith(".json"):
                url = json.loads(payload)["url"]
                jpg = files[name.removesuffix(".json") + ".jpg"]
                images[url] = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB")).astype(int)
    return images


def test_orientation_bit_depth_and_colour_models_are_stored_as_seen_and_counted(tmp_path):
    rotated = Image.Exif()
    rotated[ExifTags.Base.Orientation] = 6  # stored sideways: shown turned 90 degrees clockwise (a phone photo)
    ramp = np.tile(np.linspace(0, 65535, 48), (48, 1)).astype(np.uint16)  # dark to bright, left to right
    ok, ramp_rgb = cv2.imencode(".png", np.dstack([ramp, ramp, ramp]))  # 48 bits per pixel
    rgba = np.dstack([np.asarray(halves()), np.full((48, 48), 255, np.uint8)])
    rgba[:, 24:, 3] = 0  # the blue half fully transparent
    files = {
        "/upright.jpg": encoded(halves(), "JPEG", quality=95),
        "/phone.jpg": encoded(halves(), "JPEG", quality=95, exif=rotated.tobytes()),
        "/gray16.png": encoded(Image.fromarray(ramp), "PNG"),
        "/rgb16.png": ramp_rgb.tobytes(),
        "/cmyk.jpg": encoded(halves().convert("CMYK"), "JPEG", quality=95),
        "/rgba.png": encoded(Image.fromarray(rgba, "RGBA"), "PNG"),
        "/bomb.png": encoded(Image.new("1", (10_000, 10_000)), "PNG"),  # 12 kB on the wire, 300 MB decoded
    }
    assert ok and all(len(b) < 20_000 for b in files.values())
    with web({path: body(payload) for path, payload in files.items()}) as site:
        rows = [(f"picture {path}", f"{site.base}{path}") for path in files]
        stats, outcomes = download(tmp_path, rows, allow=[f"127.0.0.1:{site.server_address[1]}"])
    images = {url.removeprefix(site.base): pixels for url, pixels in stored_images(tmp_path / "data").items()}
    red, blue, white = (200, 30, 30), (30, 30, 200), (255, 255, 255)

    def near(pixels, colour):
        return np.abs(pixels.reshape(-1, 3).mean(0) - colour).max() < 25

    top, bottom, left, right = (lambda p: p[:20], lambda p: p[-20:], lambda p: p[:, :20], lambda p: p[:, -20:])
    for path in ("/upright.jpg", "/cmyk.jpg"):
        assert near(left(images[path]), red) and near(right(images[path]), blue), path
    assert near(top(images["/phone.jpg"]), red) and near(bottom(images["/phone.jpg"]), blue)  # turned upright
    for path in ("/gray16.png", "/rgb16.png"):  # a ramp, not white
        brightness = images[path].mean(axis=(0, 2))
        assert brightness[:5].mean() < 40 and brightness[-5:].mean() > 215 and 100 < brightness.mean() < 155, path
    assert near(left(images["/rgba.png"]), red) and near(right(images["/rgba.png"]), white)  # matted on white
    assert "/bomb.png" not in images
    assert outcomes[f"{site.base}/bomb.png"] == (
        "failed_to_resize", "decompression bomb: 10000x10000 pixels, over the limit of 89478485")
    assert (stats["stored"], stats["corrupt"]) == (6, 1)
    assert stats["fixed"] == {"exif_orientation": 1, "16_bit": 2}


@pytest.mark.parametrize("pixels, refusal", [
    (np.arange(48 * 48, dtype=np.int32).reshape(48, 48) * 90_000, "I pixels (32-bit integer) with no known range"),
    (np.linspace(-3, 7, 48 * 48, dtype=np.float32).reshape(48, 48), "F pixels (floating point) with no known range"),
])
def test_pixels_without_a_known_range_are_refused_not_guessed(pixels, refusal):
    """A 32-bit or float TIFF has no fixed white point: scaling it by a guess would store a different picture."""
    data = encoded(Image.fromarray(pixels), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == refusal[0]
    with pytest.raises(UnusableImage, match=re.escape(refusal)):
        upright_8_bit(data)


# --- the egress proxy alone, against servers that never finish -----------------------------------------------


def endless_chunks(h):
    """A chunked body that never ends: no length to refuse up front, so only counting the bytes stops it."""
    h.protocol_version = "HTTP/1.1"
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    while True:
        h.wfile.write(b"10000\r\n" + bytes(1 << 16) + b"\r\n")


def header_drip(h):
    """Headers one byte every half second: every read is quick, the response head never completes."""
    h.wfile.write(b"HTTP/1.1 200 OK\r\n")
    for _ in range(1000):
        h.wfile.write(b"X")
        h.wfile.flush()
        time.sleep(0.5)


@pytest.mark.parametrize(("page", "expected"), [
    (endless_chunks, "HTTP Error 502: response from {host} passed data.max_bytes = 1000000"),
    (header_drip, "HTTP Error 504: no complete response from {host} within data.deadline = 2 s"),
])
def test_the_proxy_stops_responses_that_never_end(page, expected):
    policy, limits = AddressPolicy.parse(["127.0.0.1"]), Limits(deadline=2, timeout=1, max_bytes=10**6)
    with web({"/x": page}) as site, egress_proxy(policy, limits) as proxy:
        start = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as err:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
            opener.open(f"{site.base}/x", timeout=10)
        assert str(err.value) == expected.format(host=f"127.0.0.1:{site.server_address[1]}")
        assert time.monotonic() - start < 2 * 3


def test_a_tunnel_is_cut_at_the_deadline():
    """HTTPS is relayed as bytes: a server that keeps a tunnel busy is cut at data.deadline."""
    listener = socket.create_server(("127.0.0.1", 0))  # a raw TCP server that sends a byte every half second
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with contextlib.suppress(OSError), conn:
            while True:
                conn.sendall(b"x")
                time.sleep(0.5)

    threading.Thread(target=serve, daemon=True).start()
    limits = Limits(deadline=2, timeout=1, max_bytes=10**6)
    with listener, egress_proxy(AddressPolicy.parse([f"127.0.0.1:{port}"]), limits) as proxy:
        client = socket.create_connection(proxy.address, timeout=10)
        start = time.monotonic()
        client.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
        received = b""
        while chunk := client.recv(1024):
            received += chunk
        elapsed = time.monotonic() - start
    assert received.startswith(b"HTTP/1.0 200 Connection established\r\n\r\n") and received.endswith(b"xxx")
    assert 2 <= elapsed < 2 * 3 and proxy.counts["deadline"] == 1


def test_a_proxy_process_that_dies_fails_the_download_though_the_others_serve_on():
    """A killed proxy process loses the downloads it held: the data stage must fail (its staging kept for the rerun),
    not publish shards that silently lack them. The other processes keep serving the shared socket meanwhile."""
    import multiprocessing

    policy, limits = AddressPolicy.parse(["127.0.0.1"]), Limits(deadline=5, timeout=5, max_bytes=10**6)
    with web({"/x": body(b"still served")}) as site, pytest.raises(RuntimeError) as err:
        with egress_proxy(policy, limits, processes=2) as proxy:
            victim = next(p for p in multiprocessing.active_children() if p.name == "egress-proxy-0")
            os.kill(victim.pid, signal.SIGKILL)
            victim.join(10)
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
            for _ in range(4):
                assert opener.open(f"{site.base}/x", timeout=10).read() == b"still served"
    assert str(err.value) == ("1 of 2 egress proxy processes died (exit codes [-9]); the downloads they held failed")
