"""The codes every result speaks in: the SR, and the HL7 and FHIR messages built from the same result.

One table, so a finding has the same code wherever it is sent (the README lists them with their sources).
"""

from __future__ import annotations

import highdicom as hd

PRIVATE_SCHEME = "99IHD"

FINDING_CODES: dict[str, hd.sr.CodedConcept] = {
    "any": hd.sr.CodedConcept("1386000", "SCT", "Intracranial hemorrhage"),
    "epidural": hd.sr.CodedConcept("EDH", PRIVATE_SCHEME, "Epidural hemorrhage"),
    "intraparenchymal": hd.sr.CodedConcept("274100004", "SCT", "Cerebral hemorrhage"),
    "intraventricular": hd.sr.CodedConcept("IVH", PRIVATE_SCHEME, "Intraventricular hemorrhage"),
    "subarachnoid": hd.sr.CodedConcept("21454007", "SCT", "Subarachnoid hemorrhage"),
    "subdural": hd.sr.CodedConcept("35486000", "SCT", "Subdural hemorrhage"),
}
PROCEDURE_REPORTED = hd.sr.CodedConcept("303653007", "SCT", "Computed tomography of head")
# CID 241 "Present/Absent Only" (PS3.16): the SNOMED CT codes that replace the retired DCM 121053/121054.
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
# Where every finding lies (CID 7140 "Brain Structures for Reporting"); one site for all six classes.
FINDING_SITE = hd.sr.CodedConcept("128319008", "SCT", "Intracranial structure")
# Probabilities travel as percent (75.0 "%"): viewers print a NUM as value and unit code, and "{probability}"
# (UCUM's annotation for a 0-1 ratio) showed raw beside every outline in OHIF.
PROBABILITY_UNIT = hd.sr.CodedConcept("%", "UCUM", "percent")
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
