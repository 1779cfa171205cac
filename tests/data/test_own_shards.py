"""Shards written by plain webdataset (no sizes.json, no tokenizer) train and validate by
config alone: polymodal-data count/tokenizer/values, zero-shot class sources, the
checkpoint monitor, and one `polymodal-train` run as a user types it."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from polymodal.data.cli import main as data_cli
from polymodal.data.shardtools import captions, field_values, values_reader
from polymodal.data.tokenizer import TextTokenizer
from polymodal.evaluation.zeroshot import DEFAULT_TEMPLATES, zeroshot_tasks
from polymodal.utils.errors import ConfigError
from polymodal.utils.overrides import replacing
from tests.helpers import compose_train

SHAPES = ["circle", "square", "triangle"]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """myshards/train-00000{0,1}.tar (2 x 24) and val-000000.tar (18), as another tool
    writes them: .jpg, .caption, .cls and .json members, nothing else."""
    root = tmp_path_factory.mktemp("own") / "myshards"
    root.mkdir()
    for split, count in (("train", 48), ("val", 18)):
        with wds.ShardWriter(str(root / f"{split}-%06d.tar"), maxcount=24, verbose=0) as sink:
            for i in range(count):
                shape, color = SHAPES[i % 3], list(COLORS)[i // 3 % 3]
                image = Image.new("RGB", (32, 32), "white")
                image.paste(COLORS[color], (8, 8, 8 + 4 * (i % 3 + 2), 24))
                jpg = io.BytesIO()
                image.save(jpg, format="JPEG")
                sink.write(
                    {
                        "__key__": f"{split}{i:04d}",
                        "jpg": jpg.getvalue(),
                        "caption": f"a {color} {shape}",
                        "cls": SHAPES.index(shape),
                        "json": {"label": shape, "color": color},
                    }
                )
    return root


def test_count_writes_sizes_json_beside_the_shards(shards, tmp_path, capsys):
    copy = tmp_path / "myshards"
    copy.mkdir()
    for shard in shards.glob("*.tar"):
        (copy / shard.name).write_bytes(shard.read_bytes())
    assert data_cli(["count", str(copy / "*.tar")]) == 0
    sizes = json.loads((copy / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 24, "train-000001.tar": 24, "val-000000.tar": 18}
    assert "66 samples in 3 shards" in capsys.readouterr().out


def test_tokenizer_is_trained_on_the_captions(shards, tmp_path):
    out = tmp_path / "tokenizer.json"
    assert data_cli(["tokenizer", str(shards / "train-*.tar"), "--out", str(out)]) == 0
    tokenizer = TextTokenizer(out, context_length=8)
    ids, mask = tokenizer.encode(["a green triangle"])
    assert tokenizer.decode(ids[0]) == "a green triangle" and mask[0].sum() <= 8
    no_txt = ["tokenizer", str(shards / "*.tar"), "--out", str(out), "--text-keys", "txt"]
    assert data_cli(no_txt) == 1


def test_values_lists_a_json_field_or_a_member_with_counts(shards, tmp_path, capsys):
    out = tmp_path / "labels.txt"
    command = ["values", str(shards / "val-*.tar"), "--field", "label", "--out", str(out)]
    assert data_cli(command) == 0
    assert out.read_text() == "circle\nsquare\ntriangle\n"
    assert "       6  circle" in capsys.readouterr().out
    assert data_cli(["values", str(shards / "val-*.tar"), "--field", "cls"]) == 0
    assert "3 distinct 'cls' in 18 samples" in capsys.readouterr().out
    assert data_cli(["values", str(shards / "val-*.tar"), "--field", "nope"]) == 1


def test_zero_shot_class_sources(shards, tmp_path):
    (tmp_path / "names.txt").write_text("circle\nsquare\n\ntriangle\n")
    (tmp_path / "names.json").write_text('["circle", "square"]')
    manifest = {
        "attributes": {"label": ["square", "circle"]},
        "phrases": {"label": {"circle": ["a round one", "a disc"]}},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    values = values_reader(str(shards / "val-*.tar"), "data.val_shards")
    spec = {
        "label": {"classes": str(tmp_path / "names.txt"), "phrases": {"circle": "round"}},
        "color": {"classes": "values", "templates": ["something {}"]},
        "from_list": {"classes": ["a", 2]},
        "from_json": {"classes": str(tmp_path / "names.json")},
    }
    tasks = zeroshot_tasks(spec, "data.zeroshot", values)
    assert tasks["label"].classes == ["circle", "square", "triangle"]
    assert tasks["label"].templates == list(DEFAULT_TEMPLATES)
    assert tasks["label"].phrases == {"circle": "round"}
    assert tasks["color"].classes == ["blue", "green", "red"]  # sorted values of the val json
    assert tasks["color"].templates == ["something {}"]
    assert tasks["from_list"].classes == ["a", "2"]
    assert tasks["from_json"].classes == ["circle", "square"]
    path = str(tmp_path / "manifest.json")
    spec = {"label": {"classes": path, "phrases": path}}
    manifest = zeroshot_tasks(spec, "data.zeroshot", values)
    assert manifest["label"].classes == ["square", "circle"]
    assert manifest["label"].phrases == {"circle": ["a round one", "a disc"]}


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"templates": ["a {}"]}, "data.zeroshot.label.classes: missing"),
        ({"classes": []}, "data.zeroshot.label.classes: no class names"),
        ({"classes": "nothing.txt"}, "data.zeroshot.label.classes: no such file"),
        ({"classes": "values", "typo": 1}, "data.zeroshot.label: unknown key 'typo'"),
        ({"classes": [1], "templates": ["no slot"]}, "data.zeroshot.label.templates"),
        ({"classes": [1], "phrases": "nothing.json"}, "data.zeroshot.label.phrases: expected"),
        ({"classes": [1], "phrases": {"a": []}}, "data.zeroshot.label.phrases.a: words"),
    ],
)
def test_zero_shot_spec_errors_name_the_field(shards, entry, message):
    values = values_reader(str(shards / "val-*.tar"), "data.val_shards")
    with pytest.raises(ConfigError, match=message):
        zeroshot_tasks({"label": entry}, "data.zeroshot", values)


def test_values_of_an_attribute_no_sample_has_is_an_error(shards, tmp_path):
    values = values_reader(str(shards / "val-*.tar"), "data.val_shards")
    with pytest.raises(ConfigError, match="data.zeroshot.shape.classes: no evaluated sample"):
        zeroshot_tasks({"shape": {"classes": "values"}}, "data.zeroshot", values)
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"attributes": {"color": ["red"]}}')
    with pytest.raises(ConfigError, match="data.zeroshot.shape.classes: .* no attributes.shape"):
        zeroshot_tasks({"shape": {"classes": str(manifest)}}, "data.zeroshot", values)


def test_oversized_members_are_left_unread(tmp_path):
    """A hostile shard's 1 MB caption or json is not loaded (the caption limit, 64 KiB)."""
    with wds.TarWriter(str(tmp_path / "big.tar")) as sink:
        sink.write({"__key__": "k0", "txt": "a red circle", "json": {"label": "a"}})
        sink.write({"__key__": "k1", "txt": "x" * 2**20, "json": {"label": "b" * 2**20}})
    assert list(captions([str(tmp_path / "big.tar")], ["txt"])) == ["a red circle"]
    assert field_values([str(tmp_path / "big.tar")], "label") == {"a": 1}


def test_values_of_a_json_that_is_not_an_object_name_the_shard_and_key(tmp_path):
    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "k0", "json": {"label": "a"}})
        sink.write({"__key__": "k1", "json": b"[1, 2]"})
    with pytest.raises(ConfigError, match=r"bad.tar: k1.json: expected a json object, got list"):
        values_reader(str(tmp_path / "bad.tar"), "data.val_shards")("label")


@pytest.mark.parametrize(
    "overrides,monitor,mode",
    [
        (["data.zeroshot.label.classes=values"], "val/zeroshot/mean_acc", "max"),
        ([], "val/retrieval/mean_r1", "max"),
        (["task.evaluation.retrieval=false"], "val/loss", "min"),
        (["data.val_shards=null"], "train/loss", "min"),
        (["optimized_metric=val/retrieval/t2i_mean_rank"], "val/retrieval/t2i_mean_rank", "min"),
    ],
)
def test_checkpoint_monitor_follows_what_the_run_validates(tmp_path, overrides, monitor, mode):
    base = ["data=webdataset", "data.train_shards=a.tar", "data.val_shards=b.tar"]
    cfg = compose_train([*base, "data.tokenizer=t.json", *replacing(overrides)], tmp_path, tmp_path)
    assert cfg.callbacks.model_checkpoint.monitor == monitor
    assert cfg.callbacks.model_checkpoint.mode == mode


def test_zero_shot_override_replaces_the_presets_spec(tmp_path):
    overrides = replacing(["data.zeroshot={label: {classes: values}}"])
    assert overrides == ["data.zeroshot=null", "data.zeroshot={label: {classes: values}}"]
    cfg = compose_train(overrides, tmp_path, tmp_path)  # shapes: shape, color, size, position
    assert list(cfg.data.zeroshot) == ["label"]
    cfg = compose_train(replacing(["data.zeroshot.shape.templates=['a {}']"]), tmp_path, tmp_path)
    assert list(cfg.data.zeroshot.shape.templates) == ["a {}"]
    assert list(cfg.data.zeroshot) == ["shape", "color", "size", "position"]


def test_train_on_plain_webdataset_shards_as_a_user_types_it(shards, tmp_path):
    """The console script in a fresh directory, no sizes.json: counts the shards, trains,
    validates zero-shot (classes from the val json) and retrieval, keeps the best checkpoint."""
    assert not (shards / "sizes.json").exists()
    data_cli(["tokenizer", str(shards / "train-*.tar"), "--out", str(tmp_path / "tok.json")])
    train_pattern = str(shards / "train-{000000..000001}.tar")
    command = [
        str(Path(sys.executable).parent / "polymodal-train"),
        "data=webdataset",
        f"data.train_shards='{train_pattern}'",
        f"data.val_shards={shards}/val-*.tar",
        f"data.tokenizer={tmp_path / 'tok.json'}",
        "data.zeroshot.label.classes=values",
        "data.zeroshot.color.classes=[red,green,blue]",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.image_size=32",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "logger=csv",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (run_dir,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("zeroshot/label_acc", "zeroshot/color_acc", "zeroshot/mean_acc"):
        assert 0 <= metrics[f"val/{key}"] <= 1
    assert 0 <= metrics["val/retrieval/mean_r1"] <= 1 and "val/retrieval/i2t_r1" in metrics
    assert (run_dir / "checkpoints" / "best-step2.ckpt").is_file()
    assert "counted 48 samples from their tar headers" in (run_dir / "train.log").read_text()
