"""The CoCa source of the captions stage: a seeded CoCa built by open_clip and saved to a safetensors file is read
back by the stage, whose captions equal open_clip's own greedy `generate` on the same images; coverage is counted,
a killed run resumes from its finished shards, and a missing or wrong weights file is one error naming the key."""

import hashlib
import json

import open_clip
import pytest
import torch
import transformers
from helpers import make_image_shards
from open_clip import coca_model
from safetensors.torch import save_file

from dinorankclip.data.captions import build_captions
from dinorankclip.data.loader import open_shards
from dinorankclip.io import read_json
from dinorankclip.models import captioner

pytestmark = pytest.mark.usefixtures("single_thread")
EOT = 49407  # the CLIP tokenizer's end token
MAX_LENGTH, MIN_LENGTH = 6, 3


def tiny_coca(width: int) -> dict:
    """An open_clip CoCa config, one block per tower, at 64 px (the test shards' size)."""
    return {"embed_dim": 32, "custom_text": True,
            "vision_cfg": {"image_size": 64, "layers": 1, "width": width, "head_width": 16, "patch_size": 16,
                           "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8,
                           "output_tokens": True},
            "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                         "embed_cls": True, "output_tokens": True},
            "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                               "attn_pooler_heads": 2}}


@pytest.fixture(scope="module")
def coca(tmp_path_factory):
    """(seeded model, its weights file): architecture coca-test-tiny (and coca-test-wide, another shape)."""
    root = tmp_path_factory.mktemp("coca")
    for name, width in (("coca-test-tiny", 32), ("coca-test-wide", 48)):
        (root / f"{name}.json").write_text(json.dumps(tiny_coca(width)))
    open_clip.add_model_config(root)
    torch.manual_seed(0)
    model = open_clip.create_model("coca-test-tiny").eval()
    projection = model.text_decoder.text_projection  # open_clip starts it at zero: every token equally likely
    with torch.no_grad():
        torch.nn.init.normal_(projection, std=projection.shape[0] ** -0.5)
        projection[:, EOT] *= 6  # a large end-token logit for some states only: captions end at different lengths
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "coca.safetensors"))
    return model, root / "coca.safetensors"


@pytest.fixture
def images(tmp_path):
    return make_image_shards(tmp_path / "data", [3, 2])


def settings(weights, **coca) -> dict:
    return {"study": "t", "captions": {"source": "coca", "file": None, "coca": {
        "model": "coca-test-tiny", "weights": str(weights), "batch_size": 2, "max_length": MAX_LENGTH,
        "min_length": MIN_LENGTH, "threads": 1, "workers": 0, **coca}}}


def run_stage(tmp_path, cfg, name="captions"):
    out = tmp_path / name
    out.mkdir()
    return out, build_captions(cfg, tmp_path / "data", tmp_path / "staging", out)


def written(out) -> list[tuple[str, str, str]]:
    side = open_shards(out / "captions.json")
    return [(side[i]["__key__"], side[i][".txt"].getvalue().decode(), side[i][".source.txt"].getvalue().decode())
            for i in range(len(side))]


def reference(model, images, monkeypatch) -> tuple[dict[str, str], list[int]]:
    """open_clip's CoCa.generate, greedy (top_k=1), on the images as the stage decodes them. open_clip 3.3.0
    switches generate off when transformers lacks BeamSearchScorer (gone in transformers 5), though its top-k path
    uses only logits processors transformers 5 still has: the test switches that path back on as its reference."""
    monkeypatch.setattr(coca_model, "_has_transformers", True)
    monkeypatch.setitem(coca_model.GENERATION_TYPES, "top_k", transformers.TopKLogitsWarper)
    _, _, transform = open_clip.create_model_and_transforms("coca-test-tiny")
    batch = torch.stack([transform(img) for img in images.values()])
    ids = model.generate(batch, generation_type="top_k", top_k=1, seq_len=MAX_LENGTH, min_seq_len=MIN_LENGTH)
    texts = [open_clip.decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "").strip() for row in ids]
    return dict(zip(images, texts, strict=True)), [row.index(EOT) + 1 for row in ids.tolist()]


def test_the_stage_writes_open_clips_greedy_captions_keyed_like_the_images(tmp_path, images, coca, monkeypatch):
    model, weights = coca
    expected, lengths = reference(model, images, monkeypatch)
    # some captions end by their end token, some at the length cap; they differ between images
    assert MIN_LENGTH < min(lengths) < max(lengths) == MAX_LENGTH and len(set(expected.values())) > 1, expected

    out, stats = run_stage(tmp_path, settings(weights))
    assert written(out) == [(key, expected[key], "synthetic") for key in images]
    assert read_json(out / "captions.json")["shardlist"] == [{"url": "captions/00000.tar", "nsamples": 3},
                                                              {"url": "captions/00001.tar", "nsamples": 2}]
    assert stats == read_json(out / "coverage.json")
    assert stats.pop("images_per_s") > 0
    assert stats == {"source": "coca", "model": "coca-test-tiny", "weights": str(weights),
                     "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "max_length": MAX_LENGTH,
                     "min_length": MIN_LENGTH, "device": "cpu", "images": 5, "covered": 5, "missing": 0,
                     "coverage": 1.0}


class Killed(Exception):
    """The job's end, part-way through the second shard."""


def test_a_killed_run_resumes_from_its_finished_shards(tmp_path, images, coca, monkeypatch):
    _, weights = coca
    full, _ = run_stage(tmp_path, settings(weights), "uninterrupted")
    captioned, real, kill = [], captioner.caption_images, [True]

    def counting(model, tokenizer, batch, cfg):
        captioned.append(len(batch))
        if kill[0] and sum(captioned) > 3:  # the second shard's first batch
            raise Killed
        return real(model, tokenizer, batch, cfg)

    monkeypatch.setattr(captioner, "caption_images", counting)
    for attempt, cfg in enumerate((settings(weights), settings(weights, min_length=4))):
        kill[0] = True
        captioned.clear()
        with pytest.raises(Killed):
            run_stage(tmp_path, settings(weights), f"killed-{attempt}")
        assert sorted(p.name for p in (tmp_path / "staging").glob("*.tar")) == ["00000.tar"]
        kill[0] = False
        captioned.clear()
        out, stats = run_stage(tmp_path, cfg, f"rerun-{attempt}")
        if attempt == 0:  # the same settings: only the unfinished shard is captioned, and the result is the same
            assert captioned == [2]
            assert written(out) == written(full) and stats["covered"] == 5
        else:  # other decoding settings: the staged shard is not reused
            assert captioned == [2, 1, 2]


def test_an_empty_caption_leaves_the_raw_one_and_counts_as_missing(tmp_path, images, coca, monkeypatch):
    real, blanked = captioner.caption_images, []

    def first_blank(model, tokenizer, batch, cfg):
        texts = real(model, tokenizer, batch, cfg)
        if not blanked:  # the first image of the stage decodes to nothing
            blanked.append(texts[0])
            texts[0] = ""
        return texts

    monkeypatch.setattr(captioner, "caption_images", first_blank)
    out, stats = run_stage(tmp_path, settings(coca[1]))
    rows = written(out)
    assert rows[0] == ("000000000", "a caption of 000000000", "raw")
    assert all(source == "synthetic" for _, _, source in rows[1:])
    assert (stats["covered"], stats["missing"], stats["coverage"]) == (4, 1, 0.8)


def test_missing_weights_are_one_error_naming_the_file_and_where_to_get_it(tmp_path, images):
    cfg = settings(tmp_path / "weights" / "coca.bin", model="coca_ViT-L-14")
    with pytest.raises(FileNotFoundError) as err:
        run_stage(tmp_path, cfg)
    message = str(err.value)
    assert message.startswith(f"captions.coca.weights: CoCa weights file '{tmp_path}/weights/coca.bin' not found.")
    assert "'laion/mscoco_finetuned_CoCa-ViT-L-14-laion2B-s13B-b90k'" in message
    assert "tag mscoco_finetuned_laion2b_s13b_b90k" in message and "set captions.coca.weights" in message
    assert not (tmp_path / "staging").exists()


@pytest.mark.parametrize(("model", "error"), [
    ("coca-test-wide", r"captions.coca.weights: .*coca.safetensors does not hold coca-test-wide weights"),
    ("RN50", r"captions.coca.model: 'RN50' is not a CoCa architecture \(open_clip's: .*coca_ViT-L-14"),
    ("coca-nothing", r"captions.coca.model: 'coca-nothing' is not an open_clip architecture"),
])
def test_weights_of_another_architecture_are_refused_naming_the_key(tmp_path, images, coca, model, error):
    with pytest.raises(ValueError, match=error):
        run_stage(tmp_path, settings(coca[1], model=model))
