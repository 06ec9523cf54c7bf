"""Dataset conversion benchmark: ``streamconv data preprocess`` against MindSpeed-style whole-file processing,
both measured in the same run, as child processes under ``/usr/bin/time -v`` (wall time, peak RSS).

    python -m benchmarks.data                       # corpora of 30 MB and 120 MB of text (~5 min on 2 cores)
    python -m benchmarks.data --sizes 20MB --smoke  # tiny: checks the harness, not the speed

A synthetic enwiki-like corpus (Zipf-distributed words, rows of ~3 kB, some non-ASCII) is written as parquet
(row groups of 1000 rows), and a 32k byte-level BPE with DeepSeek-V3's special tokens is
trained on a sample of it.  CPU seconds (user + system, of the child and its workers) are recorded too: on a
shared machine they are the load-independent measure of work.  Scenarios per size: streamconv with 1 and 2
workers, the baseline (``benchmarks/data_naive.py``) with 1 worker (a loop) and 2 (a Pool).  Every output is
checked byte-identical to the others.  Results: ``<work-dir>/data_results.json``; docs/performance.md quotes them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import sys
import time

from streamconv.cli.common import parse_size

from .common import run_measured, save_json

SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]


def make_corpus(path: str, text_bytes: int, seed: int = 0) -> dict:
    """Parquet of ~``text_bytes`` of text; returns rows and bytes."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 10))) for _ in range(40000)]
    vocab += ["数据", "转换", "Ünïcödé", "café", "1984", "--", "(", ")", ",", "."]
    nprng = np.random.default_rng(seed)
    writer, rows, done, batch = None, 0, 0, []
    while done < text_bytes:
        n = int(nprng.lognormal(6.0, 0.6))  # words per row, median ~400
        idx = np.minimum(nprng.zipf(1.2, size=n) - 1, len(vocab) - 1)
        text = " ".join(vocab[i] for i in idx)
        batch.append(text)
        done += len(text.encode())
        rows += 1
        if len(batch) == 1000 or done >= text_bytes:
            table = pa.table({"text": pa.array(batch, pa.string())})
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table, row_group_size=1000)
            batch = []
    writer.close()
    return {"rows": rows, "text_bytes": done, "file_bytes": os.path.getsize(path)}


def make_tokenizer(out_dir: str, corpus: str, vocab_size: int = 32000) -> str:
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    sample = pq.ParquetFile(corpus).read_row_group(0).column("text").to_pylist()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single=f"{SPECIALS[0]} $A", special_tokens=[(SPECIALS[0], 0)])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "tokenizer_class": "LlamaTokenizerFast",
                   "bos_token": SPECIALS[0], "eos_token": SPECIALS[1]}, f)
    return out_dir


def _digest(prefix: str) -> str:
    h = hashlib.sha256()
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def _tokens(prefix: str) -> int:
    return os.path.getsize(prefix + ".bin") // 4


def run_case(kind: str, workers: int, corpus: str, tok: str, work: str) -> dict:
    out = os.path.join(work, f"out-{kind}-{workers}")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    prefix = os.path.join(out, "enwiki")
    if kind == "streamconv":
        cmd = [sys.executable, "-m", "streamconv", "data", "preprocess", "--input", corpus,
               "--tokenizer-name-or-path", tok, "--tokenizer-type", "PretrainedFromHF",
               "--handler-name", "GeneralPretrainHandler", "--output-prefix", prefix, "--json-keys", "text",
               "--workers", str(workers), "--log-interval", "0", "--append-eod"]
    else:
        cmd = [sys.executable, "-m", "benchmarks.data_naive", corpus, tok, prefix, str(workers)]
    before, load = resource.getrusage(resource.RUSAGE_CHILDREN), os.getloadavg()[0]
    m = run_measured(cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # this child (and its Pool)
    result = {"kind": kind, "workers": workers, "seconds": m["seconds"], "peak_rss_bytes": m["peak_rss_bytes"],
              "cpu_seconds": cpu, "load_average_before": load,
              "tokens": _tokens(prefix + "_text_document"), "sha256": _digest(prefix + "_text_document")}
    result["tokens_per_second"] = result["tokens"] / m["seconds"]
    result["tokens_per_cpu_second"] = result["tokens"] / max(cpu, 1e-9)
    shutil.rmtree(out, ignore_errors=True)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="30MB,120MB", help="text bytes of the corpora (comma-separated)")
    ap.add_argument("--work-dir", default="bench-out/data")
    ap.add_argument("--smoke", action="store_true", help="tiny corpus and tokenizer: checks the harness only")
    args = ap.parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    results, started = [], time.time()
    # The fixed cost of the CLI before any data work: building the parser imports the checkpoint commands
    # (and torch with them).  Reported so the figures below can be read with and without it.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    startup = run_measured([sys.executable, "-m", "streamconv", "data", "preprocess", "--help"])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    startup = {"seconds": startup["seconds"], "peak_rss_bytes": startup["peak_rss_bytes"],
               "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
    print(f"CLI start-up (streamconv data preprocess --help): {startup['seconds']:.1f} s, "
          f"peak RSS {startup['peak_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    for size in sorted(parse_size(s) for s in args.sizes.split(",")):
        corpus = os.path.join(args.work_dir, f"corpus-{size // 10**6}MB.parquet")
        info = make_corpus(corpus, size)
        tok = make_tokenizer(os.path.join(args.work_dir, "tokenizer"), corpus, 2000 if args.smoke else 32000)
        cases = [run_case(k, w, corpus, tok, args.work_dir)
                 for k, w in (("baseline", 1), ("streamconv", 1), ("baseline", 2), ("streamconv", 2))]
        digests = {c["sha256"] for c in cases}
        base = {c["workers"]: c for c in cases if c["kind"] == "baseline"}
        for c in cases:
            c["speed_vs_baseline_same_workers"] = base[c["workers"]]["seconds"] / c["seconds"]
            c["rss_vs_baseline_same_workers"] = (c["peak_rss_bytes"] / base[c["workers"]]["peak_rss_bytes"]
                                                 if c["peak_rss_bytes"] and base[c["workers"]]["peak_rss_bytes"]
                                                 else None)
            rss = c["peak_rss_bytes"]
            print(f"{info['text_bytes'] / 1e6:6.0f} MB text  {c['kind']:10s} x{c['workers']}  {c['seconds']:6.1f} s  "
                  f"{c['tokens_per_second'] / 1e6:5.2f} Mtok/s  cpu {c['cpu_seconds']:6.1f} s  "
                  f"peak RSS {rss / 2**20 if rss else float('nan'):6.0f} MiB  "
                  f"speed x{c['speed_vs_baseline_same_workers']:.2f} vs baseline", flush=True)
        results.append({"corpus": info, "identical_outputs": len(digests) == 1, "cases": cases})
        if len(digests) != 1:
            print("ERROR: outputs differ between runs", file=sys.stderr)
            return 1
        os.remove(corpus)
    save_json(os.path.join(args.work_dir, "data_results.json"),
              {"started": started, "seconds": time.time() - started, "cpus": os.cpu_count(), "cli_startup": startup,
               "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
