"""The README's first command: continued pretraining in miniature on this CPU, nothing downloaded.

    python recipes/demo.py [--out demo_output] [--docs 300]

Stages: demo corpora (listings and reviews in several languages, general text) -> a tiny tokenizer
trained on them (standing in for Meta's) -> Megatron indexed datasets with manifests
(the same code as tools/preprocess_data.py) -> the blend planned from conf/data/demo_blend.yaml
(the paper's 1:1 mix) -> a tiny Llama 3.1-shaped continued-pretraining run through recipes/cpt.py
with a general and an e-commerce validation loss. Each run starts clean in --out.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = {"listings": "listing", "reviews": "review", "general_en": "plain", "general_multilingual": "plain"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="folder for everything the demo makes (emptied first)")
    parser.add_argument("--docs", type=int, default=300, help="documents per demo corpus")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for recipes/cpt.py")
    opts = parser.parse_args()

    from ellama_megatron.data.demo_corpora import write_demo_corpora
    from ellama_megatron.data.preprocess import PreprocessOptions, preprocess
    from ellama_megatron.data.serializers import RecordSerializer, load_template
    from ellama_megatron.engine.train_log import compact_line, parse_train_log
    from ellama_megatron.tiny_llama import train_tiny_tokenizer

    out = Path(opts.out).resolve()
    if out.exists():
        print(f"removing the previous demo in {out}")
        shutil.rmtree(out)
    timings = []

    def stage(name, fn):
        print(f"== {name}", flush=True)
        start = time.time()
        result = fn()
        timings.append((name, time.time() - start))
        return result

    raw = stage("demo corpora", lambda: write_demo_corpora(out / "raw", docs=opts.docs, seed=0))
    texts = [line for p in raw.values() for line in p.read_text(encoding="utf-8").splitlines()]
    tok = stage("tiny tokenizer", lambda: train_tiny_tokenizer(texts, out / "tokenizer", vocab_size=512))

    def preprocess_all():
        for name, path in raw.items():
            serializer = RecordSerializer(load_template(TEMPLATES[name]), id_key="id")
            preprocess(PreprocessOptions([str(path)], str(out / "data" / name), str(tok), serializer,
                                         valid_fraction=0.1, progress=True))

    stage("preprocess into Megatron datasets", preprocess_all)
    cmd = [sys.executable, str(REPO / "recipes" / "cpt.py"), f"run_dir={out / 'run'}", "data=demo_blend",
           f"data.root={out / 'data'}", "optim.lr=2e-3", "optim.min_lr=2e-4", *opts.overrides]
    log_path = out / "train.log"

    def train():
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for line in proc.stdout:
                log_file.write(line)
                short = compact_line(line)
                if short or line.startswith(("model ", "world size", "error")):
                    print(short or line.rstrip(), flush=True)
            return proc.wait()

    code = stage("continued pretraining (recipes/cpt.py, 2 CPU ranks)", train)
    if code:
        print(f"training failed (exit {code}); see {log_path}", file=sys.stderr)
        return code
    log = parse_train_log(log_path.read_text())
    for name, seconds in timings:
        print(f"{name:55s} {seconds:6.1f} s")
    first, last = log.train_loss[1], log.train_loss[log.last_iteration]
    valid = ", ".join(f"{d} {min(l)}->{max(l)}: {l[min(l)]:.3f} -> {l[max(l)]:.3f}" for d, l in log.valid_loss.items())
    print(f"demo done: {log.last_iteration} iterations, train loss {first:.3f} -> {last:.3f}; validation {valid}; "
          f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
