"""The captions stage: a caption file joined to the shards by URL or key, coverage counted exactly, uncovered
images keeping their raw caption, and the loader reading the second caption beside its image."""

import logging

import open_clip
import pytest
from helpers import make_image_shards

from dinorankclip.data.captions import build_captions, read_caption_file
from dinorankclip.data.loader import ShardPairs, open_shards
from dinorankclip.data.tsv import clean_caption_list
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
                     "unused_entries": 1, "source": "file", "repaired": {"non_utf8": 0, "bare_cr": 0}}
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


def test_the_caption_list_breaks_rows_at_lf_only_and_counts_repairs_and_repeated_urls(tmp_path, caplog):
    caplog.set_level(logging.INFO, "dinorankclip.data.tsv")
    raw = tmp_path / "raw.tsv"
    raw.write_bytes(b"a cat\thttp://x.org/1.jpg\r\n"  # CRLF: an ordinary line end
                    b"a dog on\ra mat\thttp://x.org/2.jpg\n"  # a bare CR inside the caption: not a row break
                    b"caf\xe9 au lait\thttp://x.org/3.jpg\n"  # Latin-1, not UTF-8
                    b"the same cat again\thttp://x.org/1.jpg\n"  # a repeated URL
                    b"a fish\thttp://x.org/\xff.jpg\n"  # an undecodable URL cannot be fetched
                    b"a bird\thttps://x.org/4.jpg")  # no final newline
    stats = clean_caption_list(raw, tmp_path / "clean.tsv")
    assert (stats.rows, stats.kept, stats.malformed, stats.duplicate_urls) == (6, 4, 1, 1)
    assert stats.repaired == {"non_utf8": 2, "bare_cr": 1}
    assert stats.reasons == {"url holds bytes that are not UTF-8": 1}
    assert (tmp_path / "clean.tsv").read_text() == ("caption\turl\na cat\thttp://x.org/1.jpg\n"
                                                    "a dog on a mat\thttp://x.org/2.jpg\n"
                                                    "caf\ufffd au lait\thttp://x.org/3.jpg\n"
                                                    "a bird\thttps://x.org/4.jpg\n")
    assert "line 3: bytes that are not UTF-8 replaced" in caplog.text and "line 2: a CR inside the row" in caplog.text
    assert "1 repeated URLs dropped" in caplog.text


def test_the_caption_file_breaks_rows_at_lf_only_and_counts_repairs(tmp_path):
    file = tmp_path / "syn.tsv"
    file.write_bytes(b"\xef\xbb\xbfurl\tcaption\r\n"  # a byte order mark and CRLF line ends (a Windows editor)
                     b"http://h/1.jpg\ttwo lines\rof text\r\n"
                     b"http://h/2.jpg\tna\xefve\n"
                     b"http://h/3.jpg\tplain\n")
    column, captions, stats = read_caption_file(file)
    assert column == "url"
    assert captions == {"http://h/1.jpg": "two lines of text", "http://h/2.jpg": "na\ufffdve",
                        "http://h/3.jpg": "plain"}
    assert stats == {"rows": 3, "malformed_rows": 0, "malformed_lines": [], "duplicate_keys": 0,
                     "repaired": {"non_utf8": 1, "bare_cr": 1}}
