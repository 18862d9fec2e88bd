"""The reference's side of the benchmark: the official PyTorch ``Net`` (wsss) with its
trainer's loss and optimiser, its multi-scale inference and parts of its step."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from slr_jax.parity.reference import _nchw, build_reference, reference_multiscale_predict
from slr_jax.parity.reference_train import weighted_terms


class ReferenceSide:
    """The official PyTorch ``Net`` (wsss) in training mode with its trainer's optimiser."""

    def __init__(
        self,
        repo: str,
        config: Any,
        inputs: dict[str, np.ndarray],
        seed: int,
        threads: int,
        detect_anomaly: bool,
    ):
        import torch

        self.torch = torch
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as tools/train_voc_wss.py
        torch.autograd.set_detect_anomaly(detect_anomaly)
        t0 = time.perf_counter()
        net, _ = build_reference(repo, "wsss", seed, int(config.model.num_classes))
        self.net = net.to(self.device)
        self.init_s = time.perf_counter() - t0
        self.config = config
        tr = config.train
        groups = self.net.parameter_groups()
        decays = (tr.weight_decay, 0.0, tr.weight_decay, 0.0)
        self.optimizer = torch.optim.SGD(
            [
                {"params": g, "lr": m * tr.lr, "weight_decay": d}
                for g, m, d in zip(groups, tr.lr_multipliers, decays)
            ],
            lr=tr.lr,
            momentum=tr.momentum,
            weight_decay=tr.weight_decay,
            nesterov=tr.nesterov,
        )
        self.x = _nchw(inputs["image"]).to(self.device)
        self.raw = _nchw(inputs["raw_image"]).to(self.device)
        self.labels = torch.from_numpy(np.ascontiguousarray(inputs["labels"])).to(self.device)
        self.loss = float("nan")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def forward_loss(self):
        """The weighted loss of tools/train_voc_wss.py after pretraining (graph recorded)."""
        coeff = tuple(float(c) for c in self.config.loss.loss_coeff)
        self.net.train()  # the reference's override also keeps frozen layers frozen
        cls_l, seg_l, reg_l, code_l, _, _ = self.net(self.x, self.raw, self.labels)
        return weighted_terms(cls_l, seg_l, reg_l, code_l, coeff)[1]

    def step(self) -> None:
        loss = self.forward_loss()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self._sync()
        self._last_loss = loss

    def finish_training(self) -> float:
        self.loss = float(self._last_loss.detach())
        return self.loss

    def inference_fn(self, photo: np.ndarray) -> Callable[[], Any]:
        test = self.config.test

        def run():
            self.net.eval()
            out = reference_multiscale_predict(
                self.net,
                photo,
                tuple(test.scales),
                flip=bool(test.flip),
                single_scale=str(test.mode) == "test",
                device=self.device,
            )
            self._sync()
            return out

        return run

    def piece_fns(self) -> dict[str, Callable[[], Any]]:
        """Backbone on both views (graph recorded), forward with loss, PAMR alone."""
        torch = self.torch
        net = self.net
        h, w = self.x.shape[-2:]
        small = torch.nn.functional.interpolate(
            self.x,
            (int(h * net.scale_factor), int(w * net.scale_factor)),
            mode="bilinear",
            align_corners=True,
        )
        stride4 = ((h - 1) // 4 + 1, (w - 1) // 4 + 1)
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn((self.x.shape[0], self.net.num_classes, *stride4), generator=gen)
        masks = logits.softmax(1).to(self.device)

        def backbone():
            net.train()
            net.backbone.forward_as_dict(self.x)
            net.backbone.forward_as_dict(small)
            self._sync()

        def forward_with_loss():
            self.forward_loss()
            self._sync()

        def run_pamr():
            with torch.no_grad():
                net.run_pamr(self.raw, masks)
            self._sync()

        return {
            "backbone_forward": backbone,
            "forward_with_loss": forward_with_loss,
            "pamr": run_pamr,
        }
