"""The `monitoring:` section: how the node watches for drift after go-live (ihd_node.monitoring.drift).

The reference window is what "normal" means for this site: the first `reference_weeks` weeks of results
(from the first analysis on), or the first `reference_results` results when that is set. The current window
is the last `window_days` days. Each check compares the two by a population stability index (PSI) per input
feature and per class score; a PSI at or above `alert_psi` opens a drift episode (one alert on the alert
channels, `/healthz` says "warning"); the episode ends once every PSI is back under `warning_psi`.
"""

from __future__ import annotations

from pydantic import model_validator

from ihd_node.config.fields import Bool, Int, Num, Section, setting


class MonitoringConfig(Section):
    drift: Bool = setting(True, "Compare the input mix and the score distributions with the reference window.")
    reference_weeks: Int = setting(
        4, "The reference window: the first N weeks of results, counted from the first analysis.", 4, ge=1)
    reference_results: Int | None = setting(
        None, "When set, the reference window is the first N analysed series instead of the first weeks.", 200,
        ge=1)
    window_days: Num = setting(7.0, "The current window: results of the last N days (after the reference).", 7,
                               gt=0)
    warning_psi: Num = setting(
        0.1, "PSI of a feature shown as a warning on /performance; an open drift episode ends once every PSI is "
        "below it.", 0.1, gt=0)
    alert_psi: Num = setting(0.25, "PSI at or above which a drift episode opens (alert, /healthz warning).", 0.25,
                             gt=0)
    min_results: Int = setting(
        30, "Fewest results in the reference and in the current window before drift is judged at all.", 30, ge=1)
    check_seconds: Num = setting(3600.0, "How often the running node checks for drift.", 3600, gt=0)
    alert: Bool = setting(True, "Announce a new drift episode on every channel of `alerts.channels`.")

    @model_validator(mode="after")
    def _order(self) -> MonitoringConfig:
        if self.warning_psi > self.alert_psi:
            raise ValueError(f"warning_psi {self.warning_psi} is above alert_psi {self.alert_psi}; the warning "
                             "limit is the lower one")
        return self
