"""Constants shared by every stage: the six outputs and the paper's preprocessing numbers.

Kept free of torch and DICOM imports so the network side and the model side can both use it.
"""

# Order of the model's six outputs everywhere (arrays, checkpoints, JSON, SR).
CLASSES: tuple[str, ...] = (
    "any",
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
SUBTYPES: tuple[str, ...] = CLASSES[1:]

# The findings as a doctor names them (captures, SR labels, alerts, console); "any" is the overall
# probability of intracranial hemorrhage.
FINDING_NAMES: dict[str, str] = {
    "any": "Intracranial hemorrhage",
    "epidural": "Epidural hemorrhage",
    "intraparenchymal": "Intraparenchymal hemorrhage",
    "intraventricular": "Intraventricular hemorrhage",
    "subarachnoid": "Subarachnoid hemorrhage",
    "subdural": "Subdural hemorrhage",
}

# (window centre, window width) in HU: brain, subdural, soft tissue (paper section 3.1).
WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0), (40.0, 380.0))

# Per-channel normalisation of the windowed [0, 1] image (paper / RSNA statistics).
CHANNEL_MEAN: tuple[float, float, float] = (0.1738, 0.1433, 0.1970)
CHANNEL_STD: tuple[float, float, float] = (0.3161, 0.2850, 0.3111)

# The paper resizes 512x512 slices to 256x256 with linear interpolation.
PAPER_INPUT_SIZE = 256

NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"

# A result of a series analysed before all its images may have arrived (completion checks still holding it
# when max_wait ran out). Distinct from the SR's PreliminaryFlag PRELIMINARY, which every result carries
# because no physician verified it: a RIS that shows that flag must not read it as "series incomplete".
INCOMPLETE_SERIES = "INCOMPLETE SERIES"
INCOMPLETE_SERIES_LINE = f"{INCOMPLETE_SERIES} - analysed before all images may have arrived"
