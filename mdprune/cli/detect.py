"""``mdprune detect``: detectors (inspect, validate the latency model, prune + fine-tune, evaluate, export)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import human, parse_kv


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("detect", help="prune a torchvision detector to a whole-detector latency budget (mAP)",
                       description="Detectors: the budget is on end-to-end latency (transform, backbone, neck, "
                                   "heads, post-processing) at --image-size and --batch; see docs/detection.md.")
    dsub = p.add_subparsers(dest="detect_command", required=True, metavar="ACTION")
    for name, fn, text in (("inspect", _inspect, "what can be pruned in a detector"),
                           ("validate", _validate, "predicted vs measured end-to-end latency of random slim "
                                                   "detectors"),
                           ("prune", _prune, "prune to a latency budget, fine-tune, report mAP and latency"),
                           ("eval", _eval, "mAP of a saved pruned detector"),
                           ("export", _export, "ONNX of a saved pruned detector's core (backbone, neck, heads)")):
        q = dsub.add_parser(name, help=text, description=text)
        if name in ("eval", "export"):
            q.add_argument("model", help="a detector file written by `mdprune detect prune` (model.pt)")
            q.add_argument("--trust-code", action="store_true", help="allow a package.module:function builder")
        else:
            q.add_argument("model", help="torchvision detector name (ssdlite320_mobilenet_v3_large, ...) or "
                                         "package.module:function")
            q.add_argument("--num-classes", type=int, default=None,
                           help="classes with the background (default: the data's, else 91)")
            q.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", type=parse_kv)
            q.add_argument("--checkpoint", default=None, help="state_dict of the trained detector")
            q.add_argument("--ignore", action="append", default=[], metavar="MODULE", help="keep a module whole")
        q.add_argument("--image-size", type=int, default=320, help="square image size (default 320)")
        q.add_argument("--batch", type=int, default=1, help="latency batch (default 1)")
        q.add_argument("--task", default="detection", choices=["detection"], help="the task (detection)")
        q.add_argument("--data", default="generated", help="generated[:N], coco:IMAGES:ANNOTATIONS or voc:ROOT")
        q.add_argument("--val-data", default=None, help="evaluation data (default: the val split of --data)")
        q.add_argument("--backend", default="eager", help="latency backend (eager, flops, onnxruntime)")
        q.add_argument("--lut", default=None, help="latency table file or cache directory")
        q.add_argument("--device", default="cpu")
        q.set_defaults(func=fn)
        if name in ("validate", "prune"):
            q.add_argument("--timing-images", default="data", choices=["data", "random"],
                           help="what latency is measured on: the first --batch images of the evaluation data "
                                "(default: post-processing then costs what real detections make it cost) or "
                                "random images")
        if name == "validate":
            q.add_argument("--samples", type=int, default=5, help="random plans (default 5)")
        if name == "prune":
            q.add_argument("--budget", default="50%", help="'50%%' of the dense detector's latency, or ms")
            q.add_argument("--schedule", default="oneshot", choices=["oneshot", "iterative"])
            q.add_argument("--steps", type=int, default=3)
            q.add_argument("--every", type=int, default=8, help="training batches between iterative steps")
            q.add_argument("--importance-batches", type=int, default=8)
            q.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs (0: none)")
            q.add_argument("--lr", type=float, default=0.01)
            q.add_argument("--distill", type=float, default=1.0, metavar="WEIGHT",
                           help="while training (fine-tuning, the iterative schedule), match the dense detector's "
                                "raw head outputs with this weight "
                                "(default 1; 0: the loss dict only). Keeps the pruned detector as sure of the "
                                "background as the dense one, so its post-processing stays as fast")
            q.add_argument("--batch-size", type=int, default=8)
            q.add_argument("--out", default="runs/detect", help="run directory (model.pt, report.json)")
        if name == "export":
            q.add_argument("--out", required=True, help="the .onnx file")


def _settings(args: argparse.Namespace) -> Any:
    from ..latency import LatencySettings

    return LatencySettings(device=args.device, batch=args.batch, backend=args.backend)


def _detector(args: argparse.Namespace, num_classes: int | None = None) -> Any:
    from ..detection import create_detector
    from ..models import load_checkpoint

    det = create_detector(args.model, num_classes=args.num_classes or num_classes or 91, image_size=args.image_size,
                          **dict(args.model_arg))
    if args.checkpoint:
        load_checkpoint(det, args.checkpoint)
    return det.eval()


def _space(args: argparse.Namespace, det: Any) -> Any:
    import torch

    from ..detection import analyze_detector

    return analyze_detector(det, torch.zeros(1, 3, args.image_size, args.image_size), ignored_layers=args.ignore)


def _inspect(args: argparse.Namespace) -> int:
    space = _space(args, _detector(args))
    s = space.summary()
    print(f"{args.model} at {args.image_size}x{args.image_size}: params {human(s['params'])}, core MACs "
          f"{human(s['macs'])}; {s['prunable_dimensions']} prunable dimensions of {s['dimensions']}, "
          f"{s['removable_blocks']} removable blocks")
    for d in space.dims.values():
        print(f"  {d.name:60s} {d.size:5d} {'kept: ' + d.protected if d.protected else 'step ' + str(d.step)}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from ..detection import validate_detector
    from ..latency import open_table, random_plans

    det = _detector(args)
    space = _space(args, det)
    settings = _settings(args)
    images = None
    if args.timing_images == "data":
        from ..detection.data import open_detection_data

        images = _timing_images(args, open_detection_data(args.val_data or args.data, args.image_size, "val"))
    v = validate_detector(det, space, open_table(settings, args.lut), settings,
                          random_plans(space, args.samples), progress=True, images=images)
    print(json.dumps({**v.summary(), "fixed_ms": v.fixed_ms}, indent=1))
    return 0


def _data(args: argparse.Namespace, need: set[str] = frozenset()) -> tuple[Any, Any]:
    from ..detection.data import open_detection_data

    kw = {"with_masks": "masks" in need, "with_keypoints": "keypoints" in need}
    train = open_detection_data(args.data, args.image_size, "train", **kw)
    val = open_detection_data(args.val_data or args.data, args.image_size, "val", **kw)
    return train, val


def _timing_images(args: argparse.Namespace, val: Any) -> Any:
    from ..detection.data import loader
    from ..detection.latency import timing_images

    return timing_images(loader(val, args.batch)(), args.batch, args.image_size)


def _prune(args: argparse.Namespace) -> int:
    from ..detection import finetune, prune_detector, save_detector
    from ..detection.data import loader
    from ..detection.distill import check_weight
    from ..detection.latency import measure_detector_ratio
    from ..detection.metric import evaluate_map
    from ..detection.prune import required_targets
    from ..report.detection import write_detection_report

    check_weight(args.distill)  # before any data is read
    train, val = _data(args)
    det = _detector(args, train.num_classes)
    if required_targets(det):  # Mask / Keypoint R-CNN: read the masks or keypoints too
        train, val = _data(args, required_targets(det))
    data = loader(train, args.batch_size, shuffle=True)
    val_batches = loader(val, args.batch_size)
    before = evaluate_map(det, val_batches(), args.device)
    images = _timing_images(args, val) if args.timing_images == "data" else "random"
    slim, report = prune_detector(det, args.image_size, args.budget, data=data, settings=_settings(args),
                                  lut=args.lut, ignored_layers=args.ignore, schedule=args.schedule, steps=args.steps,
                                  every=args.every, importance_batches=args.importance_batches, lr=args.lr,
                                  distill=args.distill, timing_images=images, device=args.device, log=print)
    after_slim = evaluate_map(slim, val_batches(), args.device)
    finetune(slim, data, args.epochs, args.lr, args.device, log=print, teacher=det, distill=args.distill)
    after = evaluate_map(slim, val_batches(), args.device)
    # the fine-tuned detector with its own detections: post-processing follows its confidence (docs/detection.md)
    r = measure_detector_ratio(slim, det, args.image_size, _settings(args),
                               images=None if isinstance(images, str) else images)
    final = {"fraction": r.ratio, "low": r.low, "high": r.high, "ms": r.a_ms, "dense_ms": r.b_ms}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_detector(slim, out / "model.pt")
    result = {"model": args.model, "budget": args.budget, "image_size": args.image_size, "batch": args.batch,
              "schedule": args.schedule, "distill": args.distill,
              "map": {"dense": before, "slim": after_slim, "finetuned": after},
              "finetuned_latency": final, "prune": report.to_dict()}
    write_detection_report(result, out)
    print(report.summary())
    print(f"fine-tuned: measured {100 * r.ratio:.1f}% [{100 * r.low:.1f}-{100 * r.high:.1f}] of the dense detector's "
          "latency (same run, each with its own detections)")
    print(f"mAP@[.5:.95] dense {before['map']:.4f}, slim {after_slim['map']:.4f}, fine-tuned {after['map']:.4f} "
          f"(mAP@.5 {before['map_50']:.4f} / {after_slim['map_50']:.4f} / {after['map_50']:.4f}); written to {out} "
          "(model.pt, report.md, report.json)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..detection import load_detector
    from ..detection.data import loader, open_detection_data
    from ..detection.metric import evaluate_map

    det = load_detector(args.model, trust_code=args.trust_code)
    size = det._mdprune_detection["image_size"]
    val = open_detection_data(args.val_data or args.data, size, "val")
    print(json.dumps(evaluate_map(det, loader(val, 8)(), args.device)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..detection import export_detector_onnx, load_detector

    det = load_detector(args.model, trust_code=args.trust_code)
    path = export_detector_onnx(det, det._mdprune_detection["image_size"], args.out, batch=args.batch)
    print(f"wrote {path} (backbone, neck and heads; post-processing: see docs/detection.md)")
    return 0
