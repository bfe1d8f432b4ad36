"""Visualisation of SALT-Net: detections, ground truth, and SALT's two point sets.

For every detection, :func:`inference_with_point_sets` attaches the nine regression and nine
classification sampling points (the SALT operator's deformable-conv sampling positions) of the
FPN level and location it was decoded from (``pred_levels`` / ``pred_locations``), in pixels.
"""

from typing import Dict, List, Optional, Tuple

import matplotlib as mpl
import numpy as np
import torch
from detectron2.data import Metadata
from detectron2.engine.defaults import DefaultPredictor
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer

__all__ = [
    "REG_POINT_COLOR",
    "CLS_POINT_COLOR",
    "SALTVisualizationDemo",
    "draw_point_sets",
    "draw_predictions_and_gt",
    "inference_with_point_sets",
]

REG_POINT_COLOR = (1.0, 0.2, 0.2)  # regression points: red
CLS_POINT_COLOR = (0.2, 0.5, 1.0)  # classification points: blue


@torch.no_grad()
def inference_with_point_sets(model, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
    """Run a :class:`SALTNet` on ``batched_inputs`` (as its ``forward`` in eval mode).

    Returns, like the model, ``[{"instances": Instances}]`` in the output frame (``height`` /
    ``width`` of each input), with extra per-detection fields ``reg_points`` / ``cls_points``
    (R, 9, 2): the SALT point sets as (x, y) pixels of the output frame, in the raster order of
    a 3x3 kernel.
    """
    if not getattr(model.head, "salt_on", False):
        raise ValueError("The model's head runs without SALT (SALT_ON False): it has no points.")
    images = model.preprocess_image(batched_inputs)
    features = model.backbone(images.tensor)
    features = [features[f] for f in model.head_in_features]
    outputs = [model.head.forward_level(x, level) for level, x in enumerate(features)]
    scores, box_logits, coarse, reg_points, cls_points = (list(o) for o in zip(*outputs))
    results = model.forward_inference(images, features, (scores, box_logits, coarse))

    processed = []
    for i, (res, inputs) in enumerate(zip(results, batched_inputs)):
        height = inputs.get("height", res.image_size[0])
        width = inputs.get("width", res.image_size[1])
        device = res.scores.device
        scale = torch.tensor([width / res.image_size[1], height / res.image_size[0]], device=device)
        for name, points in (("reg_points", reg_points), ("cls_points", cls_points)):
            xy = torch.zeros(len(res), 9, 2, device=device)
            for k, (level, location) in enumerate(
                zip(res.pred_levels.tolist(), res.pred_locations.tolist())
            ):
                row, col = divmod(location, points[level].shape[-1])
                # (18,) (y, x) pairs in stride units, relative to the anchor point (col, row) x s.
                yx = points[level][i, :, row, col].float().view(9, 2)
                anchor = torch.tensor([col, row], device=device)
                xy[k] = (yx.flip(1) + anchor) * model.strides[level]
            res.set(name, xy * scale)
        processed.append({"instances": detector_postprocess(res, height, width)})
    return processed


def draw_point_sets(
    vis: VisImage, instances: Instances, max_instances: int = 3, radius: Optional[float] = None
) -> VisImage:
    """Draw the regression (red) and classification (blue) points of the top detections.

    ``instances`` needs ``scores``, ``reg_points`` and ``cls_points`` (see
    :func:`inference_with_point_sets`) in the frame of ``vis``; ``radius`` is in pixels.
    """
    if radius is None:
        radius = max(1.5, 0.008 * max(vis.height, vis.width))
    order = instances.scores.argsort(descending=True)[:max_instances].tolist()
    for k in order:
        for name, color in (("reg_points", REG_POINT_COLOR), ("cls_points", CLS_POINT_COLOR)):
            for x, y in instances.get(name)[k].tolist():
                vis.ax.add_patch(
                    mpl.patches.Circle((x, y), radius=radius, fill=True, color=color, alpha=0.9)
                )
    return vis


def draw_predictions_and_gt(
    image_rgb: np.ndarray,
    instances: Instances,
    dataset_dict: Dict,
    metadata: Metadata,
    score_thresh: float = 0.3,
    num_point_instances: int = 0,
    min_size: int = 384,
) -> np.ndarray:
    """Side-by-side RGB picture: detections above ``score_thresh`` (left), ground truth (right).

    With ``num_point_instances`` > 0, the point sets of that many top detections are drawn too
    (``instances`` then needs ``reg_points`` / ``cls_points``). Small images are enlarged to at
    least ``min_size`` pixels on their longer side.
    """
    scale = max(1.0, min_size / max(image_rgb.shape[:2]))
    instances = instances[instances.scores >= score_thresh].to("cpu")
    pred = Visualizer(image_rgb, metadata, scale=scale).draw_instance_predictions(instances)
    if num_point_instances > 0:
        pred = draw_point_sets(pred, instances, num_point_instances)
    gt = Visualizer(image_rgb, metadata, scale=scale).draw_dataset_dict(dataset_dict)
    gap = np.full((pred.get_image().shape[0], 8, 3), 255, dtype=np.uint8)
    return np.concatenate([pred.get_image(), gap, gt.get_image()], axis=1)


class SALTVisualizationDemo:
    """detectron2's demo ``VisualizationDemo`` for SALT-Net, optionally with point sets."""

    def __init__(
        self,
        cfg,
        metadata: Metadata,
        show_points: bool = False,
        num_point_instances: int = 3,
        instance_mode=ColorMode.IMAGE,
    ):
        self.predictor = DefaultPredictor(cfg)
        self.metadata = metadata
        self.show_points = show_points
        self.num_point_instances = num_point_instances
        self.instance_mode = instance_mode

    def predict(self, image_bgr: np.ndarray) -> Instances:
        """Detections (with point sets if ``show_points``) of a BGR image, on the CPU."""
        if not self.show_points:
            instances = self.predictor(image_bgr)["instances"]
        else:
            p = self.predictor
            image = image_bgr[:, :, ::-1] if p.input_format == "RGB" else image_bgr
            height, width = image.shape[:2]
            resized = p.aug.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
            inputs = {"image": tensor, "height": height, "width": width}
            instances = inference_with_point_sets(p.model, [inputs])[0]["instances"]
        return instances.to("cpu")

    def run_on_image(self, image_bgr: np.ndarray) -> Tuple[Instances, VisImage]:
        """Detections and their visualisation of a BGR (OpenCV) image."""
        instances = self.predict(image_bgr)
        image_rgb = image_bgr[:, :, ::-1]
        visualizer = Visualizer(image_rgb, self.metadata, instance_mode=self.instance_mode)
        vis = visualizer.draw_instance_predictions(instances)
        if self.show_points:
            vis = draw_point_sets(vis, instances, self.num_point_instances)
        return instances, vis

    def run_on_video(self, video):
        """Yield BGR visualisations of the frames of a ``cv2.VideoCapture``."""
        video_visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        while video.isOpened():
            success, frame = video.read()
            if not success:
                break
            instances = self.predict(frame)
            vis = video_visualizer.draw_instance_predictions(frame[:, :, ::-1], instances)
            if self.show_points:
                vis = draw_point_sets(vis, instances, self.num_point_instances)
            yield vis.get_image()[:, :, ::-1]
