"""Does the model work here (issue 19): the radiologist's reads against the node's results.

stats (pure math: Wilson intervals, AUC with DeLong's interval, calibration, operating points), card (the
model card's own figures from a checkpoint's metadata), performance (local performance per class and
period), labels (reading and checking a CSV of reads). Imports store, config and shared modules only.
"""

from ihd_node.monitoring.card import card_figures
from ihd_node.monitoring.performance import (
    MAX_INTERVAL_WIDTH,
    MIN_READS,
    ClassPerformance,
    PerformanceReport,
    local_performance,
)
from ihd_node.monitoring.stats import (
    AUC_MIN_CASES,
    CalibrationBin,
    OperatingPoint,
    auc_with_interval,
    calibration_deciles,
    operating_points,
    wilson_interval,
)

__all__ = [
    "AUC_MIN_CASES", "MAX_INTERVAL_WIDTH", "MIN_READS", "CalibrationBin", "ClassPerformance", "OperatingPoint",
    "PerformanceReport", "auc_with_interval", "calibration_deciles", "card_figures", "local_performance",
    "operating_points", "wilson_interval",
]
