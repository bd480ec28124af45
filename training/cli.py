"""`python -m training prepare|train|evaluate`: the paper's pipeline on data in the RSNA 2019 layout;
`python -m training crossgen`: a checkpoint on phantoms of the independent generator B (training/crossgen.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ihd_node.errors import UserError


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="compact", help="model preset: paper or compact (default compact)")
    p.add_argument("--input-size", type=int, help="override the preset's input size (pixels)")
    p.add_argument("--backbone", help="override the preset's backbone (a torchvision name)")
    p.add_argument("--selector", choices=("pca", "weight_smallest", "weight_largest", "std"),
                   help="override the feature selection method")
    p.add_argument("--selected-dim", type=int, help="override the number of selected features")
    p.add_argument("--input", choices=("slice", "2.5d"), default="slice",
                   help="CNN input: slice = each slice alone, its three windows (the paper, default); 2.5d = "
                        "the slice and --neighbours slices on each side, 3 windows each, as channels")
    p.add_argument("--neighbours", type=int,
                   help="2.5d: slices on each side (default 1: 9 channels); the edge slice is repeated")


def model_config(args: argparse.Namespace):  # -> ModelConfig (import kept lazy)
    from ihd_node.model.presets import BACKBONE_FEATURE_DIMS, get_preset

    config = get_preset(args.preset)
    changes: dict[str, object] = {}
    if args.input_size:
        changes["input_size"] = args.input_size
    if args.backbone:
        if args.backbone not in BACKBONE_FEATURE_DIMS:
            raise UserError(f"--backbone {args.backbone}: not supported; choose from "
                            f"{', '.join(BACKBONE_FEATURE_DIMS)}")
        changes["backbone"] = args.backbone
        changes["feature_dim"] = BACKBONE_FEATURE_DIMS[args.backbone]
    if args.selector:
        changes["selector"] = args.selector
    if args.selected_dim:
        changes["selected_dim"] = args.selected_dim
    if args.input == "2.5d":
        changes["neighbours"] = 1 if args.neighbours is None else args.neighbours
        if changes["neighbours"] < 1:
            raise UserError("--input 2.5d needs --neighbours 1 or more (0 is the single-slice input)")
    elif args.neighbours:
        raise UserError("--neighbours needs --input 2.5d")
    try:
        return config.with_changes(**changes) if changes else config
    except ValueError as exc:
        raise UserError(f"model settings: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="index RSNA-layout data, cache scans at the input size, split by scan")
    p.add_argument("--data", type=Path, required=True,
                   help="folder with stage_2_train.csv and stage_2_train/ (the RSNA 2019 layout)")
    p.add_argument("--csv", type=Path, help="label CSV (default DATA/stage_2_train.csv)")
    p.add_argument("--images", type=Path, help="folder of ID_<sop>.dcm files (default DATA/stage_2_train)")
    p.add_argument("--work", type=Path, required=True,
                   help="work folder for the cache, splits and stage states")
    add_model_args(p)
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of scans for validation (0.05)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="share of scans held out for evaluate")
    p.add_argument("--group-by", choices=("patient", "scan"), default="patient",
                   help="keep all scans of a patient (default; or only the slices of a scan) on one side "
                        "of the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes for reading and decoding DICOM")
    p.add_argument("--max-rejected", type=float, default=0.02,
                   help="fail when more than this share of files is left out (0.02)")
    p.add_argument("--dry-run", action="store_true",
                   help="index the headers, then print scans, slices, cache disk and time; cache nothing")

    p = sub.add_parser("train", help="run the three stages (resumes; finished stages are skipped)")
    p.add_argument("--work", type=Path, required=True)
    add_model_args(p)
    p.add_argument("--stages", default="cnn,features,sequence", help="comma-separated subset, in order")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--weights", help="pretrained backbone: 'imagenet' (torchvision's weights, downloaded "
                                     "once into the torch hub cache) or a local state_dict FILE")
    p.add_argument("--from-scratch", action="store_true",
                   help="random initialisation without --weights (the paper preset refuses it otherwise)")
    p.add_argument("--offline", action="store_true",
                   help="never download: --weights imagenet must already be in the torch hub cache")
    p.add_argument("--weight-reading", choices=("per_class", "summed"), default="per_class",
                   help="weight_smallest/largest selectors: top features per class in turn (paper) or "
                        "by |weight| summed over classes")
    p.add_argument("--epochs", type=int, default=3, help="CNN epochs (paper 3)")
    p.add_argument("--lr", type=float, default=1e-4, help="CNN learning rate, first epochs (paper 1e-4)")
    p.add_argument("--lr-drop-epoch", type=int, default=2, help="epochs at --lr before dropping it (paper 2)")
    p.add_argument("--lr-drop", type=float, default=0.2, help="factor of the later epochs (paper 0.2 = 2e-5)")
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="multiply both learning rates (about 10 from scratch)")
    p.add_argument("--batch-size", type=int, default=32, help="CNN batch (paper 32)")
    p.add_argument("--epoch-size", type=int, help="slices per CNN epoch (default: all training slices)")
    p.add_argument("--positive-share", type=float, default=0.0,
                   help="draw this share of positive slices, spread evenly over subtypes (0 = natural)")
    p.add_argument("--augment", type=float, default=1.0, help="augmentation strength (0 = off)")
    p.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes (4-8 on a GPU machine)")
    p.add_argument("--save-every", type=int, default=0, help="save the CNN state every N steps too")
    p.add_argument("--pca-samples", type=int, default=30000,
                   help="feature vectors for fitting PCA (paper 30k)")
    p.add_argument("--seq-epochs", type=int, default=4, help="BiLSTM epochs (paper 4)")
    p.add_argument("--seq-lr", type=float, default=1e-4, help="BiLSTM learning rate (paper 1e-4)")
    p.add_argument("--seq-batch", type=int, default=1, help="scans per BiLSTM batch (paper 1)")
    p.add_argument("--loss", choices=("eq1", "weighted"), default="eq1",
                   help="eq1: the paper's Eq. 1, BCE summed over the 6 classes (default); weighted: the "
                        "challenge metric (any x2, / 7)")
    p.add_argument("--seq-clip", type=float, default=5.0,
                   help="clip the BiLSTM gradient norm to this (not in the paper; 0 = off)")
    p.add_argument("--threshold-method", choices=("sensitivity", "youden", "f1"), default="sensitivity",
                   help="sensitivity (default): per class the highest threshold keeping the validation "
                        "sensitivity >= --target-sensitivity; youden / f1: maximise J / F1")
    p.add_argument("--target-sensitivity", type=float, default=0.95,
                   help="scan-level sensitivity the thresholds keep on validation (default 0.95)")
    p.add_argument("--min-specificity", type=float, default=0.9,
                   help="floor under the sensitivity policy: raise a threshold until the validation "
                        "specificity is at least this (default 0.9; 0 = no floor)")
    p.add_argument("--calibration", choices=("platt", "none"), default="platt",
                   help="per-class Platt scaling fitted on the validation split, stored in the checkpoint "
                        "and applied by the node (default platt)")
    p.add_argument("--bilstm-features", choices=("in_sample", "oof"), default="in_sample",
                   help="in_sample: the BiLSTM learns from the CNN's outputs on its own training slices (the "
                        "paper); oof: from out-of-fold outputs of --folds CNNs (not in the paper; K more CNN "
                        "trainings; writes WORK/model-oof.pt)")
    p.add_argument("--folds", type=int, default=5, help="folds (CNNs) for --bilstm-features oof (5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="ihd-node")
    p.add_argument("--version", default="0.0.0")
    p.add_argument("--trained-on", default="", help="text for the checkpoint provenance and model card")
    p.add_argument("--out", type=Path,
                   help="checkpoint path (default WORK/model.pt; WORK/model-oof.pt with --bilstm-features oof)")

    p = sub.add_parser("evaluate", help="metrics of a checkpoint on a split or on CQ500; stored in its "
                                         "provenance")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--work", type=Path, help="prepared work folder (with --split)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--cq500", type=Path,
                   help="CQ500 folder (reads.csv + scan folders): external validation, scan level")
    p.add_argument("--max-rejected", type=float, default=0.1,
                   help="CQ500: fail when more than this share of scans cannot be evaluated (0.1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-write", action="store_true", help="only print, leave the checkpoint as it is")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="flip: average with the left-right mirror image (not in the paper; the node does "
                        "not do it); stored as <split>+flip")
    p = sub.add_parser("crossgen", help="per-class AUC, sensitivity/specificity with intervals and calibration "
                                         "on phantoms of generator B (or held-out A), as the node runs the model")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--generator", default="b",
                   help="b (independent, never trained on), a (held-out seeds of the training generator) or a,b")
    p.add_argument("--n", type=int, default=8,
                   help="series per subtype alone (8: 10 negatives + 40 single + 10 pairs = 60 series)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed (another seed, other series)")
    p.add_argument("--size", type=int, help="image size in pixels (default: B 256, A 512)")
    p.add_argument("--out", type=Path, help="write the report as JSON here (a,b: FILE-a.json and FILE-b.json)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--workers", type=int, default=1, help="processes making phantoms (default 1)")
    p.add_argument("--limit", type=int, help="only the first N series of the cohort (smoke tests)")
    return parser


def crossgen(args: argparse.Namespace) -> int:
    from training.crossgen import crossgen_command

    return crossgen_command(args.checkpoint, args.generator, args.n, args.seed, args.size, args.out, args.device,
                            args.workers, args.limit)


def reason_counts(rejected: list[tuple[str, str]]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for _, why in rejected:
        counts[why] = counts.get(why, 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])


def format_reasons(rejected: list[tuple[str, str]]) -> str:
    return "\n".join(f"  {n:>8}  {why}" for why, n in reason_counts(rejected))


def check_rejected(rejected: list[tuple[str, str]], n_files: int, max_share: float) -> None:
    from training.data import DataError

    share = len(rejected) / max(n_files, 1)
    if share > max_share:
        raise DataError(f"{len(rejected)} of {n_files} files ({share:.1%}) were left out, more than "
                        f"--max-rejected {max_share:.1%}; reasons:\n{format_reasons(rejected)}\n"
                        "fix the data (or the --data/--images/--csv paths), or raise --max-rejected")


def prepare_command(args: argparse.Namespace) -> int:
    from training.data import DataError, build_cache, index_rsna, read_rsna_labels, split_groups

    config = model_config(args)
    csv_path = args.csv or args.data / "stage_2_train.csv"
    images = args.images or args.data / "stage_2_train"
    labels = read_rsna_labels(csv_path)
    print(f"{len(labels)} labelled slices in {csv_path}")
    args.work.mkdir(parents=True, exist_ok=True)
    scans, rejected, n_files = index_rsna(images, labels, workers=args.workers,
                                          header_cache=args.work / "headers.jsonl")
    print(f"{n_files} files, {len(scans)} scans")
    if not scans:
        raise DataError(f"{images}: no usable scans among {n_files} files; files left out per reason:\n"
                        + format_reasons(rejected))
    if args.dry_run:
        dry_run_report(args, scans, config.input_size, rejected, n_files)
        check_rejected(rejected, n_files, args.max_rejected)
        return 0
    cached, dropped, reused = build_cache(scans, labels, args.work / "cache", config.input_size,
                                          workers=args.workers)
    rejected = rejected + dropped
    print(f"{len(cached)} scans cached ({reused} reused from an earlier run), "
          f"{sum(s.n_slices for s in cached)} model slices")
    if rejected:
        (args.work / "skipped.txt").write_text("".join(f"{p}\t{why}\n" for p, why in rejected))
        print(f"{len(rejected)} of {n_files} files left out ({args.work / 'skipped.txt'}):\n"
              + format_reasons(rejected))
    if not cached:
        raise DataError(f"no scan could be cached; files left out per reason:\n{format_reasons(rejected)}")
    check_rejected(rejected, n_files, args.max_rejected)
    for scan in cached:
        scan.group = (scan.patient or scan.scan_id) if args.group_by == "patient" else scan.scan_id
    splits = split_groups(cached, args.val_fraction, args.test_fraction, seed=args.seed)
    (args.work / "splits.json").write_text(json.dumps(splits))
    print(f"splits by {args.group_by} (scans): " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    return 0


def dry_run_report(args: argparse.Namespace, scans: list, size: int, rejected: list[tuple[str, str]],
                   n_files: int) -> None:
    """What a full run will take, measured on a few scans: slices, cache disk, time with --workers."""
    import time

    from ihd_node.imaging.volume import VolumeError
    from training.data import windowed_uint8
    from training.rsna import SLAB_MM, load_training_scan

    n_slices = sum(len(s.files) for s in scans)
    sample = scans[:: max(1, len(scans) // 3)][:3]
    started, decoded, model_slices = time.perf_counter(), 0, 0
    for scan in sample:
        try:
            loaded = load_training_scan(scan.files)
        except VolumeError:
            continue
        windowed_uint8(loaded.hu, size)
        decoded += len(scan.files)
        model_slices += loaded.hu.shape[0]
    per_slice = (time.perf_counter() - started) / max(decoded, 1)
    slab_ratio = model_slices / decoded if decoded else 1.0
    disk = n_slices * slab_ratio * 3 * size * size
    hours = n_slices * per_slice / max(args.workers, 1) / 3600
    print(f"dry run: {len(scans)} scans, {n_slices} slices ({len(rejected)} of {n_files} files left out)")
    if rejected:
        print(format_reasons(rejected))
    print(f"cache: about {disk / 1e9:.2f} GB at {size}px in {args.work / 'cache'} "
          f"(3 x {size} x {size} bytes per model slice; thin series become ~{SLAB_MM:g} mm slabs)")
    print(f"time: about {hours * 60:.1f} min with --workers {args.workers} "
          f"({per_slice * 1000:.1f} ms per slice measured on {decoded} slices here; headers are indexed "
          f"already and reused)")


def train_command(args: argparse.Namespace) -> int:
    from training.augment import AugmentConfig
    from training.options import TrainOptions
    from training.run import run_stages
    from training.weights import resolve_weights

    config = model_config(args)
    weights = resolve_weights(args.weights, config.backbone, preset=args.preset,
                              from_scratch=args.from_scratch, download=not args.offline)
    opts = TrainOptions(
        work=args.work, config=config, device=args.device, seed=args.seed, weight_reading=args.weight_reading,
        backbone_weights=weights, cnn_epochs=args.epochs, cnn_lr=args.lr,
        cnn_lr_drop_epoch=args.lr_drop_epoch, cnn_lr_drop=args.lr_drop, lr_scale=args.lr_scale,
        batch_size=args.batch_size, epoch_size=args.epoch_size, positive_share=args.positive_share,
        augment=AugmentConfig(strength=args.augment), amp=not args.no_amp, workers=args.workers,
        save_every=args.save_every, pca_samples=args.pca_samples, seq_epochs=args.seq_epochs,
        seq_lr=args.seq_lr, seq_batch=args.seq_batch, loss=args.loss, seq_clip=args.seq_clip,
        threshold_method=args.threshold_method, target_sensitivity=args.target_sensitivity,
        min_specificity=args.min_specificity,
        calibration=args.calibration, name=args.name,
        bilstm_features=args.bilstm_features, folds=args.folds,
        version=args.version, trained_on=args.trained_on,
    )
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    run_stages(opts, stages, out=args.out)
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    if args.cq500 is not None:
        from training.cq500 import evaluate_cq500

        evaluate_cq500(args.checkpoint, args.cq500, args.device, max_rejected=args.max_rejected,
                       write=not args.no_write, tta=args.tta)
        return 0
    if args.work is None:
        raise UserError("evaluate needs --work WORK (a prepared folder, with --split) or --cq500 DIR")
    from training.evaluate import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.work, args.split, args.device, write=not args.no_write,
                        tta=args.tta)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"prepare": prepare_command, "train": train_command, "evaluate": evaluate_command,
               "crossgen": crossgen}[args.command]
    try:
        return handler(args)
    except UserError as exc:
        print(f"python -m training {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
