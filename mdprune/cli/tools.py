"""``mdprune finetune | eval | export | report``: work with saved slim models and finished runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .prune import add_data_args, add_train_args, train_config

if TYPE_CHECKING:
    import torch


def add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="rebuild a model whose file names your own package.module:function builder (this runs "
                        "that code; torchvision, timm and mdprune models never need it)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("finetune", help="fine-tune a saved (slim) model",
                       description="Fine-tune a model saved by mdprune (model.pt of a run) on a data set.")
    f.add_argument("model_file")
    add_trust_arg(f)
    add_data_args(f)
    add_train_args(f, epochs=1)
    f.add_argument("--bn-recalibrate", type=int, default=0, metavar="BATCHES",
                   help="re-estimate BatchNorm statistics on this many batches first")
    f.add_argument("--out", required=True, help="where to save the fine-tuned model")
    f.add_argument("--device", default="cpu")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=run_finetune)

    e = sub.add_parser("eval", help="accuracy (and latency) of a saved model")
    e.add_argument("model_file")
    add_trust_arg(e)
    add_data_args(e)
    e.add_argument("--latency", action="store_true", help="also measure its latency on --device")
    e.add_argument("--latency-batch", type=int, default=1)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=run_eval)

    x = sub.add_parser("export", help="export a saved model to ONNX")
    x.add_argument("model_file")
    add_trust_arg(x)
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--batch", type=int, default=1)
    x.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a dynamic axis")
    x.set_defaults(func=run_export)

    r = sub.add_parser("report", help="(re)write the report of a finished run")
    r.add_argument("run_dir")
    r.set_defaults(func=run_report)


def _input_shape(model: torch.nn.Module, batch: int) -> tuple[int, ...]:
    from ..apply.io import model_info

    info = model_info(model)
    if info is None:
        raise ValueError("not an mdprune model file")
    return (batch, *info["input_shapes"][0][1:])


def _datasets(args: argparse.Namespace, model: torch.nn.Module):
    from ..train.data import builtin, image_folder

    if args.data == "builtin":
        return builtin(True, args.train_limit)[0], builtin(False, args.val_limit)[0]
    size = args.input_size or _input_shape(model, 1)[-1]
    return image_folder(args.data, "train", size, True)[0], image_folder(args.data, "val", size, False)[0]


def run_finetune(args: argparse.Namespace) -> int:
    import torch

    from ..apply.io import load, save
    from ..train.bn import recalibrate_bn
    from ..train.data import loader
    from ..train.loop import evaluate, make_optimizer, make_scheduler, train_epoch

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = load(args.model_file, trust_code=args.trust_code).to(device)
    train_ds, val_ds = _datasets(args, model)
    cfg = train_config(args)
    tl = loader(train_ds, cfg.batch_size, True, args.workers, args.seed)
    vl = loader(val_ds, 256, False, args.workers)
    if args.bn_recalibrate:
        recalibrate_bn(model, tl, args.bn_recalibrate, device)
    opt = make_optimizer(model, cfg)
    sch = make_scheduler(opt, cfg, min(cfg.max_iterations or len(tl), len(tl)))
    for epoch in range(cfg.epochs):
        stats = train_epoch(model, tl, opt, sch, cfg, device)
        acc = evaluate(model, vl, device)
        print(f"epoch {epoch}: loss {stats['loss']:.4f}, accuracy {100 * acc['accuracy']:.2f}%")
    save(model.cpu(), args.out)
    print(f"saved {args.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from ..apply.io import load
    from ..latency import LatencySettings, measure_models
    from ..train.data import loader
    from ..train.loop import evaluate

    device = torch.device(args.device)
    model = load(args.model_file, trust_code=args.trust_code).to(device)
    _, val_ds = _datasets(args, model)
    acc = evaluate(model, loader(val_ds, 256, False, args.workers), device)
    print(f"accuracy {100 * acc['accuracy']:.2f}% on {acc['samples']} images")
    if args.latency:
        settings = LatencySettings(device=args.device, batch=args.latency_batch, threads=args.threads)

        class _Space:  # measure_models needs only the input shapes
            input_shapes = [_input_shape(model, args.latency_batch)]

        m = measure_models({"model": model}, _Space(), settings)["model"]
        print(f"latency {m.ms:.3f} ms (batch {args.latency_batch}, {args.threads} thread(s), "
              f"noise {100 * m.noise:.1f}%)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    import torch

    from ..apply.io import export_onnx, load

    model = load(args.model_file, trust_code=args.trust_code)
    x = torch.randn(_input_shape(model, args.batch))
    path = export_onnx(model, x, args.out, dynamic_batch=not args.static_batch)
    print(f"wrote {path}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from ..report import write_report

    result_file = Path(args.run_dir) / "result.json"
    if not result_file.exists():
        raise ValueError(f"{result_file} not found: is {args.run_dir} a finished mdprune run?")
    files = write_report(json.loads(result_file.read_text()), Path(args.run_dir) / "report")
    print(f"report: {files['markdown']}")
    return 0
