"""Quality benchmark: the SASRec protocol on a real dataset, attnrec against its baselines.

    python bench/quality.py --dataset ml-1m

Leave-one-out split, ranking over ALL items, items the user already saw excluded, metrics
averaged over every user (the protocol of ../shared/data/README.md). Prints HR@10 / NDCG@10
on the test split for most-popular, item-kNN, attnrec without content (pure-ID SASRec) and
attnrec with content, with training time and epochs; checkpoints are chosen on validation.
The variants ``hashed``, ``minilm`` and ``notext`` are attnrec with content and one text
encoder each (hashed words, frozen MiniLM sentence vectors, no text). ``rows`` is attnrec
with content whose item tables AdamW updates only in the rows a step read
(``train.table_updates=rows``; needs a sampled softmax: ``--set train.negatives=N``). With
``--cold-item-fraction F`` a share of the items is held out of training and a cold-start
table follows: those targets' NDCG@10 in the whole catalogue and among the held-out items.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.config import load_settings  # noqa: E402
from pipeline.data.catalog import ingest_items  # noqa: E402
from pipeline.data.feature_store import build_feature_set, load_feature_set  # noqa: E402
from pipeline.data.ingest import IngestOptions, ingest_paths  # noqa: E402
from pipeline.data.warehouse import connect  # noqa: E402
from pipeline.training.evaluation import evaluation_report  # noqa: E402
from pipeline.training.loop import resolve_device  # noqa: E402
from pipeline.training.data_defaults import fit_model  # noqa: E402
from pipeline.training.recipe import baseline_model, SasrecScorer, train_sasrec  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
DATASETS = {
    "ml-1m": {"events": ["ml-1m/ml-1m.txt"], "items": [("ml-1m/movies.dat", "ml-1m/sas_to_original_items.txt")]},
    "ml-100k": {"events": ["ml-100k/u.data"], "items": [("ml-100k/u.item", None)]},
    "ml-latest-small": {"events": ["ml-latest-small/ratings.csv"],
                        "items": [("ml-latest-small/movies.csv", None), ("ml-latest-small/tags.csv", None)]},
    "amazon-toys": {"events": ["amazon-toys/Toys_and_Games.txt"],
                    "items": [("amazon-toys/Toys_and_Games_item2attributes.json", None)]},
}
# variant -> (name in the tables, settings it sets)
ATTNREC_VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "id": ("no content, pure ID", {"model.use_content": False}),
    "content": ("with content", {"model.use_content": True}),
    "hashed": ("content, hashed words", {"model.use_content": True, "model.text_encoder": "hashed"}),
    "minilm": ("content, MiniLM sentence vectors", {"model.use_content": True, "model.text_encoder": "minilm"}),
    "notext": ("content without text", {"model.use_content": True, "model.text_encoder": "none"}),
    "rows": ("with content, item tables updated row by row", {"model.use_content": True, "train.table_updates": "rows"}),
}
PUBLISHED_ML1M = [
    ("SASRec, full cross-entropy (SASRec+)", 0.3152, 0.1821),
    ("SASRec, sampled CE, 3,000 negatives", 0.3159, 0.1857),
    ("BERT4Rec", 0.2843, 0.1537),
    ("gSASRec (gBCE, 256 negatives)", 0.3003, 0.1726),
]


def machine() -> str:
    cpu = platform.processor() or "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``--set KEY=VALUE`` items as settings overrides (numbers, booleans and lists parsed as JSON)."""
    out: dict[str, object] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = json.loads(value) if value[:1] in "0123456789-[{tf" and value not in ("t", "f") else value
    return out


def prepare(home: Path, dataset: str, overrides: dict[str, object]) -> None:
    """Ingest the dataset and its item content into a fresh state folder, build LOO features."""
    spec = DATASETS[dataset]
    settings = load_settings(home=home, **overrides)
    con = connect(settings.duckdb_path)
    try:
        ingest_paths(con, [DATA / p for p in spec["events"]], IngestOptions(), settings.tmp_dir)
        for item_file, id_map in spec["items"]:
            ingest_items(con, DATA / item_file, id_map=DATA / id_map if id_map else None)
        build_feature_set(con, settings)
    finally:
        con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="ml-1m")
    ap.add_argument("--variants", default="popularity,itemknn,id,content",
                    help="comma list of popularity, itemknn, id (attnrec without content), content (attnrec), "
                         "hashed, minilm, notext (attnrec with content and that text encoder), rows (content, "
                         "row-wise table updates)")
    ap.add_argument("--cold-item-fraction", type=float, default=None,
                    help="hold this share of the items out of training (a new state folder) for the cold-start table")
    ap.add_argument("--home", type=Path, default=None, help="state folder (default: bench/out/quality-DATASET)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=None, help="override the maximum epochs (default: attnrec's)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override any setting, e.g. --set model.dropout=0.3 (repeatable)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                    help="continue an interrupted attnrec run from RUN_DIR/checkpoint.pt (one attnrec variant only)")
    args = ap.parse_args()

    home = (args.home or ROOT / "bench" / "out" / f"quality-{args.dataset}").resolve()
    print(f"command: python bench/quality.py {shlex.join(sys.argv[1:])}")
    print(f"machine: {machine()}")
    print(f"protocol: leave-one-out, full ranking over all items, seen items excluded, all users; state {home}")
    overrides: dict[str, object] = {"device": args.device}
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.seed is not None:
        overrides["train.seed"] = args.seed
    overrides.update(parse_overrides(args.set))
    if args.cold_item_fraction is not None:
        overrides["features.cold_item_fraction"] = args.cold_item_fraction

    if not (home / "features" / "CURRENT").exists():
        t = time.perf_counter()
        prepare(home, args.dataset, overrides)
        print(f"prepared {args.dataset} in {time.perf_counter() - t:.1f} s")
    settings = load_settings(home=home, **overrides)
    fs = load_feature_set(home / "features" / (home / "features" / "CURRENT").read_text().strip())
    device = resolve_device(settings.device)
    print(f"dataset: {fs.num_users:,} users, {fs.num_items:,} items, {fs.manifest['counts']['events']:,} events; device {device}")

    if args.resume and sum(v in ATTNREC_VARIANTS for v in args.variants.split(",")) != 1:
        raise SystemExit(f"--resume continues one attnrec run: pass exactly one of --variants {' / '.join(ATTNREC_VARIANTS)}")
    rows = []
    for variant in args.variants.split(","):
        t = time.perf_counter()
        if variant in ("popularity", "itemknn"):
            model = baseline_model(variant, fs).to(device)
            fit_s = time.perf_counter() - t
            report = evaluation_report(model, fs, "test", fit_model(settings.model, fs)[0].max_len, device, ks=(10,))
            rows.append({"model": variant, "hr@10": report["hr@10"], "ndcg@10": report["ndcg@10"],
                         "train_s": round(fit_s, 1), "epochs": None, "best_epoch": None, "cold_start": report.get("cold_start")})
        elif variant in ATTNREC_VARIANTS:
            s = load_settings(home=home, **{**overrides, **ATTNREC_VARIANTS[variant][1]})

            def log(rec: object, name: str = variant) -> None:
                v = getattr(rec, "valid", {}).get("ndcg@10")
                print(f"  [{name}] epoch {rec.epoch:3d} loss {rec.loss:.4f} {rec.samples_per_s:,.0f} seq/s {rec.seconds:.1f} s"
                      + (f" valid ndcg@10 {v:.4f}" if v is not None else ""), flush=True)

            outcome = train_sasrec(s, fs, run_dir=args.resume, resume=args.resume is not None, progress=False, on_epoch=log,
                                   note=print)
            train_s = sum(h.seconds + (h.valid_seconds or 0.0) for h in outcome.fit.history)
            report = evaluation_report(SasrecScorer(outcome.model), fs, "test", outcome.model.max_len, device, ks=(10,))
            rows.append({"model": f"attnrec ({ATTNREC_VARIANTS[variant][0]})",
                         "hr@10": report["hr@10"], "ndcg@10": report["ndcg@10"], "valid_ndcg@10": outcome.valid["ndcg@10"],
                         "train_s": round(train_s, 1), "epochs": outcome.fit.epochs_run,
                         "best_epoch": outcome.fit.best_epoch, "run_dir": str(outcome.run_dir),
                         "cold_start": report.get("cold_start")})
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        r = rows[-1]
        print(f"{r['model']}: test HR@10 {r['hr@10']:.4f} NDCG@10 {r['ndcg@10']:.4f} ({r['train_s']} s)", flush=True)

    print()
    print("| model | HR@10 | NDCG@10 | train time (s) | epochs (best) |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        ep = f"{r['epochs']} ({r['best_epoch']})" if r["epochs"] else "-"
        print(f"| {r['model']} | {r['hr@10']:.4f} | {r['ndcg@10']:.4f} | {r['train_s']} | {ep} |")
    if args.dataset == "ml-1m":
        for name, hr, ndcg in PUBLISHED_ML1M:
            print(f"| published: {name} | {hr:.4f} | {ndcg:.4f} | | |")
    if any(r["cold_start"] for r in rows):
        users = next(r["cold_start"]["users"] for r in rows if r["cold_start"])
        print(f"\ncold start: {users} test targets among {fs.manifest['counts']['cold_items']:,} items held out of training")
        print("| model | NDCG@10, whole catalogue | HR@10, whole catalogue | NDCG@10 among held-out | HR@10 among held-out |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            c = r["cold_start"] or {}
            h = c.get("among_held_out", {})
            print(f"| {r['model']} | {c.get('ndcg@10', 0):.4f} | {c.get('hr@10', 0):.4f} | {h.get('ndcg@10', 0):.4f} | {h.get('hr@10', 0):.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"dataset": args.dataset, "machine": machine(), "command": sys.argv, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
