"""Detection data: COCO-format folders, Pascal VOC, and a small generated set of real images on canvases.

Every data set yields ``(image, target)``: a float image (3, H, W) in [0, 1] and ``{"boxes": (K, 4) float xyxy in
pixels, "labels": (K,) int64}``, labels counted from 1 (0 is the background of SSD and Faster R-CNN). Images are
resized to a square ``size`` (boxes scaled with them), so a batch is what the detector's transform passes on
unchanged. Instance masks (``"masks"``: (K, H, W) uint8, what Mask R-CNN trains on) come with the generated set
and, when asked (``with_masks``), from COCO segmentations; keypoints (``"keypoints"``: (K, P, 3) x, y,
visibility, for Keypoint R-CNN) from COCO keypoint annotations (``with_keypoints``). :func:`loader` batches them
as torchvision detectors expect (lists of images and targets).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..train.data import DataError, digits, fashion_mnist, fashion_mnist_dir

Target = dict[str, torch.Tensor]


def _target(boxes: list[list[float]], labels: list[int]) -> Target:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64)}


def _load_image(path: Path, size: int) -> tuple[torch.Tensor, float, float]:
    """The image as (3, size, size) in [0, 1], and the x and y scales applied."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        im = im.resize((size, size), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    return x, size / w, size / h


def _scaled(t: Target, sx: float, sy: float) -> Target:
    return {"boxes": t["boxes"] * torch.tensor([sx, sy, sx, sy]), "labels": t["labels"]}


class CocoDetection(Dataset):
    """A COCO-format set: an image folder and an instances JSON (``images``, ``annotations``, ``categories``).

    Category ids are mapped to labels 1..K in the order of ``categories`` (``self.classes`` holds the names);
    crowd annotations and boxes without area are skipped; images without any box are kept (negatives).
    """

    def __init__(self, images: str | Path, annotations: str | Path, size: int = 320, with_masks: bool = False,
                 with_keypoints: bool = False):
        self.root, self.size = Path(images), size
        self.with_masks, self.with_keypoints = with_masks, with_keypoints
        path = Path(annotations)
        if not path.is_file():
            raise DataError(f"COCO annotations {path} do not exist")
        if not self.root.is_dir():
            raise DataError(f"COCO image folder {self.root} does not exist")
        doc = json.loads(path.read_text())
        for key in ("images", "annotations", "categories"):
            if key not in doc:
                raise DataError(f"{path} is not a COCO instances file: it has no {key!r}")
        cats = doc["categories"]
        self.label_of = {c["id"]: i + 1 for i, c in enumerate(cats)}
        self.classes = [c["name"] for c in cats]
        self.images = sorted(doc["images"], key=lambda im: im["id"])
        boxes: dict[int, list[tuple[list[float], int]]] = {im["id"]: [] for im in self.images}
        self.anns: dict[int, list[dict[str, Any]]] = {im["id"]: [] for im in self.images}
        for a in doc["annotations"]:
            x, y, w, h = a["bbox"]
            if a.get("iscrowd", 0) or w <= 0 or h <= 0 or a["image_id"] not in boxes:
                continue
            boxes[a["image_id"]].append(([x, y, x + w, y + h], self.label_of[a["category_id"]]))
            self.anns[a["image_id"]].append(a)
        self.boxes = boxes

    @property
    def num_classes(self) -> int:
        """Classes including the background (what torchvision's ``num_classes`` counts)."""
        return len(self.classes) + 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        im = self.images[i]
        x, sx, sy = _load_image(self.root / im["file_name"], self.size)
        items = self.boxes[im["id"]]
        t = _scaled(_target([b for b, _ in items], [c for _, c in items]), sx, sy)
        anns = self.anns[im["id"]]
        if self.with_masks:
            h, w = im.get("height"), im.get("width")
            t["masks"] = torch.stack([_coco_mask(a, h, w, self.size) for a in anns]) if anns else \
                torch.zeros(0, self.size, self.size, dtype=torch.uint8)
        if self.with_keypoints:
            t["keypoints"] = _coco_keypoints(anns, sx, sy)
        return x, t


def _coco_mask(ann: dict[str, Any], h: int | None, w: int | None, size: int) -> torch.Tensor:
    """An annotation's instance mask at ``size`` x ``size``: polygons drawn with PIL, RLE decoded by pycocotools."""
    from PIL import Image, ImageDraw

    seg = ann.get("segmentation")
    if not seg:
        raise DataError(f"COCO annotation {ann.get('id')} has no segmentation: Mask R-CNN needs instance masks")
    if h is None or w is None:
        raise DataError(f"COCO image {ann['image_id']} lacks width/height, needed to draw its masks")
    if isinstance(seg, list):  # polygons
        im = Image.new("L", (w, h), 0)
        for poly in seg:
            ImageDraw.Draw(im).polygon([(poly[k], poly[k + 1]) for k in range(0, len(poly) - 1, 2)], fill=1)
    elif isinstance(seg.get("counts"), list):  # uncompressed run-length encoding: runs of 0s and 1s, column-major
        runs = np.repeat(np.arange(len(seg["counts"])) % 2, seg["counts"]).astype(np.uint8)
        im = Image.fromarray(np.ascontiguousarray(runs.reshape(seg["size"][1], seg["size"][0]).T))
    else:  # compressed run-length encoding
        try:
            from pycocotools import mask as coco_mask
        except ImportError as e:
            raise DataError("compressed RLE masks need pycocotools (pip install mdprune[detection])") from e
        im = Image.fromarray(coco_mask.decode(seg))
    im = im.resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())


def _coco_keypoints(anns: list[dict[str, Any]], sx: float, sy: float) -> torch.Tensor:
    """(K, P, 3) keypoints (x, y, visibility) scaled with the image; an error if an annotation has none."""
    if any("keypoints" not in a for a in anns):
        raise DataError("a COCO annotation has no keypoints: Keypoint R-CNN needs a person-keypoints file")
    if not anns:
        return torch.zeros(0, 0, 3)
    k = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).reshape(len(anns), -1, 3)
    return k * torch.tensor([sx, sy, 1.0])


class VOCDetection(Dataset):
    """The Pascal VOC layout: ``root/JPEGImages``, ``root/Annotations/*.xml``, ``root/ImageSets/Main/<split>.txt``.

    ``classes``: the class names in label order (default: those found in the split's annotations, sorted);
    objects marked ``difficult`` are skipped unless ``difficult=True``.
    """

    def __init__(self, root: str | Path, split: str = "train", size: int = 320, classes: list[str] | None = None,
                 difficult: bool = False):
        self.root, self.size = Path(root), size
        ids_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
        if not ids_file.is_file():
            raise DataError(f"{ids_file} does not exist (expected the Pascal VOC layout under {root})")
        self.ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]
        self.records = [self._read(i, difficult) for i in self.ids]
        found = sorted({name for r in self.records for name, _ in r["objects"]})
        self.classes = list(classes) if classes is not None else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise DataError(f"VOC annotations name classes not in the class list: {unknown}")

    def _read(self, image_id: str, difficult: bool) -> dict[str, Any]:
        path = self.root / "Annotations" / f"{image_id}.xml"
        if not path.is_file():
            raise DataError(f"{path} does not exist")
        doc = ET.parse(path).getroot()
        objects = []
        for obj in doc.iter("object"):
            if not difficult and obj.findtext("difficult", "0").strip() == "1":
                continue
            bb = obj.find("bndbox")
            box = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            box[0] -= 1  # VOC counts pixels from 1
            box[1] -= 1
            objects.append((obj.findtext("name").strip(), box))
        name = doc.findtext("filename") or f"{image_id}.jpg"
        return {"file": name, "objects": objects}

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        r = self.records[i]
        x, sx, sy = _load_image(self.root / "JPEGImages" / r["file"], self.size)
        t = _target([b for _, b in r["objects"]], [self.classes.index(n) + 1 for n, _ in r["objects"]])
        return x, _scaled(t, sx, sy)


class GeneratedDetection(Dataset):
    """A small detection set made offline from real images: Fashion-MNIST items (from the Debian package's
    files) or, where they are absent, scikit-learn's 8x8 digits, pasted on a ``size`` x ``size`` canvas.

    Each image holds 1 to ``max_objects`` items of ``classes`` classes (labels 1..classes), each scaled to a
    random size between ``min_item`` and ``max_item`` pixels, at random places (overlaps allowed, boxes tight
    around the item's ink, instance masks its ink), on a background of low-amplitude noise; items are tinted with
    a random colour.
    Everything is drawn from ``seed``: the same arguments give the same set.
    """

    def __init__(self, n: int = 256, size: int = 128, classes: int = 3, max_objects: int = 3, min_item: int = 20,
                 max_item: int = 48, seed: int = 0, train: bool = True):
        self.size = size
        self.source = "fashion-mnist" if fashion_mnist_dir() is not None else "digits"
        items = fashion_mnist(train) if self.source == "fashion-mnist" else digits(train, 28)
        x, y = items.tensors
        x = (x - x.amin()) / (x.amax() - x.amin())  # back to [0, 1] ink
        keep = y < classes
        self.items, self.item_labels = x[keep], y[keep]
        self.classes = [str(c) for c in range(classes)]
        self.seed, self.recipe = seed, (max_objects, min_item, max_item)
        g = torch.Generator().manual_seed(seed)
        self.samples = [self._draw(g, *self.recipe) for _ in range(n)]

    @property
    def num_classes(self) -> int:
        return len(self.classes) + 1

    def _draw(self, g: torch.Generator, max_objects: int, lo: int, hi: int) -> tuple[torch.Tensor, Target]:
        s = self.size
        canvas = 0.1 * torch.rand(3, s, s, generator=g)
        boxes, labels, masks = [], [], []
        for _ in range(int(torch.randint(1, max_objects + 1, (1,), generator=g))):
            k = int(torch.randint(len(self.items), (1,), generator=g))
            side = int(torch.randint(lo, hi + 1, (1,), generator=g))
            item = torch.nn.functional.interpolate(self.items[k][None], size=(side, side), mode="bilinear",
                                                   align_corners=False)[0, 0].clamp(0, 1)
            x0 = int(torch.randint(0, s - side + 1, (1,), generator=g))
            y0 = int(torch.randint(0, s - side + 1, (1,), generator=g))
            colour = 0.4 + 0.6 * torch.rand(3, 1, 1, generator=g)
            region = canvas[:, y0:y0 + side, x0:x0 + side]
            canvas[:, y0:y0 + side, x0:x0 + side] = torch.maximum(region, colour * item)
            ink = (item > 0.2).nonzero()
            if len(ink) == 0:
                continue
            (ya, xa), (yb, xb) = ink.min(0).values.tolist(), ink.max(0).values.tolist()
            boxes.append([x0 + xa, y0 + ya, x0 + xb + 1, y0 + yb + 1])
            labels.append(int(self.item_labels[k]) + 1)
            mask = torch.zeros(s, s, dtype=torch.uint8)
            mask[y0:y0 + side, x0:x0 + side] = item > 0.2
            masks.append(mask)
        t = _target(boxes, labels)
        t["masks"] = torch.stack(masks) if masks else torch.zeros(0, s, s, dtype=torch.uint8)
        return canvas, t

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        return self.samples[i]

    def redrawn(self, seed: int) -> Dataset:
        """As many fresh images of the same recipe (canvas, classes, item pool, object counts and sizes), drawn
        from ``seed`` when read: image ``i`` comes from its own generator seeded by the set's seed, ``seed`` and
        ``i``, so any order of reads gives the same images. The set itself is left as it is."""
        return _Redrawn(self, seed)

    def save_coco(self, root: str | Path) -> Path:
        """Write the set as a COCO-format folder (``images/*.png`` and ``instances.json``); returns the JSON."""
        from PIL import Image

        root = Path(root)
        (root / "images").mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i, (x, t) in enumerate(self.samples):
            name = f"{i:05d}.png"
            Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(root / "images" / name)
            images.append({"id": i, "file_name": name, "width": self.size, "height": self.size})
            for b, c, m in zip(t["boxes"].tolist(), t["labels"].tolist(), t["masks"], strict=True):
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": c, "iscrowd": 0,
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "area": (b[2] - b[0]) * (b[3] - b[1]),
                             "segmentation": _rle(m)})
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(self.classes)]
        path = root / "instances.json"
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
        return path


class _Redrawn(Dataset):
    """A fresh draw of a :class:`GeneratedDetection`, made as it is read (:meth:`GeneratedDetection.redrawn`)."""

    def __init__(self, base: GeneratedDetection, seed: int):
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        state = np.random.SeedSequence([self.base.seed, self.seed, i]).generate_state(1, np.uint64)[0]
        g = torch.Generator().manual_seed(int(state) & (2**63 - 1))
        return self.base._draw(g, *self.base.recipe)


def _rle(mask: torch.Tensor) -> dict[str, Any]:
    """A (H, W) mask as COCO's uncompressed run-length encoding: column-major runs, the first one of 0s."""
    flat = mask.T.reshape(-1).numpy().astype(np.uint8)
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [len(flat)]])
    counts = np.diff(bounds).tolist()
    return {"size": list(mask.shape), "counts": ([0] if flat[0] else []) + counts}


def collate(batch: list[tuple[torch.Tensor, Target]]) -> tuple[list[torch.Tensor], list[Target]]:
    return [b[0] for b in batch], [b[1] for b in batch]


def loader(ds: Dataset, batch_size: int = 8, shuffle: bool = False, seed: int = 0, limit: int | None = None,
           redraw: bool = False) -> Callable[[], Iterable[tuple[list[torch.Tensor], list[Target]]]]:
    """A function giving a new pass over ``ds`` in batches of torchvision's format, each call (reshuffled
    from ``seed`` and the pass number when ``shuffle``); ``limit``: at most that many batches per pass.

    ``redraw`` (a :class:`GeneratedDetection` only): the first pass reads ``ds``, every later pass a fresh draw of
    it (:meth:`GeneratedDetection.redrawn`, from ``seed`` and the pass number), so that a detector trained for
    many passes sees new images each time instead of learning a small set by heart."""
    if redraw and not isinstance(ds, GeneratedDetection):
        raise DataError(f"redraw needs the generated detection set, not {type(ds).__name__}: other sets are "
                        "fixed images")
    passes = [0]

    def make() -> Iterable[tuple[list[torch.Tensor], list[Target]]]:
        p = passes[0]
        g = torch.Generator().manual_seed(seed + p)
        passes[0] += 1
        images = ds.redrawn(seed * 1_000_003 + p) if redraw and p > 0 else ds  # type: ignore[attr-defined]
        dl = DataLoader(images, batch_size=batch_size, shuffle=shuffle, generator=g, collate_fn=collate)
        return dl if limit is None else _limited(dl, limit)

    return make


def _limited(dl: DataLoader, n: int) -> list[Any]:
    out = []
    for i, b in enumerate(dl):
        if i >= n:
            break
        out.append(b)
    return out


def open_detection_data(spec: str, size: int, split: str = "train", with_masks: bool = False,
                        with_keypoints: bool = False) -> Dataset:
    """A data set from a spec: ``generated[:N]``, ``coco:IMAGES:ANNOTATIONS``, or ``voc:ROOT`` (``split`` picks
    the VOC image set, and the generated set's draw: train and val use other seeds). ``with_masks`` /
    ``with_keypoints``: targets carry instance masks / keypoints (an error where the set has none)."""
    kind, _, rest = spec.partition(":")
    if kind == "generated":
        n = int(rest) if rest else 256
        if with_keypoints:
            raise DataError("the generated set has no keypoints: Keypoint R-CNN needs COCO person keypoints")
        return GeneratedDetection(n=n if split == "train" else max(n // 4, 16), size=size,
                                  seed=0 if split == "train" else 1, train=split == "train")
    if kind == "coco":
        images, _, ann = rest.partition(":")
        return CocoDetection(images, ann, size, with_masks, with_keypoints)
    if kind == "voc":
        if with_masks or with_keypoints:
            raise DataError("the Pascal VOC reader gives boxes only: Mask and Keypoint R-CNN need COCO-format data")
        return VOCDetection(rest, split, size)
    raise DataError(f"cannot read detection data {spec!r}: use generated[:N], coco:IMAGES:ANNOTATIONS or voc:ROOT")
