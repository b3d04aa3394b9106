"""The captions stage: a caption file joined to the shards by URL or key, coverage counted exactly, uncovered
images keeping their raw caption, and the loader reading the second caption beside its image."""

import open_clip
import pytest
from helpers import make_image_shards

from dinorankclip.data.captions import build_captions, read_caption_file
from dinorankclip.data.loader import ShardPairs, open_shards
from dinorankclip.models.clip import create_clip


@pytest.fixture
def data(tmp_path):
    make_image_shards(tmp_path / "data", [4, 3])
    return tmp_path / "data"


def caption_file(path, header, rows):
    path.write_text(header + "\n" + "".join(row + "\n" for row in rows))
    return path


def join(tmp_path, data, file):
    out = tmp_path / "captions"
    out.mkdir()
    return out, build_captions({"study": "demo", "captions": {"source": "file", "file": str(file)}}, data,
                               tmp_path / "staging", out)


def second_captions(out):
    side = open_shards(out / "captions.json")
    return [(side[i]["__key__"], side[i][".txt"].getvalue().decode(), side[i][".source.txt"].getvalue().decode())
            for i in range(len(side))]


def test_a_url_keyed_file_is_joined_and_its_coverage_counted(tmp_path, data):
    url = "http://127.0.0.1/{}.jpg".format
    rows = [f"{url('000000001')}\tone described", f"{url('000010002')}\tlast described",
            "a row without a tab", f"{url('000000001')}\tone described again", f"{url('999999999')}\tnot crawled",
            f"{url('000000003')}\t "]
    out, stats = join(tmp_path, data, caption_file(tmp_path / "syn.tsv", "url\tcaption", rows))
    assert stats == {"rows": 6, "malformed_rows": 2, "malformed_lines": [4, 7], "duplicate_keys": 1,
                     "join_column": "url", "images": 7, "covered": 2, "missing": 5, "coverage": 2 / 7,
                     "unused_entries": 1, "source": "file"}
    joined = second_captions(out)
    assert [k for k, _, _ in joined] == [f"00000{i:04d}" for i in range(4)] + [f"00001{i:04d}" for i in range(3)]
    assert joined[1] == ("000000001", "one described again", "synthetic")
    assert joined[6] == ("000010002", "last described", "synthetic")
    assert joined[0] == ("000000000", "a caption of 000000000", "raw")  # uncovered: its own caption
    assert sorted(p.name for p in (out / "captions").iterdir()) == ["00000.tar", "00001.tar"]


def test_a_key_keyed_file_is_joined_by_sample_key(tmp_path, data):
    rows = [f"00000{i:04d}\tscene {i}" for i in range(4)] + [f"00001{i:04d}\tscene 1{i}" for i in range(3)]
    out, stats = join(tmp_path, data, caption_file(tmp_path / "syn.tsv", "key\tcaption", rows))
    assert stats["coverage"] == 1.0 and stats["missing"] == 0 and stats["join_column"] == "key"
    assert second_captions(out)[5] == ("000010001", "scene 11", "synthetic")


@pytest.mark.parametrize("header", ["caption\turl", "url caption", ""])
def test_a_file_without_the_header_is_refused_naming_it(tmp_path, header):
    file = caption_file(tmp_path / "syn.tsv", header, ["x\ty"])
    with pytest.raises(ValueError, match=r"syn.tsv line 1 must be the header 'url<TAB>caption'"):
        read_caption_file(file)


def test_a_missing_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"captions.file: .*nothing.tsv does not exist"):
        read_caption_file(tmp_path / "nothing.tsv")


def test_the_loader_reads_the_second_caption_beside_its_image(tmp_path, data):
    rows = [f"00000{i:04d}\tscene {i}" for i in range(4)]
    out, _ = join(tmp_path, data, caption_file(tmp_path / "syn.tsv", "key\tcaption", rows))
    _, transform, _ = create_clip("demo-rn-tiny")
    tokenizer = open_clip.get_tokenizer("demo-rn-tiny")
    pairs = ShardPairs(data / "shards.json", transform, tokenizer, captions=out / "captions.json")
    batch = pairs.__getitems__([2, 5])
    assert batch.keys == ["000000002", "000010001"]
    assert (batch.captions == tokenizer(["scene 2", "a caption of 000010001"])).all()
    assert (batch.tokens == tokenizer(["a caption of 000000002", "a caption of 000010001"])).all()
    assert ShardPairs(data / "shards.json", transform, tokenizer).__getitems__([0]).captions is None
