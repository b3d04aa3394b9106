"""`snakemake --report` builds one HTML page with every table and figure, and it opens in headless Chromium with
every figure loaded. The report rule runs for real on evaluation results written here (no training)."""

import asyncio
import base64
import json
import os
import shutil
import subprocess
import time

import pytest
from helpers import repo_params, snapshot_repo, venv_env

from dinorankclip.config import benchmark_name, evaluated_runs, finetune_runs, run_names, run_seeds, seeded

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def fake_study(root, params):
    """Every input of the demo study's report rule, with made-up numbers; upstream stages as empty folders, older."""
    for stage in ("source", "data", "teacher_weights", "teacher"):
        (root / stage).mkdir(parents=True)
    time.sleep(0.01)
    ev = params["studies"]["demo"]["evaluate"]
    for run, seed in seeded(params, run_names(params)):
        write(root / "pretrain" / run / f"seed{seed}" / "metrics.json", {"train_flops": 1e12, "strength": {}})
    for run, seed in seeded(params, list(finetune_runs(params))):
        write(root / "finetune" / run / f"seed{seed}" / "metrics.json", {"train_flops": 1e11, "kernel_loss_first": 0.1,
                                                                         "kernel_loss_last": 0.09})
    time.sleep(0.01)
    for i, run in enumerate(evaluated_runs(params)):
        for seed in run_seeds(params, "demo", run):
            score = 0.3 + i / 50 + seed / 100
            out = root / "evaluate" / run / f"seed{seed}"
            for suite in ev["suites"]:
                metrics = ({"acc1": score, "acc5": 0.9} if suite["task"] == "zeroshot_classification" else
                           {f"{d}_retrieval_recall@{k}": score * k / 10 for d in ("image", "text") for k in (1, 5, 10)})
                write(out / f"{benchmark_name(suite['dataset'])}.json",
                      {"dataset": suite["dataset"], "task": suite["task"], "classnames": list("abcde"),
                       "metrics": metrics})
            for dataset in ev["linear_probe"]["datasets"]:
                write(out / "linear_probe" / f"{benchmark_name(dataset)}.json",
                      {"dataset": dataset, "task": "linear_probe", "classnames": list("abcde"),
                       "metrics": {"lp_acc1": score + 0.1}})
            nodes = ["text", "z_g", "z", "teacher"] if run.startswith("drc") else ["text", "z", "teacher"]
            dist = [[abs(a - b) * (0.2 + i / 100) for b in range(len(nodes))] for a in range(len(nodes))]
            write(out / "modality_gap" / f"{benchmark_name(ev['modality_gap']['dataset'])}.json",
                  {"nodes": nodes, "centroid_distances": dist, "metrics": {
                      "centroid_gap": dist[0][-2], "alignment": 0.4, "uniformity_image": -2.5,
                      "uniformity_text": -2.8}})


async def inspect(html_path, screenshot, port):
    """Open the page in headless Chromium (DevTools protocol over aiohttp's websocket), load every PNG result the
    report embeds as an <img>, return their natural widths; save a screenshot."""
    import aiohttp

    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={port}",
                             "--window-size=1400,1000", "about:blank"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/json") as resp:
                        pages = [p for p in await resp.json() if p["type"] == "page"]
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.2)
            async with session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                ids = iter(range(1, 10_000))

                async def call(method, **params):
                    msg_id = next(ids)
                    await ws.send_json({"id": msg_id, "method": method, "params": params})
                    while True:
                        msg = await ws.receive_json()
                        if msg.get("id") == msg_id:
                            return msg.get("result", msg)

                await call("Page.enable")
                await call("Page.navigate", url=html_path.as_uri())
                for _ in range(100):  # the page renders with React once its scripts ran
                    state = await call("Runtime.evaluate", expression="typeof results !== 'undefined' && "
                                       "document.readyState === 'complete'", returnByValue=True)
                    if state["result"].get("value"):
                        break
                    await asyncio.sleep(0.2)
                script = """(async () => {
                    const pngs = Object.entries(results).filter(([k, v]) => v.mime_type === 'image/png');
                    const widths = {};
                    for (const [name, entry] of pngs) {
                        const img = document.createElement('img');
                        img.src = entry.data_uri;
                        document.body.appendChild(img);
                        await img.decode().catch(() => null);
                        widths[name] = img.naturalWidth;
                    }
                    return JSON.stringify({widths, images: document.images.length,
                                           text: document.body.innerText.slice(0, 2000)});
                })()"""
                found = await call("Runtime.evaluate", expression=script, awaitPromise=True, returnByValue=True)
                shot = await call("Page.captureScreenshot", format="png")
                screenshot.write_bytes(base64.b64decode(shot["data"]))
                return json.loads(found["result"]["value"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_snakemake_report_is_one_html_page_with_every_table_and_figure(tmp_path):
    clone = snapshot_repo(tmp_path / "clone")
    params = repo_params()
    fake_study(clone / "results" / "demo", params)
    env = {**venv_env(), "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    run = subprocess.run(["timeout", "-k", "10", "300", "snakemake", "results/demo/report", "--allowed-rules",
                          "report", "--rerun-triggers", "mtime", "--cores", "1"],
                         cwd=clone, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = {p.name for p in (clone / "results/demo/report").glob("*.png")}
    tables = {p.name for p in (clone / "results/demo/report").glob("*.html")}
    assert {"main.png", "modality_gap.png", "probe.png", "order_sweep.png"} <= figures
    assert {"main.html", "modality_gap.html", "kuea.html", "retrieval.html"} <= tables
    run = subprocess.run(["timeout", "-k", "10", "300", "snakemake", "--report", "report.html"], cwd=clone, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    html = clone / "report.html"
    embedded = html.read_text()
    for name in figures | tables:
        assert name in embedded, name  # every result is in the one page
    screenshot = tmp_path / "report.png"
    found = asyncio.run(inspect(html, screenshot, 9300 + os.getpid() % 500))
    assert len(found["widths"]) == len(figures), found["widths"]
    assert all(width > 0 for width in found["widths"].values()), found["widths"]
    assert found["images"] >= len(figures)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 5_000
    shutil.copy(screenshot, os.environ.get("REPORT_SCREENSHOT", tmp_path / "kept.png"))
