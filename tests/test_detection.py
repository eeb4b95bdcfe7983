"""Detectors (mdprune.detection): analysis of the core, slim == masked on the full detector, pruning, data, mAP."""

from __future__ import annotations

import json

import pytest
import torch

import mdprune
from mdprune.detection import analyze_detector, masked_detector, slim_detector
from mdprune.detection.models import create_detector

from .conftest import randomize_norms, rel_err

# name -> image size (SSD300's extra layers need ~268 pixels)
DETECTORS = {
    "ssdlite320_mobilenet_v3_large": 128,
    "ssd300_vgg16": 268,
    "retinanet_resnet50_fpn_v2": 128,
    "fcos_resnet50_fpn": 128,
    "fasterrcnn_mobilenet_v3_large_fpn": 128,
    "tests.test_detection:mask_rcnn_mobilenet": 128,
    "tests.test_detection:keypoint_rcnn_mobilenet": 128,
    "maskrcnn_resnet50_fpn_v2": 128,
    "keypointrcnn_resnet50_fpn": 128,
}


def _mobilenet_fpn() -> dict:
    """A torchvision MobileNetV3-large backbone with FPN (random weights, BatchNorm as torchvision builds it
    untrained) and anchors for its 3 levels."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    return {"backbone": mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                                           norm_layer=torch.nn.BatchNorm2d, trainable_layers=6),
            "rpn_anchor_generator": AnchorGenerator(((16, 32, 64, 128),) * 3, ((0.5, 1.0, 2.0),) * 3),
            "box_detections_per_img": 10}  # the mask and keypoint heads run on each detection: keep tests quick


def mask_rcnn_mobilenet(num_classes: int = 4) -> torch.nn.Module:
    """Mask R-CNN on a small backbone (the family of maskrcnn_resnet50_fpn, light enough for every run)."""
    from torchvision.models.detection import MaskRCNN

    return MaskRCNN(num_classes=num_classes, **_mobilenet_fpn())


def keypoint_rcnn_mobilenet(num_classes: int = 4) -> torch.nn.Module:
    """Keypoint R-CNN (5 keypoints) on a small backbone."""
    from torchvision.models.detection import KeypointRCNN

    return KeypointRCNN(num_classes=num_classes, num_keypoints=5, **_mobilenet_fpn())


def build(name: str, size: int | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    size = size or DETECTORS[name]
    torch.manual_seed(0)
    det = randomize_norms(create_detector(name, num_classes=4, image_size=size, score_thresh=0.0)).eval()
    return det, torch.randn(1, 3, size, size)


def same_detections(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], size: int) -> None:
    """The same boxes, scores and labels, up to the order of detections whose scores tie within float noise."""
    assert a["boxes"].shape == b["boxes"].shape
    tol = 1e-3 * size
    free = torch.ones(len(b["scores"]), dtype=torch.bool)
    for box, score, label in zip(a["boxes"], a["scores"], a["labels"], strict=True):
        ok = free & (b["labels"] == label) & ((b["scores"] - score).abs() <= 1e-4) \
            & ((b["boxes"] - box).abs().amax(dim=1) <= tol)
        assert ok.any(), f"no match for box {box.tolist()} score {score.item():.4f}"
        free[int(ok.nonzero()[0])] = False


HEAVY = {"ssd300_vgg16", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
         "keypointrcnn_resnet50_fpn"}  # ~10 s each on 2 cores


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n.startswith(("mask", "keypoint")) else n
                                  for n in DETECTORS])
def test_detector_analysed(name: str) -> None:
    """Backbone, neck and heads are prunable; what the task fixes (classes x anchors, box coordinates) is not."""
    det, x = build(name)
    space = analyze_detector(det, x)
    prunable = space.prunable_dims()
    assert len(prunable) >= 10, name
    live = {d.name for d in prunable}
    touched = {t.name.split(".")[1] for t in space.tensors.values()
               if any(d in live for segs in t.axes.values() for seg in segs for d in seg.dims)}
    assert "backbone" in touched and touched & {"head", "rpn", "roi_heads"}, (name, touched)
    plan = mdprune.Plan.random(space, seed=0)
    with torch.no_grad():  # what the task fixes (anchors x classes, box coordinates) keeps its width
        dense, pruned = space.module.eval()(x), mdprune.slim(space, plan).eval()(x)
    assert [t.shape for t in dense] == [t.shape for t in pruned]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in DETECTORS])
def test_detector_slim_equals_masked(name: str) -> None:
    det, x = build(name)
    space = analyze_detector(det, x)
    assert space.prunable_dims(), name
    size = x.shape[-1]
    images = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(1))]
    for seed in (1, 2):
        plan = mdprune.Plan.random(space, seed=seed, block_prob=0.3)
        sizes, removed = plan.sizes(space), set(plan.removed)
        s, m = mdprune.slim(space, plan).eval(), mdprune.masked(space, plan).eval()
        with torch.no_grad():
            raw_s, raw_m = s(x), m(x)
        for a, b in zip(raw_m, raw_s, strict=True):
            assert rel_err(a, b) <= 1e-4, f"{name} seed {seed}: raw head outputs differ"
        sd = slim_detector(space, plan, det).eval()
        md = masked_detector(space, plan, det)[0].eval()
        assert sum(p.numel() for p in sd.parameters()) == space.count_params(sizes, removed)
        with torch.no_grad():
            out_s, out_m = sd(images)[0], md(images)[0]
        assert len(out_s["boxes"]) > 0
        same_detections(out_m, out_s, size)


def test_shared_head_stays_shared() -> None:
    """RetinaNet's head runs one module on every pyramid level: the slim detector still has one."""
    det, x = build("retinanet_resnet50_fpn_v2")
    space = analyze_detector(det, x)
    plan = mdprune.Plan.random(space, seed=3)
    sd = slim_detector(space, plan, det)
    head = sd.head.classification_head
    conv = head.conv[0][0]
    assert conv.in_channels == sd.backbone.fpn.layer_blocks[0][0].out_channels  # every level feeds it
    levels = [m for n, m in space.module.named_modules() if n.endswith("classification_head.conv.0.0")]
    assert len(levels) == 1
    calls = [n for n in space.module.graph.nodes if n.op == "call_module"
             and n.target == "detector.head.classification_head.conv.0.0"]
    assert len(calls) == 5  # one module, five levels
    outputs = space.dims
    # outputs fixed by the task (anchors x classes, box coordinates) are never pruned
    for tensor in ("detector.head.classification_head.cls_logits.weight",
                   "detector.head.regression_head.bbox_reg.weight"):
        for seg in space.tensors[tensor].axes.get(0, ()):
            assert all(not outputs[d].prunable for d in seg.dims)


FAST = dict(backend="flops", grid_points=2, grid_points_3d=2)


def fast_settings():
    from mdprune.latency import LatencySettings, TimingSettings

    return LatencySettings(**FAST, timing=TimingSettings(warmup=1, reps=1, rounds=1, min_sample_ms=0.0))


@pytest.fixture(scope="module")
def tiny_set():
    from mdprune.detection.data import GeneratedDetection

    return GeneratedDetection(n=4, size=96, classes=2, max_objects=2, min_item=16, max_item=32, seed=0)


def test_generated_set_reproducible(tiny_set) -> None:
    from mdprune.detection.data import GeneratedDetection

    again = GeneratedDetection(n=4, size=96, classes=2, max_objects=2, min_item=16, max_item=32, seed=0)
    for (a, ta), (b, tb) in zip(tiny_set, again, strict=True):
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
    x, t = tiny_set[0]
    assert x.shape == (3, 96, 96) and len(t["boxes"]) >= 1
    assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all() and t["labels"].min() >= 1


def test_loader_redraws_the_generated_set_each_pass(tiny_set) -> None:
    """With ``redraw``, the first pass reads the set and each later pass fresh, valid images; two loaders with
    the same seed give the same passes, another seed other images; fixed image sets are refused."""
    from mdprune.detection.data import DataError, loader

    def passes(seed: int) -> list[list[torch.Tensor]]:
        make = loader(tiny_set, batch_size=2, seed=seed, redraw=True)
        return [[x for images, _ in make() for x in images] for _ in range(3)]

    first, again, other = passes(0), passes(0), passes(5)
    assert all(torch.equal(a, b) for a, (b, _) in zip(first[0], tiny_set, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first[0], first[1], strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first[1], first[2], strict=True))
    assert all(torch.equal(a, b) for p, q in zip(first, again, strict=True) for a, b in zip(p, q, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first[1], other[1], strict=True))
    make = loader(tiny_set, batch_size=2, redraw=True)
    make()
    for images, targets in make():  # a redrawn pass: the set's shapes, valid boxes and labels
        for x, t in zip(images, targets, strict=True):
            assert x.shape == (3, 96, 96) and len(t["boxes"]) >= 1
            assert (t["boxes"][:, 2:] > t["boxes"][:, :2]).all() and t["labels"].min() >= 1
    with pytest.raises(DataError, match="redraw"):
        loader(torch.utils.data.TensorDataset(torch.zeros(2, 3, 8, 8)), redraw=True)


def test_coco_reader_and_map(tiny_set, tmp_path) -> None:
    """The generated set written as COCO, read back (boxes within a pixel of rounding), and its ground truth
    scored as predictions gives mAP 1."""
    from mdprune.detection.data import CocoDetection, loader
    from mdprune.detection.metric import evaluate_map

    ann = tiny_set.save_coco(tmp_path)
    coco = CocoDetection(tmp_path / "images", ann, size=96)
    assert len(coco) == 4 and coco.num_classes == 3
    for (_, a), (_, b) in zip(tiny_set, coco, strict=True):
        assert torch.allclose(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])

    class Oracle(torch.nn.Module):
        def forward(self, images):
            return [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
                    for t in self.targets[:len(images)]]

    oracle = Oracle()
    oracle.targets = [t for _, t in coco]
    result = evaluate_map(oracle, loader(coco, batch_size=4)())
    assert result["map"] == pytest.approx(1.0) and result["map_50"] == pytest.approx(1.0)


def test_map_keeps_the_coco_cap_quietly(tiny_set, recwarn) -> None:
    """More than 100 detections in an image: the 100 best count (the ground truth, scored 1, is among them, so
    mAP stays 1), and no warning per image is printed."""
    from mdprune.detection.data import loader
    from mdprune.detection.metric import evaluate_map

    class Crowded(torch.nn.Module):
        def forward(self, images):
            out = []
            for t in self.targets[:len(images)]:
                junk = torch.tensor([[0.0, 0.0, 2.0, 2.0]]).repeat(150, 1)
                out.append({"boxes": torch.cat([t["boxes"], junk]),
                            "scores": torch.cat([torch.ones(len(t["labels"])), torch.full((150,), 0.01)]),
                            "labels": torch.cat([t["labels"], torch.ones(150, dtype=torch.int64)])})
            return out

    crowded = Crowded()
    crowded.targets = [t for _, t in tiny_set]
    result = evaluate_map(crowded, loader(tiny_set, batch_size=4)())
    assert result["map"] == pytest.approx(1.0)
    assert not [w for w in recwarn if "detections" in str(w.message)]


def test_voc_reader(tmp_path) -> None:
    from PIL import Image

    from mdprune.detection.data import VOCDetection

    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (tmp_path / d).mkdir(parents=True)
    Image.new("RGB", (200, 100), (10, 20, 30)).save(tmp_path / "JPEGImages" / "a.jpg")
    (tmp_path / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename>"
        "<object><name>dog</name><difficult>0</difficult><bndbox><xmin>11</xmin><ymin>21</ymin><xmax>101</xmax>"
        "<ymax>61</ymax></bndbox></object>"
        "<object><name>cat</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
        "<ymax>5</ymax></bndbox></object></annotation>")
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("a\n")
    ds = VOCDetection(tmp_path, "train", size=100, classes=["cat", "dog"])
    x, t = ds[0]
    assert x.shape == (3, 100, 100)
    assert t["labels"].tolist() == [2]  # the difficult cat is skipped; dog is class 2 of 2
    assert torch.allclose(t["boxes"], torch.tensor([[5.0, 20.0, 50.5, 61.0]]))  # x by 100/200; VOC mins from 1


def test_oneshot_prune_finishes(tiny_set, tmp_path) -> None:
    """A one-shot prune of SSDLite with a small (flops) table: importance from the loss dict, a solve, the slim
    detector runs; saved and loaded without pickled code, it gives the same detections."""
    from mdprune.detection import load_detector, prune_detector, save_detector
    from mdprune.detection.data import loader

    torch.manual_seed(0)
    det = create_detector("ssdlite320_mobilenet_v3_large", num_classes=tiny_set.num_classes, image_size=96,
                          score_thresh=0.0)
    slim, report = prune_detector(det, 96, "70%", data=loader(tiny_set, batch_size=2), settings=fast_settings(),
                                  lut=tmp_path / "lut", importance_batches=1, verify_rounds=0)
    assert report.params[1] < report.params[0] and report.predicted_ms <= report.target_ms * 1.0001
    assert report.fixed_ms >= 0 and report.timed_on == "the data's first 1 image(s)"
    images = [tiny_set[0][0]]
    with torch.no_grad():
        out = slim.eval()(images)[0]
    save_detector(slim, tmp_path / "slim.pt")
    again = load_detector(tmp_path / "slim.pt")
    with torch.no_grad():
        same_detections(out, again(images)[0], 96)
    # the run's report: mAP of each stage and the whole-detector latency figures, from the report as returned
    from mdprune.report.detection import write_detection_report

    maps = {"dense": {"map": 0.5, "map_50": 0.75}, "slim": {"map": 0.25, "map_50": 0.5}}
    files = write_detection_report({"model": "ssdlite320_mobilenet_v3_large", "budget": "70%", "map": maps,
                                    "prune": report.to_dict()}, tmp_path / "report")
    md = files["markdown"].read_text()
    assert "| Dense | 0.5000 | 0.7500 |" in md and "| After slimming | 0.2500 | 0.5000 |" in md
    assert "After fine-tuning" not in md  # a stage not run is not made up
    assert f"{report.target_ms:.3f} ms (70.0% of dense)" in md and "Fixed part" in md
    assert "Measured / dense" in md and md.count("`") >= 2  # the check's table and the widths
    assert json.loads(files["json"].read_text())["prune"]["target_ms"] == pytest.approx(report.target_ms)
    # the fine-tuned detector is timed again with its own detections (mdprune detect prune reports it)
    from mdprune.detection.latency import measure_detector_ratio

    r = measure_detector_ratio(slim, det, 96, fast_settings())
    assert 0 < r.low <= r.ratio <= r.high < 1
    final = {"fraction": r.ratio, "low": r.low, "high": r.high, "ms": r.a_ms, "dense_ms": r.b_ms}
    md = write_detection_report({"model": "ssdlite", "budget": "70%", "map": maps, "finetuned_latency": final,
                                 "prune": report.to_dict()}, tmp_path / "report2")["markdown"].read_text()
    assert f"After fine-tuning, with its own detections: {100 * r.ratio:.1f}%" in md


def test_detector_calibration_reaches_the_floor(monkeypatch, tmp_path) -> None:
    """The whole detector's latency model is calibrated with the smallest plan among its references: fitted on
    the middle of the range alone, a latency that falls faster near the floor (here: a fixed part plus the
    square root of the core's table sum) put the predicted floor far above the measured one, and the solver
    refused budgets the detector could reach."""
    import mdprune.detection.latency as det_latency
    from mdprune.latency import LatencyModel, Measurement, open_table

    det, x = build("ssdlite320_mobilenet_v3_large", 96)
    space = analyze_detector(det, x)
    settings = fast_settings()
    table = open_table(settings, tmp_path)
    raw = LatencyModel(space, table, "table", settings.grid_points, settings.grid_points_3d)

    def truth(plan: mdprune.Plan) -> float:  # ms; the dense detector: 3 ms, a third of it the fixed part
        return 1.0 + 2.0 * (raw.ops_ms(plan.sizes(space), set(plan.removed)) / raw.ops_ms(space.dense_sizes())) ** 0.5

    seen = []

    def fractions(space_, settings_, plans, timed=None):  # noqa: ARG001
        seen.extend(plans)
        return [truth(p) / truth(mdprune.Plan()) for p in plans]

    monkeypatch.setattr(det_latency, "measure_detectors",
                        lambda *a, **k: {"dense": Measurement(ms=truth(mdprune.Plan()), noise=0.01)})
    monkeypatch.setattr(det_latency, "reference_fractions", fractions)
    lm, dense = det_latency.calibrated_detector_model(det, space, table, settings)
    smallest = mdprune.Plan.smallest(space)
    assert any(p.removed == smallest.removed and p.keep == smallest.keep for p in seen)
    assert dense["ms"] == pytest.approx(3.0) and 0 <= dense["fixed_ms"] < truth(smallest)
    mid = LatencyModel(space, table, "table", settings.grid_points, settings.grid_points_3d)
    mid.calibrate(3.0, [(p, truth(p)) for p in seen[:-1]])
    floor_error = abs(lm.predict_plan(smallest) / truth(smallest) - 1)
    print(f"floor {truth(smallest):.3f} ms: predicted {lm.predict_plan(smallest):.3f} ms, "
          f"{mid.predict_plan(smallest):.3f} ms without it")
    assert floor_error < 0.5 * abs(mid.predict_plan(smallest) / truth(smallest) - 1)


def test_coco_masks_round_trip(tiny_set, tmp_path) -> None:
    """The generated set's instance masks (its items' ink) survive COCO's run-length encoding and the reader."""
    from mdprune.detection.data import CocoDetection

    ann = tiny_set.save_coco(tmp_path)
    coco = CocoDetection(tmp_path / "images", ann, size=96, with_masks=True)
    for (_, a), (_, b) in zip(tiny_set, coco, strict=True):
        assert a["masks"].shape == (len(a["boxes"]), 96, 96) and a["masks"].sum() > 0
        assert torch.equal(a["masks"], b["masks"])
        for box, mask in zip(a["boxes"], a["masks"], strict=True):  # each box is tight around its mask
            ys, xs = mask.nonzero(as_tuple=True)
            assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_second_stage_timed_at_its_real_row_count() -> None:
    """Faster R-CNN's box head runs on every RPN proposal: the core pools as many regions per image as the
    detector's box head receives on the same images, so the tables time its layers at that row count."""
    det, x = build("fasterrcnn_mobilenet_v3_large_fpn")
    space = analyze_detector(det, x)
    rows = []
    hook = det.roi_heads.box_head.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    with torch.no_grad():
        det.eval()(list(x))
    hook.remove()
    fc6 = next(o for o in space.ops if o.name.endswith("box_head.fc6"))
    assert rows[0] > 8 and fc6.fixed["tokens"] * fc6.fixed["batch"] == rows[0]
    # and the table times it so: every row, for each image of the latency batch (it timed one row per image,
    # and the table model missed most of the detector's latency: scale 12.5 in `mdprune lut validate`)
    from mdprune.latency.ops import op_module

    _, inputs = op_module(fc6.kind, fc6.fixed, fc6.widths(space.dense_sizes()), 2, "cpu", torch.float32)
    assert inputs[0].shape[0] == 2 * fc6.fixed["tokens"]


def test_roi_pooling_is_a_latency_op_on_the_pyramid_width() -> None:
    """RoI Align's cost follows the pyramid's channels, so it is a table op on that width (it sat in the
    constant, and the table model under-predicted pruned Faster R-CNNs by 21-29%): the op's width is the pooled
    levels' channels, and its module alone pools as many regions per image as the box head's rows, at that width."""
    from mdprune.latency.ops import op_module

    det, x = build("fasterrcnn_mobilenet_v3_large_fpn")
    space = analyze_detector(det, x)
    pool = next(o for o in space.ops if o.kind == "fixed_roi_pool")
    fc6 = next(o for o in space.ops if o.name.endswith("box_head.fc6"))
    assert pool.fixed["boxes"] == fc6.fixed["tokens"]
    pyramid = space.dense_sizes()
    width = pool.widths(pyramid)["width"]
    assert width * 49 == fc6.widths(pyramid)["in"]  # the box head reads the pooled 7x7 maps of that width
    half = {d: max(1, s // 2) for d, s in pyramid.items()}
    for sizes in (pyramid, half):
        w = pool.widths(sizes)
        m, inputs = op_module(pool.kind, pool.fixed, w, 2, "cpu", torch.float32)
        with torch.no_grad():
            out = m(*inputs)
        assert out.shape == (2 * pool.fixed["boxes"], w["width"], 7, 7)
    assert pool.widths(half)["width"] < width


def test_mask_rcnn_prunes_on_masks(tiny_set, tmp_path) -> None:
    """Mask R-CNN: importance from its loss dict, mask loss included (the generated set has masks), a solve,
    a slim detector that still gives masks; data without masks is refused with a clear error."""
    from mdprune.detection import prune_detector
    from mdprune.detection.data import loader
    from mdprune.detection.prune import detection_loss
    from mdprune.train.data import DataError

    torch.manual_seed(0)
    det = create_detector("tests.test_detection:mask_rcnn_mobilenet", num_classes=tiny_set.num_classes,
                          image_size=96, score_thresh=0.0)
    slim, report = prune_detector(det, 96, "70%", data=loader(tiny_set, batch_size=2), settings=fast_settings(),
                                  lut=tmp_path / "lut", importance_batches=1, verify_rounds=0)
    assert report.params[1] < report.params[0]
    with torch.no_grad():
        out = slim.eval()([tiny_set[0][0]])[0]
    assert out["masks"].shape[1:] == (1, 96, 96)
    images, targets = next(iter(loader(tiny_set, batch_size=2)()))
    with pytest.raises(DataError, match="masks"):
        detection_loss(det.train(), images, [{k: t[k] for k in ("boxes", "labels")} for t in targets])


@pytest.mark.parametrize("name", ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_fpn"])
def test_pruned_detector_timed_with_the_dense_detections(name: str) -> None:
    """Timing hands a pruned detector's post-processing the dense detector's raw outputs (as many boxes as the
    dense detector scores, not the many more a detector not yet fine-tuned scores): its detections are then the
    dense detector's, its own heads still run, and copies (the timer measures one) do the same."""
    import copy

    from mdprune.detection.latency import with_dense_detections

    det, x = build(name)
    space = analyze_detector(det, x)
    plan = mdprune.Plan.random(space, seed=1, block_prob=0.3)
    images = torch.rand(2, 3, x.shape[-1], x.shape[-1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = det(images)
        own = slim_detector(space, plan, det).eval()(images)
        timed = with_dense_detections(slim_detector(space, plan, det).eval(), det)
        calls = []
        for path in ("head",) if name.startswith("ssd") else ("rpn.head", "roi_heads.box_predictor"):
            timed.get_submodule(path).register_forward_hook(lambda m, a, o, path=path: calls.append(path))
        for out in (timed(images), copy.deepcopy(timed)(images), timed(list(images))):
            for a, b in zip(dense, out, strict=True):
                same_detections(a, b, x.shape[-1])
    assert any(len(a["boxes"]) != len(b["boxes"]) or not torch.equal(a["scores"], b["scores"])
               for a, b in zip(dense, own, strict=True)), "the plan's own detections should differ from the dense"
    assert len(calls) >= 3


@pytest.mark.parametrize("name", ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_fpn"])
def test_detectors_timed_on_the_given_images(name: str) -> None:
    """What the timer feeds (random tensors) is replaced by the timing images before the dense detections are
    read: a timed plan called on noise gives the dense detector's detections on the images, not on the noise;
    calls with a list of images (evaluation) or another shape are left alone; wrong shapes are refused."""
    import copy

    from mdprune.apply import slim
    from mdprune.detection import prune_detector
    from mdprune.detection.latency import measure_detector_ratio, on_images, timed_detector, timing_images

    det, x = build(name)
    s = x.shape[-1]
    space = analyze_detector(det, x)
    plan = mdprune.Plan.random(space, seed=2, block_prob=0.3)
    g = torch.Generator().manual_seed(3)
    images = timing_images([([torch.rand(3, s + 8, s, generator=g)], [{}]), ([torch.rand(3, s, s, generator=g)],
                                                                             [{}])], 3, s)
    assert images.shape == (3, 3, s, s) and torch.equal(images[2], images[0])  # resized, read again from the first
    noise = torch.randn(3, 3, s, s, generator=g)
    with torch.no_grad():
        on_real, on_noise = det(images), det(noise)
        timed = timed_detector(det, space, images)(slim(space, plan)).eval()
        for a, b in zip(on_real, timed(noise), strict=True):
            same_detections(a, b, s)
        for a, b in zip(on_noise, on_images(copy.deepcopy(det), images)(list(noise)), strict=True):
            same_detections(a, b, s)
    with pytest.raises(ValueError, match="shape"):
        measure_detector_ratio(det, det, s, fast_settings(), images=images)  # the latency batch is 1
    with pytest.raises(ValueError, match="shape"):
        prune_detector(det, s, "50%", scores={}, settings=fast_settings(), timing_images=images)
    with pytest.raises(ValueError, match="'data', 'random'"):
        prune_detector(det, s, "50%", scores={}, settings=fast_settings(), timing_images="noise")


@pytest.mark.parametrize("name", ["ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_fpn"])
def test_finetune_distils_the_dense_raw_outputs(name: str, tiny_set) -> None:
    """Distillation while fine-tuning matches the family's per-anchor outputs (single-stage heads; an R-CNN's
    RPN, not its second stage, whose boxes are its own proposals) on the student's own transformed images:
    nothing to match for an exact copy, a positive term with gradients for a pruned detector, none at weight 0,
    and the hooks go when done."""
    import copy

    from mdprune.detection import finetune, prune_detector
    from mdprune.detection.data import loader
    from mdprune.detection.distill import RawDistiller

    torch.manual_seed(0)
    det = randomize_norms(create_detector(name, num_classes=tiny_set.num_classes, image_size=96)).eval()
    images = [tiny_set[i][0] for i in range(2)]
    targets = [tiny_set[i][1] for i in range(2)]
    twin = copy.deepcopy(det).eval()
    with RawDistiller(twin, det) as d, torch.no_grad():
        twin(images)
        assert d.paths == (("head",) if name.startswith("ssd") else ("rpn.head",))
        assert d.loss().item() < 1e-8
    space = analyze_detector(det, torch.randn(1, 3, 96, 96))
    slim = slim_detector(space, mdprune.Plan.random(space, seed=1), det).train()
    with RawDistiller(slim, det, weight=2.0) as d, RawDistiller(slim, det, weight=0.0) as zero:
        sum(slim(images, targets).values())  # training mode: the loss dict, as fine-tuning runs it
        term = d.loss()
        assert zero.loss().item() == 0.0
        assert term.item() > 0 and term.requires_grad
        term.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in slim.parameters())
        assert all(p.grad is None for p in det.parameters())
    hooks = sum(len(m._forward_hooks) for m in slim.modules())
    lines: list[str] = []
    finetune(slim, loader(tiny_set, batch_size=2), epochs=1, lr=1e-3, teacher=det, distill=1.0,
             log=lines.append)
    assert "distillation" in lines[0] and sum(len(m._forward_hooks) for m in slim.modules()) == hooks
    with pytest.raises(ValueError, match="weight"):
        finetune(slim, loader(tiny_set, batch_size=2), teacher=det, distill=-1.0)
    with pytest.raises(ValueError, match="distillation weight"):  # refused before any work, either schedule
        prune_detector(det, 96, "50%", scores={}, schedule="iterative", distill=-1.0)


def test_detect_prune_cli_distils(tmp_path, capsys, monkeypatch) -> None:
    """`mdprune detect prune` trains with distillation by default, in the iterative schedule's training and in
    fine-tuning (the loss line shows its term; the run's JSON records the weight); --distill 0 turns it off; a
    negative weight is refused with a message."""
    from mdprune.cli import main
    from mdprune.detection import prune as prune_module

    made: list[float] = []

    class Recording(prune_module.RawDistiller):
        def __init__(self, student, teacher, weight=1.0) -> None:  # noqa: ANN001
            made.append(weight)
            super().__init__(student, teacher, weight)

    monkeypatch.setattr(prune_module, "RawDistiller", Recording)
    common = ["detect", "prune", "ssdlite320_mobilenet_v3_large", "--data", "generated:8", "--image-size", "96",
              "--backend", "flops", "--budget", "70%", "--importance-batches", "1", "--batch-size", "4",
              "--epochs", "1", "--lut", str(tmp_path / "lut")]
    iterative = ["--schedule", "iterative", "--steps", "2", "--every", "1"]
    assert main([*common, *iterative, "--out", str(tmp_path / "kd")]) == 0
    out = capsys.readouterr().out
    assert "step 1/2" in out and "(distillation " in out
    assert made == [1.0, 1.0]  # the iterative schedule's training, then fine-tuning
    report = json.loads((tmp_path / "kd" / "report.json").read_text())
    assert report["distill"] == 1.0 and report["prune"]["timed_on"] == "1 given image(s)"  # the val data's first
    made.clear()
    assert main([*common, "--distill", "0", "--out", str(tmp_path / "plain")]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1: loss" in out and "(distillation " not in out and not made
    assert main([*common, "--distill", "-1", "--out", str(tmp_path / "bad")]) != 0
    assert "distillation weight" in capsys.readouterr().err


def test_detect_validate_cli_times_on_the_data(tmp_path, capsys, monkeypatch) -> None:
    """`mdprune detect validate` times the detectors on the first --batch images of the evaluation data (or on
    random images with --timing-images random) and prints the predicted-vs-measured summary."""
    import mdprune.detection as detection
    from mdprune.cli import main

    seen: list[torch.Tensor | None] = []
    real = detection.validate_detector

    def recording(*args, images=None, **kw):  # noqa: ANN002, ANN003, ANN202
        seen.append(images)
        return real(*args, images=images, **kw)

    monkeypatch.setattr(detection, "validate_detector", recording)
    common = ["detect", "validate", "ssdlite320_mobilenet_v3_large", "--data", "generated:8", "--image-size", "96",
              "--backend", "flops", "--samples", "2", "--lut", str(tmp_path / "lut")]
    for how in ("data", "random"):
        assert main([*common, "--timing-images", how]) == 0
        out = capsys.readouterr().out
        summary = json.loads(out[out.index("{"):])
        assert summary["samples"] == 2 and summary["fixed_ms"] >= 0
    assert seen[0] is not None and seen[0].shape == (1, 3, 96, 96) and seen[0].min() >= 0 and seen[0].max() <= 1
    assert seen[1] is None
