"""What the egress proxy costs: the demo world's download with and without it, and its CPU per request under
many concurrent clients.

1. download: the demo study's caption list (its world, `--images` training scenes) fetched by img2dataset from the
   local demo server, once straight and once through the proxy, in fresh staging folders (the data stage's
   settings: processes, threads, image size). Reported: wall seconds, URLs/s, and CPU seconds of this process
   (the demo server, img2dataset's reader) and of its children (img2dataset's workers, and the proxy's
   processes when used).
2. load: `--clients` threads in each of `--processes` processes fetch a `--body`-byte file from a local server,
   straight and through the proxy (`--proxies` processes). Reported: requests/s and the CPU per request of all
   processes (server, clients, and proxy when used); the difference is what the proxy costs per request.

Usage: python bench/egress.py [--images 8000] [--processes 4] [--clients 64] [--requests 20] [--body 20000]
       [--proxies 2] [--out bench/results/egress.json]
Prints the JSON report on stdout and writes it to --out.
"""

import argparse
import contextlib
import multiprocessing
import os
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from dinorankclip.data.egress import AddressPolicy, Limits, egress_proxy
from dinorankclip.io import report_json

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "egress.json"


def cpu() -> tuple[float, float]:
    """(CPU seconds of this process, of its finished children)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def timed(run) -> dict:
    (own0, kids0), start = cpu(), time.perf_counter()
    run()
    wall, (own1, kids1) = time.perf_counter() - start, cpu()
    return {"wall_s": round(wall, 2), "cpu_s": round(own1 - own0, 2), "children_cpu_s": round(kids1 - kids0, 2)}


def bench_download(images: int, root: Path) -> dict:
    # imported here: the proxy's processes are spawned and import this script, which must stay light
    from dinorankclip.config import load_params, resolve
    from dinorankclip.data.decode import upright_images
    from dinorankclip.data.download import guarded_download, run_img2dataset
    from dinorankclip.data.server import serve_directory
    from dinorankclip.data.source import build_source

    params = load_params(None)
    cfg = resolve(params, "demo")
    cfg["source"]["world"]["train_scenes"] = images
    with socket.socket() as probe:  # a free port: another demo may hold the configured one
        probe.bind(("127.0.0.1", 0))
        cfg["source"]["port"] = probe.getsockname()[1]
    source = root / "source"
    source.mkdir()
    build_source(cfg, source)
    tsv, data = source / "train.tsv", cfg["data"]
    rows = sum(1 for _ in open(tsv)) - 1

    def straight():
        with serve_directory(source / "www", cfg["source"]["port"]), upright_images(root / "a" / "fixes"):
            run_img2dataset(tsv, root / "a", data)

    def proxied():
        with guarded_download(cfg, source), upright_images(root / "b" / "fixes"):
            run_img2dataset(tsv, root / "b", data)

    report = {"urls": rows, "processes": data["processes"], "threads": data["threads"]}
    for name, run in (("straight", straight), ("through_proxy", proxied)):
        report[name] = timed(run)
        report[name]["urls_per_s"] = round(rows / report[name]["wall_s"], 1)
    return report


class _File(BaseHTTPRequestHandler):
    body = b""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)


def _clients(url: str, proxy: str | None, threads: int, requests: int, failures) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy} if proxy else {}))

    def fetch():
        for _ in range(requests):
            try:
                opener.open(url, timeout=60).read()
            except OSError:
                with failures.get_lock():
                    failures.value += 1

    pool = [threading.Thread(target=fetch) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def bench_load(processes: int, clients: int, requests: int, body: int, proxies: int) -> dict:
    _File.body = os.urandom(body)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _File)
    server.daemon_threads, server.request_queue_size = True, 1024
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url, total = f"http://127.0.0.1:{server.server_address[1]}/f", processes * clients * requests
    policy = AddressPolicy.parse([f"127.0.0.1:{server.server_address[1]}"])
    limits = Limits(deadline=60, timeout=30, max_bytes=10 * body)
    report = {"processes": processes, "threads_per_process": clients, "requests": total, "body_bytes": body,
              "proxy_processes": proxies}
    for name in ("straight", "through_proxy"):
        proxy = egress_proxy(policy, limits, proxies) if name == "through_proxy" else contextlib.nullcontext()
        failures = multiprocessing.Value("i", 0)
        (own0, kids0) = cpu()
        with proxy as running:
            via = running.url if running else None
            if running:  # its processes have started and serve
                urllib.request.build_opener(urllib.request.ProxyHandler({"http": via})).open(url, timeout=600).read()
            workers = [multiprocessing.Process(target=_clients, args=(url, via, clients, requests, failures))
                       for _ in range(processes)]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - start
        (own1, kids1) = cpu()  # the proxy processes have ended: their CPU (startup included) is the children's
        report[name] = {"wall_s": round(wall, 2), "requests_per_s": round(total / wall, 1), "failures": failures.value,
                        "cpu_us_per_request": round(1e6 * (own1 - own0 + kids1 - kids0) / total, 1)}
    server.shutdown()
    proxy_us = report["through_proxy"]["cpu_us_per_request"] - report["straight"]["cpu_us_per_request"]
    report["proxy_cpu_us_per_request"] = round(proxy_us, 1)
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8000, help="training scenes of the demo world to download")
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--clients", type=int, default=64, help="threads per process")
    p.add_argument("--requests", type=int, default=20, help="requests per thread")
    p.add_argument("--body", type=int, default=20_000, help="bytes per response (a CC3M image at 256 px is ~20 kB)")
    p.add_argument("--proxies", type=int, default=2, help="proxy processes")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    root = Path(tempfile.mkdtemp(prefix="egress-bench-"))
    try:
        report = {"machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
                  "download": bench_download(args.images, root),
                  "load": bench_load(args.processes, args.clients, args.requests, args.body, args.proxies)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
