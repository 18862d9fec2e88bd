"""Inference: multi-scale + flip prediction, the reference's post-processing, dense CRF, export.

One image goes ``preprocess`` (resize per scale, normalise, optional size buckets) ->
``predict`` (forward passes, masks averaged at the image size) -> ``postprocess`` (class
presence, background power, CRF, argmax) -> ``export`` (label PNGs, restart keys, overlays);
``runner.run_inference`` drives a stream of examples over the local devices and scores them.
The command line is ``python -m slr_jax.infer`` (the flags of ``python -m slr_jax.main
--mode=infer``); docs/inference.md describes the outputs.
"""

from slr_jax.errors import InferenceError
from slr_jax.infer.export import export_pseudo_labels, output_paths, overlay_image, save_label_png
from slr_jax.infer.postprocess import adjust_probabilities, class_presence, masks_to_labels
from slr_jax.infer.predict import multiscale_predict, multiscale_predict_async
from slr_jax.infer.preprocess import (
    collect_image_paths,
    normalise_image,
    read_photograph,
    scaled_input,
)
from slr_jax.infer.runner import inference_settings, run_inference

__all__ = [
    "InferenceError",
    "adjust_probabilities",
    "class_presence",
    "collect_image_paths",
    "export_pseudo_labels",
    "inference_settings",
    "masks_to_labels",
    "multiscale_predict",
    "multiscale_predict_async",
    "normalise_image",
    "output_paths",
    "overlay_image",
    "read_photograph",
    "run_inference",
    "save_label_png",
    "scaled_input",
]
