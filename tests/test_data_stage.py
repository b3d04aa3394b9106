"""Source and data stages on a tiny demo world, downloaded for real by img2dataset from a local server."""

import io
import socket
import tarfile

import pytest
from helpers import tiny_world_cfg
from PIL import Image

from dinorankclip.data.download import build_shards, normalize_shards, shard_index
from dinorankclip.data.loader import GlobalBatches, split_indices
from dinorankclip.data.server import serve_directory
from dinorankclip.data.source import build_source
from dinorankclip.data.tsv import clean_caption_list
from dinorankclip.io import read_json


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """(cfg, source dir, data dir, stats) of a 40-image world with 3 dead links and 4 undecodable files."""
    cfg = tiny_world_cfg()
    root = tmp_path_factory.mktemp("study")
    (root / "source").mkdir()
    (root / "data").mkdir()
    build_source(cfg, root / "source")
    stats = build_shards(cfg, root / "source", root / "staging", root / "data")
    return cfg, root / "source", root / "data", stats


def test_download_counts_the_planted_faults_exactly(downloaded):
    cfg, source, data, stats = downloaded
    planted = read_json(source / "planted.json")
    assert (stats["urls"], stats["stored"]) == (40 + 3 + 4, 40)
    assert stats["dead_links"] == planted["dead_links"] == 3
    assert stats["corrupt"] == planted["corrupt_files"] == 4
    assert read_json(source / "source_stats.json")["malformed"] == planted["malformed_rows"] == 4
    assert read_json(data / "stats.json") == stats


def test_shards_hold_exactly_the_valid_images(downloaded):
    _, source, data, _ = downloaded
    index = read_json(data / "shards.json")
    assert sum(e["nsamples"] for e in index["shardlist"]) == 40
    urls = set()
    for entry in index["shardlist"]:
        with tarfile.open(data / entry["url"]) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    urls.add(__import__("json").load(tar.extractfile(member))["url"])
                if member.name.endswith(".jpg"):
                    Image.open(io.BytesIO(tar.extractfile(member).read())).load()
    assert all("/train/" in url for url in urls) and len(urls) == 40  # no broken/ or gone/ url made it in
    # the staging keeps every shard (a hard link of the output's) until the caller has published the output
    assert (data.parent / "staging" / "shards" / "00000.tar").samefile(data / "shards" / "00000.tar")


def test_verification_removes_a_sample_that_does_not_decode(downloaded, tmp_path):
    _, _, data, _ = downloaded
    shard = tmp_path / "00000.tar"
    before = shard_index([data / "shards" / "00000.tar"], "x")["shardlist"][0]["nsamples"]
    with tarfile.open(data / "shards" / "00000.tar") as src, tarfile.open(shard, "w") as dst:
        members = [m for m in src if m.isfile()]
        for m in members:
            payload = src.extractfile(m).read()
            if m.name == members[0].name and m.name.endswith(".jpg"):
                payload = payload[: len(payload) // 2]  # truncated mid-scan: PIL refuses it
                victim = m.name.split(".")[0]
            m.size = len(payload)
            dst.addfile(m, io.BytesIO(payload))
    assert normalize_shards([shard], processes=1) == {"00000.tar": [victim]}
    assert victim not in {e.name.split(".")[0] for e in tarfile.open(shard)}
    assert shard_index([shard], "x")["shardlist"][0]["nsamples"] == before - 1


def test_busy_port_is_one_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(OSError, match=f"source.port: cannot serve the demo world on 127.0.0.1:{port}"):
            with serve_directory(tmp_path, port):
                pass


def test_caption_list_cleaning_reports_each_bad_row(tmp_path, caplog):
    raw = tmp_path / "raw.tsv"
    raw.write_text("a cat\thttp://x.org/1.jpg\nno url here\n\thttp://x.org/2.jpg\na\tb\tc\nok\tftp://x.org/3.jpg\n"
                   "a dog\thttps://x.org/4.jpg\n")
    stats = clean_caption_list(raw, tmp_path / "clean.tsv")
    assert (stats.rows, stats.kept, stats.malformed) == (6, 2, 4)
    assert (tmp_path / "clean.tsv").read_text() == "caption\turl\na cat\thttp://x.org/1.jpg\na dog\thttps://x.org/4.jpg\n"
    assert "line 2: expected 2 tab-separated columns" in caplog.text and "line 5: url is not" in caplog.text
    raw.write_text("only junk\n")
    with pytest.raises(ValueError, match="no valid"):
        clean_caption_list(raw, tmp_path / "clean.tsv")


def test_epoch_batches_depend_only_on_seed_epoch_and_position():
    train, held_out = split_indices(60, 10, seed=7)
    assert sorted(train + held_out) == list(range(60)) and split_indices(60, 10, seed=7) == (train, held_out)
    sampler = GlobalBatches(train, 8, seed=7)
    sampler.set_position(epoch=2)
    full = list(sampler)
    assert len(full) == 6 and all(len(b) == 8 for b in full)  # 50 // 8, ragged tail dropped
    assert len({i for b in full for i in b}) == 48 and {i for b in full for i in b} <= set(train)
    sampler.set_position(epoch=2, batch=4)
    assert list(sampler) == full[4:]
    sampler.set_position(epoch=3)
    assert list(sampler) != full


def test_ranks_cut_the_same_global_batches():
    train, _ = split_indices(60, 10, seed=7)
    single = GlobalBatches(train, 8, seed=7)
    ranks = [GlobalBatches(train, 8, seed=7, rank=r, world=2) for r in range(2)]
    for sampler in (single, *ranks):
        sampler.set_position(epoch=1, batch=2)
    assert [a + b for a, b in zip(*ranks, strict=True)] == list(single)
    with pytest.raises(ValueError, match="not divisible by the 3 ranks"):
        GlobalBatches(train, 8, seed=7, rank=0, world=3)


def test_normalised_shards_are_byte_identical_whatever_order_img2dataset_wrote(downloaded, tmp_path):
    _, _, data, _ = downloaded
    with tarfile.open(data / "shards" / "00001.tar") as src:
        members = [(m, src.extractfile(m).read()) for m in src if m.isfile()]
    orders = {"forward": members, "shuffled": members[3:] + members[:3][::-1]}
    for name, order in orders.items():
        with tarfile.open(tmp_path / f"{name}.tar", "w") as dst:
            for m, payload in order:
                m.mtime = hash(name) % 10**6  # img2dataset stamps the write time
                dst.addfile(m, io.BytesIO(payload))
    normalize_shards([tmp_path / "forward.tar", tmp_path / "shuffled.tar"], processes=1)
    assert (tmp_path / "forward.tar").read_bytes() == (tmp_path / "shuffled.tar").read_bytes()
    keys = [m.name.split(".")[0] for m in tarfile.open(tmp_path / "forward.tar")]
    assert keys == sorted(keys)


def test_downloads_manifest_lists_every_url_in_key_order(downloaded):
    import pandas as pd

    _, source, data, _ = downloaded
    table = pd.read_csv(data / "downloads.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(table["key"]) == sorted(table["key"]) and len(table) == 47
    assert (table["status"] == "success").sum() == 40
    assert set(table.loc[table["url"].str.contains("/gone/"), "status"]) == {"failed_to_download"}
    assert set(table.loc[table["url"].str.contains("/broken/"), "status"]) == {"failed_to_resize"}


def test_a_validation_list_is_downloaded_beside_the_training_shards(tmp_path):
    """A study's own validation pairs (`source.validation_tsv`, CC3M's validation list at paper scale) go through the
    same cleaning and download into data/val, with their own index and counts."""
    cfg = tiny_world_cfg()
    (tmp_path / "source").mkdir()
    (tmp_path / "data").mkdir()
    build_source(cfg, tmp_path / "source")
    rows = (tmp_path / "source" / "train.tsv").read_text().splitlines()
    validation = tmp_path / "validation-list.tsv"  # Google's layout: caption<TAB>url, no header
    validation.write_text("\n".join(rows[1:7] + ["not a row", rows[1]]) + "\n")
    cfg["source"]["validation_tsv"] = str(validation)
    source = tmp_path / "source-with-validation"
    source.mkdir()
    stats_source = build_source(cfg, source)
    assert stats_source["validation"]["kept"] == 6 and stats_source["validation"]["malformed"] == 1
    assert stats_source["validation"]["duplicate_urls"] == 1
    stats = build_shards(cfg, source, tmp_path / "staging", tmp_path / "data")
    val = read_json(tmp_path / "data" / "val" / "shards.json")
    stored = sum(entry["nsamples"] for entry in val["shardlist"])
    assert stats["validation"]["urls"] == 6 and stats["validation"]["stored"] == stored
    assert stored == sum(1 for row in rows[1:7] if "/train/" in row) > 0
    assert val["name"] == f"{cfg['study']}-validation" and read_json(tmp_path / "data" / "stats.json") == stats
    assert stats["stored"] == 40  # the training shards are as without a validation list
