"""slr_jax.metrics against sklearn and the reference's eval_voc formula."""

import numpy as np
import pytest
from PIL import Image

from slr_jax import constants, metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")

NUM_CLASSES = 6
IGNORE = 255


def _random_maps(seed, shape=(3, 17, 23), num_classes=NUM_CLASSES, ignore_frac=0.15):
    """(pred, gt) int label maps; gt has ~ignore_frac pixels at IGNORE, pred a few too."""
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, num_classes, size=shape)
    # Predictions agree with gt most of the time so IoUs are spread, not all ~1/C.
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, num_classes, size=shape))
    gt = np.where(rng.random(shape) < ignore_frac, IGNORE, gt)
    pred = np.where(rng.random(shape) < 0.03, IGNORE, pred)
    return pred.astype(np.uint8), gt.astype(np.uint8)


def _reference_style_inputs(pred, gt):
    """Flattened (pred, gt) as the reference scores them: gt ignore dropped, pred ignore -> 0."""
    keep = gt != IGNORE
    pred = np.where(pred == IGNORE, 0, pred)
    return pred[keep].astype(np.int64), gt[keep].astype(np.int64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_matches_sklearn(seed):
    pred, gt = _random_maps(seed)
    ours = metrics.confusion_matrix(pred, gt, NUM_CLASSES, ignore_index=IGNORE)
    p, g = _reference_style_inputs(pred, gt)
    expected = sklearn_metrics.confusion_matrix(g, p, labels=list(range(NUM_CLASSES)))
    np.testing.assert_array_equal(ours, expected)
    assert ours.dtype == np.int64
    assert ours.sum() == int((gt != IGNORE).sum())


@pytest.mark.parametrize("seed", [3, 4])
def test_scores_match_sklearn_and_reference_formula(seed):
    pred, gt = _random_maps(seed)
    scores = metrics.segmentation_scores(
        metrics.confusion_matrix(pred, gt, NUM_CLASSES, ignore_index=IGNORE)
    )
    p, g = _reference_style_inputs(pred, gt)
    labels = list(range(NUM_CLASSES))
    iou = sklearn_metrics.jaccard_score(g, p, labels=labels, average=None)
    np.testing.assert_allclose(scores["iou"], iou, rtol=1e-12)
    assert scores["miou"] == pytest.approx(iou.mean(), rel=1e-12)
    assert scores["pixel_accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(g, p))
    recall = sklearn_metrics.recall_score(g, p, labels=labels, average=None)
    np.testing.assert_allclose(scores["class_accuracy"], recall, rtol=1e-12)
    assert scores["mean_class_accuracy"] == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(g, p)
    )

    # tools/eval_voc.py: gtj = row sums, resj = column sums, fp = 1 - gtj/denom,
    # fn = 1 - resj/denom, with denom = gtj + resj - diag (written out independently here).
    conf = sklearn_metrics.confusion_matrix(g, p, labels=labels).astype(np.float64)
    gtj, resj, diag = conf.sum(1), conf.sum(0), np.diag(conf)
    denom = gtj + resj - diag
    np.testing.assert_allclose(scores["fp"], 1.0 - gtj / denom, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(scores["fn"], 1.0 - resj / denom, rtol=1e-9, atol=1e-12)
    assert scores["bg_fp"] == pytest.approx(1.0 - gtj[0] / denom[0])
    assert scores["mean_fg_fn"] == pytest.approx(np.mean(1.0 - resj[1:] / denom[1:]))
    np.testing.assert_allclose(scores["iou"] + scores["fp"] + scores["fn"], 1.0, rtol=1e-12)


def test_reference_eval_voc_formula_if_importable(reference_file):
    """The confusion matrix of the reference's tools/eval_voc.py (chainercv), when importable."""
    reference_file("tools", "eval_voc.py")
    pytest.importorskip("chainercv.evaluations")
    from chainercv.evaluations import calc_semantic_segmentation_confusion

    pred, gt = _random_maps(7, shape=(4, 20, 20))
    gt_chainer = np.where(gt == IGNORE, -1, gt.astype(np.int32))
    pred_ref = np.where(pred == IGNORE, 0, pred)
    conf = calc_semantic_segmentation_confusion(list(pred_ref), list(gt_chainer))
    conf = conf[:NUM_CLASSES, :NUM_CLASSES]
    ours = metrics.confusion_matrix(pred, gt, NUM_CLASSES, ignore_index=IGNORE)
    np.testing.assert_array_equal(ours, conf)


def test_absent_class_is_nan_and_left_out_of_means():
    gt = np.array([[0, 0, 1, 1]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1]], dtype=np.uint8)
    scores = metrics.segmentation_scores(metrics.confusion_matrix(pred, gt, 3))
    assert np.isnan(scores["iou"][2]) and np.isnan(scores["fp"][2])
    np.testing.assert_allclose(scores["iou"][:2], [1 / 2, 2 / 3])
    assert scores["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 4)


def test_accumulator_equals_one_big_matrix():
    pred, gt = _random_maps(11, shape=(5, 9, 13))
    acc = metrics.ConfusionAccumulator(NUM_CLASSES)
    for p, g in zip(pred, gt, strict=True):
        acc.update(p, g)
    whole = metrics.segmentation_scores(metrics.confusion_matrix(pred, gt, NUM_CLASSES))
    np.testing.assert_array_equal(acc.confusion, metrics.confusion_matrix(pred, gt, NUM_CLASSES))
    np.testing.assert_allclose(acc.result()["iou"], whole["iou"])
    assert acc.num_updates == 5
    acc.reset()
    assert acc.confusion.sum() == 0


def test_bad_inputs_raise_clear_errors():
    gt = np.zeros((4, 4), np.uint8)
    with pytest.raises(metrics.EvaluationError, match="differs from ground-truth shape"):
        metrics.confusion_matrix(np.zeros((4, 5), np.uint8), gt, 3)
    with pytest.raises(metrics.EvaluationError, match=r"prediction holds labels \[7\]"):
        metrics.confusion_matrix(np.full((4, 4), 7, np.uint8), gt, 3)
    with pytest.raises(metrics.EvaluationError, match=r"ground truth holds labels \[5\]"):
        metrics.confusion_matrix(gt, np.full((4, 4), 5, np.uint8), 3)
    with pytest.raises(metrics.EvaluationError, match="integer label map"):
        metrics.confusion_matrix(np.zeros((4, 4), np.float32), gt, 3)
    with pytest.raises(ValueError, match="square"):
        metrics.segmentation_scores(np.zeros((3, 4)))


def test_class_name_tables():
    assert len(constants.VOC_CLASSES) == 21 and constants.VOC_CLASSES[15] == "person"
    assert len(constants.COCO_CLASSES) == 81 and constants.COCO_CLASSES[:2] == (
        "background",
        "person",
    )
    assert constants.COCO_CLASSES[-1] == "toothbrush"
    assert len(set(constants.COCO_CLASSES)) == 81


def test_format_iou_table():
    pred, gt = _random_maps(5, num_classes=21)
    scores = metrics.segmentation_scores(metrics.confusion_matrix(pred, gt, 21))
    table = metrics.format_iou_table(scores, constants.VOC_CLASSES)
    lines = table.splitlines()
    assert f"mIoU: {scores['miou']:.4f}" in lines[0]
    assert len(lines) == 4 + 21
    assert lines[4 + 15].split()[0] == "person"
    assert float(lines[4 + 15].split()[1]) == pytest.approx(scores["iou"][15], abs=1e-4)
    with pytest.raises(ValueError, match="21 class names given for 6 classes"):
        metrics.format_iou_table(
            metrics.segmentation_scores(np.eye(6, dtype=np.int64)), constants.VOC_CLASSES
        )


def _write_png(path, labels, palette=False):
    image = Image.fromarray(labels.astype(np.uint8), mode="L")
    if palette:
        image = image.convert("P")
    image.save(path)


def test_evaluate_folders(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    pred, gt = _random_maps(9, shape=(3, 15, 19))
    ids = ["2007_000001", "2007_000002", "2007_000003"]
    for i, name in enumerate(ids):
        _write_png(pred_dir / f"{name}.png", pred[i], palette=i == 1)
        _write_png(gt_dir / f"{name}.png", gt[i])
    scores = metrics.evaluate_folders(pred_dir, gt_dir, ids, NUM_CLASSES)
    expected = metrics.segmentation_scores(metrics.confusion_matrix(pred, gt, NUM_CLASSES))
    np.testing.assert_allclose(scores["iou"], expected["iou"])
    # ids=None: every PNG in the prediction folder.
    scores_all = metrics.evaluate_folders(pred_dir, gt_dir, None, NUM_CLASSES)
    assert scores_all["miou"] == pytest.approx(expected["miou"])

    with pytest.raises(metrics.EvaluationError, match=r"1 of 4 prediction PNGs missing.*nope"):
        metrics.evaluate_folders(pred_dir, gt_dir, ids + ["nope"], NUM_CLASSES)
    _write_png(gt_dir / "big.png", np.zeros((16, 19), np.uint8))
    _write_png(pred_dir / "big.png", np.zeros((15, 19), np.uint8))
    with pytest.raises(metrics.EvaluationError, match=r"big: prediction \(15, 19\)"):
        metrics.evaluate_folders(pred_dir, gt_dir, ["big"], NUM_CLASSES)
    Image.fromarray(np.zeros((15, 19, 3), np.uint8)).save(pred_dir / "rgb.png")
    _write_png(gt_dir / "rgb.png", np.zeros((15, 19), np.uint8))
    with pytest.raises(metrics.EvaluationError, match="single-channel"):
        metrics.evaluate_folders(pred_dir, gt_dir, ["rgb"], NUM_CLASSES)
    _write_png(pred_dir / "hi.png", np.full((15, 19), 30, np.uint8))
    _write_png(gt_dir / "hi.png", np.zeros((15, 19), np.uint8))
    with pytest.raises(metrics.EvaluationError, match=r"hi: prediction holds labels \[30\]"):
        metrics.evaluate_folders(pred_dir, gt_dir, ["hi"], NUM_CLASSES)
