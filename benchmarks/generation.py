"""Decoding strategies on a trained captioning run: speed, agreement and quality.

    python benchmarks/generation.py logs/recipes/captioner [--batches 2] [--ckpt PATH]
    python benchmarks/generation.py logs/recipes/asr_spoken     # transcripts: WER

Loads `<run>/.hydra/config.yaml` and `<run>/checkpoints/last.ckpt` (or --ckpt), captions the first
val batches (images or clips: what the decoder attends to) with each strategy, and prints
per strategy: seconds, how often the caption names the right values of the run's
`task.evaluation.match_attributes` (or, with `task.evaluation.wer`, the word error rate
against each sample's own text), the mean sequence log-probability; then whether the
KV-cached tokens equal the recomputed ones and for how many inputs beam search (4 beams)
found a sequence at least as likely as greedy's.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from polymodal.evaluation.captioning import attribute_match_rate, word_error_rate
from polymodal.tasks.pretrain import build_module
from polymodal.utils.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = {
    "greedy": {"strategy": "greedy"},
    "greedy, no cache": {"strategy": "greedy", "use_cache": False},
    "beam 4": {"strategy": "beam", "num_beams": 4, "length_penalty": 0.0},
    "beam 4, no cache": {
        "strategy": "beam",
        "num_beams": 4,
        "length_penalty": 0.0,
        "use_cache": False,
    },
    "top-p 0.9, T 0.7": {"strategy": "sample", "top_p": 0.9, "temperature": 0.7},
}


def load_run(run_dir: Path, ckpt: Path):
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    cfg.paths.output_dir = str(run_dir)
    cfg.paths.root_dir = str(ROOT)  # the saved config refers to the launch dir via ${hydra:}
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    module = build_module(cfg)
    state = read_checkpoint(ckpt)
    module.load_state_dict(state["state_dict"])
    return module.eval(), datamodule, state["global_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--ckpt", type=Path, help="default: <run_dir>/checkpoints/last.ckpt")
    args = parser.parse_args()

    ckpt = args.ckpt or args.run_dir / "checkpoints" / "last.ckpt"
    module, datamodule, step = load_run(args.run_dir, ckpt)
    print(f"checkpoint: {ckpt} (step {step})")
    tok = datamodule.tokenizer
    batches = [b for _, b in zip(range(args.batches), datamodule.val_dataloader(), strict=False)]
    results = {}
    evaluation = module.evaluation_cfg
    wer = evaluation.get("wer", False)
    attributes = evaluation.get("match_attributes", ("color", "shape"))
    quality = "WER" if wer else f"{'+'.join(attributes)} named"
    print(f"| strategy | seconds | {quality} | mean log-prob |")
    print("|---|---:|---:|---:|")
    memory_key = module.model.input_key(module.model.decoder_memory)
    for name, kwargs in STRATEGIES.items():
        torch.manual_seed(0)
        start = time.perf_counter()
        ids, logprobs, texts, metas, references = [], [], [], [], []
        for batch in batches:
            memory = module.model.encode(module.model.decoder_memory, batch[memory_key])
            out_ids, out_lp = module.model.generate(
                memory,
                bos_id=tok.bos_id,
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                max_length=args.max_length,
                **kwargs,
            )
            ids.append(out_ids)
            logprobs.append(out_lp)
            texts += tok.decode_batch(out_ids)
            metas += batch["meta"]
            references += batch["text"]
        seconds = time.perf_counter() - start
        results[name] = (ids, torch.cat(logprobs))
        if wer:
            match = word_error_rate(texts, references)
        else:
            match = attribute_match_rate(texts, metas, attributes)
        print(f"| {name} | {seconds:.2f} | {match:.3f} | {results[name][1].mean():.3f} |")

    same = all(
        torch.equal(a, b)
        for pair in (("greedy", "greedy, no cache"), ("beam 4", "beam 4, no cache"))
        for a, b in zip(results[pair[0]][0], results[pair[1]][0], strict=True)
    )
    beam_ok = (results["beam 4"][1] >= results["greedy"][1] - 1e-5).float()
    print(f"\nKV-cached tokens == recomputed tokens: {same}")
    print(f"beam 4 log-prob >= greedy log-prob: {int(beam_ok.sum())}/{len(beam_ok)} inputs")


if __name__ == "__main__":
    main()
