"""Evaluation, one path: held-out pairs (``samples``), generation in-process or with Ray Data, one
seed per pair (``generate``), metrics (``metrics``), the report every figure comes from
(``report.evaluate``); plus the VITON-HD reader (``viton``) and the auto-mask agreement command
(``automask_iou``)."""
