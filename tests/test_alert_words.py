"""What an alert says about a series analysed before all its images may have arrived: INCOMPLETE SERIES,
never "PRELIMINARY" (the word every SR's PreliminaryFlag carries because no physician verified it)."""

from __future__ import annotations

from dataclasses import replace

from ihd_node.delivery.alerts import Finding, Message


def message(incomplete: bool) -> Message:
    return Message(node="IHD_AI", accession_number="A1", study_date="2026-01-02", study_instance_uid="1.2.3",
                   series_instance_uid="1.2.3.4", series_description="HEAD", revision=1,
                   findings=[Finding("subdural", "Subdural hemorrhage", 0.91)], overall=0.93, model="m 1",
                   incomplete_series=incomplete, console_url=None, viewer_url=None)


def test_an_incomplete_series_alert_says_so_in_its_own_words() -> None:
    text = message(True).text()
    assert "INCOMPLETE SERIES: analysed before all images may have arrived" in text
    assert "PRELIMINARY" not in text.upper()
    body = message(True).as_json()
    assert body["incomplete_series"] is True and body["preliminary"] is True  # the former name, kept
    complete = replace(message(True), incomplete_series=False)
    assert "INCOMPLETE" not in complete.text() and complete.as_json()["incomplete_series"] is False
