"""Train every experiment (or the ones named) and print its key val metrics.

    python benchmarks/recipes.py                      # all of src/polymodal/conf/experiment/
    python benchmarks/recipes.py itm mlm trainer.max_steps=200   # names, then overrides

Each run is a real `polymodal.train` process (CSV logger, no wandb) writing to
logs/recipes/<experiment>; the table shows the metrics each objective is judged by, the
first and last validation loss, and the wall time. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from polymodal.utils.cli import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {
    "zeroshot/shape_acc": "shape",
    "zeroshot/color_acc": "colour",
    "retrieval/i2t_r1": "i2t R@1",
    "retrieval/i2t_r1_reranked": "i2t R@1 ITM",
    "itm/acc_balanced": "ITM acc",
    "mlm/word_acc": "MLM word",
    "mlm/word_acc_shuffled_image": "MLM word (shuffled img)",
    "caption/attribute_match": "caption attr",
    "caption/bleu4": "BLEU-4",
    "caption/cider": "CIDEr",
    # sounds (clap_sounds, audio_captioner) and spoken (asr_spoken)
    "zeroshot/sound_acc": "sound",
    "zeroshot/pitch_acc": "pitch",
    "zeroshot/count_acc": "count",
    "zeroshot/duration_acc": "duration",
    "zeroshot/loudness_acc": "loudness",
    "retrieval/i2t_r5": "i2t R@5",
    "retrieval/t2i_r5": "t2i R@5",
    "caption/wer": "WER",
    "lm/perplexity": "perplexity",  # lm_shapes
}


def first_and_last(csv_path: Path, key: str) -> tuple[float, float] | None:
    with open(csv_path) as f:
        values = [float(r[key]) for r in csv.DictReader(f) if r.get(key)]
    return (values[0], values[-1]) if values else None


def run(experiment: str, overrides: list[str]) -> dict:
    out = ROOT / "logs" / "recipes" / experiment
    cmd = [
        sys.executable,
        "-m",
        "polymodal.train",
        f"experiment={experiment}",
        "logger=csv",
        "~callbacks.rich_progress_bar",
        f"hydra.run.dir={out}",
        *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"experiment": experiment, "error": proc.returncode, "seconds": seconds}
    metrics = json.loads((out / "metrics.json").read_text())
    row = {"experiment": experiment, "seconds": seconds, "steps": metrics["train/global_step"]}
    row.update({name: metrics.get(f"val/{key}") for key, name in COLUMNS.items()})
    for key in ("val/mim/loss", "val/loss"):
        span = first_and_last(out / "csv" / "metrics.csv", key)
        if span:
            row[f"{key} first->last"] = f"{span[0]:.3f}->{span[1]:.3f}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", help="experiment names, then key=value overrides")
    args = parser.parse_args().args
    names = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    names = names or sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
    rows = [run(name, overrides) for name in names]
    keys = [k for k in rows[0] if k != "experiment"]
    keys += [k for r in rows for k in r if k not in keys and k != "experiment"]
    print("| experiment | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key)
            cells.append(f"{value:.3f}" if isinstance(value, float) else str(value or ""))
        print(f"| {row['experiment']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
