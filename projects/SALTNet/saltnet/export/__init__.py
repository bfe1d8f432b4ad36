"""Inference: the predictor of a trained model, and TorchScript / ONNX export with its predictor."""

from .exporter import ExportedPredictor, export_model, load_exported
from .predictor import Predictor

__all__ = ["ExportedPredictor", "Predictor", "export_model", "load_exported"]
