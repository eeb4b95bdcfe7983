"""Pruning torchvision detectors (SSD, SSDLite, RetinaNet, FCOS, Faster R-CNN) to a whole-detector latency budget.

See docs/detection.md. The traced *core* (backbone, neck, heads) is analysed and pruned; transform, anchors,
box decoding and NMS stay whole and are part of the measured fixed cost.
"""

from .core import analyze_detector, masked_detector, slim_detector
from .data import CocoDetection, GeneratedDetection, VOCDetection, open_detection_data
from .data import loader as detection_loader
from .implant import implant
from .io import export_detector_onnx, load_detector, save_detector
from .latency import calibrated_detector_model, validate_detector
from .metric import evaluate_map
from .models import create_detector
from .prune import DetectionPruneReport, detection_importance, finetune, prune_detector, recalibrate_bn
from .wrap import DetectorCore, DetectorFamily, FixedRoIPool, family_of, register_family

__all__ = ["CocoDetection", "DetectionPruneReport", "DetectorCore", "DetectorFamily", "FixedRoIPool",
           "GeneratedDetection", "VOCDetection", "analyze_detector", "calibrated_detector_model", "create_detector",
           "detection_importance", "detection_loader", "evaluate_map", "export_detector_onnx", "open_detection_data",
           "family_of", "finetune", "implant", "load_detector", "masked_detector", "prune_detector",
           "recalibrate_bn", "register_family", "save_detector", "slim_detector", "validate_detector"]
