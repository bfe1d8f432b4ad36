"""Visualisation of SALT-Net: detections, ground truth, and SALT's two point sets.

The point sets are the model's own output: built with ``output_point_sets`` (see
:class:`~saltnet.export.Predictor` and :class:`~saltnet.modeling.point_sets.PointSetOutputs`:
SALT-Net and the SALT plug-ins on RetinaNet / FCOS), every detection carries the nine
regression (``pred_reg_points``) and nine classification (``pred_cls_points``) sampling points
of the location it was decoded from, in the input image's pixels.
"""

from typing import Dict, Optional, Tuple

import matplotlib as mpl
import numpy as np
from detectron2.data import Metadata
from detectron2.structures import Instances
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer

from ..export.predictor import Predictor
from ..modeling.point_sets import POINT_SET_FIELDS

__all__ = [
    "REG_POINT_COLOR",
    "CLS_POINT_COLOR",
    "SALTVisualizationDemo",
    "draw_point_sets",
    "draw_predictions_and_gt",
]

REG_POINT_COLOR = (1.0, 0.2, 0.2)  # regression points: red
CLS_POINT_COLOR = (0.2, 0.5, 1.0)  # classification points: blue


def draw_point_sets(
    vis: VisImage, instances: Instances, max_instances: int = 3, radius: Optional[float] = None
) -> VisImage:
    """Draw the regression (red) and classification (blue) points of the top detections.

    ``instances`` needs ``scores`` and the point-set fields (``pred_reg_points``,
    ``pred_cls_points``) in the frame of ``vis``; ``radius`` is in pixels.
    """
    if radius is None:
        radius = max(1.5, 0.008 * max(vis.height, vis.width))
    order = instances.scores.argsort(descending=True)[:max_instances].tolist()
    for k in order:
        for name, color in zip(POINT_SET_FIELDS, (REG_POINT_COLOR, CLS_POINT_COLOR)):
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
    (``instances`` then needs ``pred_reg_points`` / ``pred_cls_points``). Small images are
    enlarged to at least ``min_size`` pixels on their longer side.
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
    """detectron2's demo ``VisualizationDemo`` for SALT-Net: the detections of ``predictor``,
    with the point sets of the ``num_point_instances`` best if its model outputs them."""

    def __init__(
        self,
        predictor: Predictor,
        metadata: Metadata,
        num_point_instances: int = 3,
        instance_mode=ColorMode.IMAGE,
    ):
        self.predictor = predictor
        self.metadata = metadata
        self.show_points = predictor.model.output_point_sets
        self.num_point_instances = num_point_instances
        self.instance_mode = instance_mode

    def predict(self, image_bgr: np.ndarray) -> Instances:
        """Detections (with point sets if ``show_points``) of a BGR image, on the CPU."""
        return self.predictor(image_bgr)["instances"].to("cpu")

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
