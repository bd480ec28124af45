"""Every character set of PS3.3 C.12.1.1.2 gives results whose text reads back as the source's.

highdicom validates SpecificCharacterSet against a list without the code-extension forms (an empty first
value, as in the usual Japanese `\\ISO 2022 IR 87`), so such sources used to get no result at all. The
report decodes the source text with pydicom and labels the results with the source's own character set
(byte-identical names, which dcentvfy compares), or UTF-8 when that set cannot carry the text.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from test_report_common import dciodvfy, make_prediction, needs, write, write_ct_series

from ihd_node.imaging.volume import load_volume
from ihd_node.report import build_results
from ihd_node.report.source import (
    UTF8,
    _ascii_round_trips,
    _charset_terms,
    _round_trips,
    _texts,
    result_character_set,
)

# (SpecificCharacterSet values, patient name, study description), one per defined term or combination.
CASES: list[tuple[list[str], str, str]] = [
    ([], "Smith^John", "CT HEAD"),
    (["ISO_IR 6"], "Smith^John", "CT HEAD"),  # not a defined term, but common: the default repertoire
    (["ISO_IR 100"], "Buc^Jérôme", "Tête sans injection"),
    (["ISO_IR 101"], "Wałęsa^Lech", "Głowa"),
    (["ISO_IR 109"], "Għawdex^Ġorġ", "Ras"),
    (["ISO_IR 110"], "Jūratė^Šimkutė", "Galva"),
    (["ISO_IR 144"], "Иванов^Иван", "КТ головы"),
    (["ISO_IR 127"], "قباني^لنزار", "رأس"),
    (["ISO_IR 126"], "Διονυσιος", "Κεφάλι"),
    (["ISO_IR 138"], "שרון^דבורה", "ראש"),
    (["ISO_IR 148"], "Öztürk^Şule", "Baş BT"),
    (["ISO_IR 203"], "Œuvre^Zoé", "Tête"),
    (["ISO_IR 13"], "ﾔﾏﾀﾞ^ﾀﾛｳ", "CT"),
    (["ISO_IR 166"], "สมชาย^ใจดี", "ศีรษะ"),
    (["ISO 2022 IR 6"], "Smith^John", "CT HEAD"),
    (["ISO 2022 IR 100"], "Buc^Jérôme", "Tête"),
    (["ISO 2022 IR 144"], "Иванов^Иван", "КТ"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう", "頭部単純CT"),
    (["ISO 2022 IR 13", "ISO 2022 IR 87"], "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", "頭部CT"),
    (["", "ISO 2022 IR 87", "ISO 2022 IR 159"], "Mori^Ogai=森^鷗外=もり^おうがい", "頭部CT"),
    (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동", "두부 CT"),
    (["", "ISO 2022 IR 58"], "Zhang^SanFeng=张^三丰", "头部CT"),
    (["ISO_IR 192"], "Wang^XiaoDong=王^小東", "头部 CT — Kopf"),
    (["GB18030"], "Wang^XiaoDong=王^小东", "头部CT平扫"),
    (["GBK"], "王^小东", "头部CT"),
]
IDS = ["\\".join(terms) or "none" for terms, _, _ in CASES]


def relabel(paths: list[Path], terms: list[str], name: str, description: str) -> None:
    """Rewrite a series in another character set, with a name and study description in it."""
    for path in paths:
        ds = pydicom.dcmread(path)
        if terms:
            ds.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]
        else:
            del ds.SpecificCharacterSet
        ds.PatientName = name
        ds.ReferringPhysicianName = name
        ds.StudyDescription = description
        ds.save_as(path, enforce_file_format=True)


def every_element_set(source: Dataset, result: Dataset) -> list[str]:
    """The character set by a write-and-read check of every element (what result_character_set did
    before it checked only the elements with non-ASCII text)."""
    terms = _charset_terms(source)
    if all(t in ("", "ISO_IR 6") for t in terms):
        return [] if all(t.isascii() for t in _texts(result)) else [UTF8]
    if any(t not in python_encoding for t in terms):
        return [UTF8]
    everything = [e for e in result if e.keyword not in ("PixelData", "SpecificCharacterSet")]
    return terms if _round_trips(everything, terms) else [UTF8]


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> list[Path]:
    return write_ct_series(tmp_path_factory.mktemp("charset") / "src", n=3, size=64)


@pytest.mark.parametrize(("terms", "name", "description"), CASES, ids=IDS)
def test_text_reads_back_identical(series, tmp_path, terms, name, description):
    relabel(series, terms, name, description)
    source = pydicom.dcmread(series[0])
    assert str(source.PatientName) == name  # pydicom encodes and decodes this set
    results = build_results(load_volume(series), make_prediction(3, {"subdural": [1]}, size=64))
    assert len(results.all()) == 5  # SR, summary capture, one slice capture, SEG, key images
    for n, ds in enumerate(results.all()):
        back = pydicom.dcmread(write(ds, tmp_path / f"{n}.dcm"))
        for keyword in ("PatientName", "ReferringPhysicianName"):
            assert str(back[keyword].value) == str(source[keyword].value), (keyword, ds.Modality)
        # Bytes as the source's where the source's set is kept (what dcentvfy compares).
        if back.get("SpecificCharacterSet", "") not in ("ISO_IR 192",) or terms == ["ISO_IR 192"]:
            assert back["PatientName"].value.original_string == source["PatientName"].value.original_string
        # Checking only the non-ASCII elements picks the set that checking every element picks.
        assert result_character_set(source, ds) == every_element_set(source, ds), ds.Modality


@needs("dciodvfy")
@pytest.mark.parametrize("index", [IDS.index(i) for i in (
    "\\ISO 2022 IR 87", "\\ISO 2022 IR 149", "GB18030", "ISO_IR 100", "ISO_IR 144", "ISO_IR 6")])
def test_results_validate(series, tmp_path, index):
    relabel(series, *CASES[index])
    results = build_results(load_volume(series), make_prediction(3, {"subdural": [1]}, size=64))
    for n, ds in enumerate(results.all()):
        errors, _ = dciodvfy(write(ds, tmp_path / f"{n}.dcm"))
        assert not errors, "\n".join(errors)


def test_pydicom_gaps_are_filled():
    """ihd_node.charsets: Latin-9 and GB 2312 code extensions decode as PS3.5 Annex K shows."""
    from pydicom.charset import convert_encodings, decode_bytes
    from pydicom.valuerep import PersonName

    import ihd_node.charsets  # noqa: F401  (registers the fixes)

    annex_k = b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab="
    assert str(PersonName(annex_k, convert_encodings(["", "ISO 2022 IR 58"])).decode()) == \
        "Zhang^XiaoDong=张^小东"
    assert decode_bytes(b"\xbcuvre \xa4", convert_encodings("ISO_IR 203"), set()) == "Œuvre €"


def test_ascii_reads_back_in_every_known_set():
    """The premise of checking only non-ASCII text: pydicom writes ASCII unchanged in every set it knows,
    alone and in the code-extension combinations."""
    import ihd_node.charsets  # noqa: F401  (registers the fixes)

    combos = {(t,) for t in python_encoding} | {tuple(terms) for terms, _, _ in CASES if terms}
    assert not [terms for terms in sorted(combos) if not _ascii_round_trips(terms)]


def _result(nested: str, top: str = "CT HEAD") -> Dataset:
    """A result-like data set: many ASCII elements, one text at the top level, one inside a sequence."""
    ds = Dataset()
    ds.StudyDescription = top
    ds.SeriesDescription = "ICH AI - NOT FOR DIAGNOSTIC USE"
    ds.ImageComments = "x" * 2000
    item = Dataset()
    item.CodeMeaning = nested
    inner = Dataset()
    inner.ContentSequence = [item]
    ds.ContentSequence = [Dataset(), inner]
    return ds


@pytest.mark.parametrize(("source_terms", "nested", "top", "expected"), [
    ("ISO_IR 100", "Tête", "CT HEAD", ["ISO_IR 100"]),  # Latin-1 carries it: the source's set is kept
    ("ISO_IR 100", "Иванов", "CT HEAD", [UTF8]),  # Cyrillic deep in a sequence: Latin-1 cannot carry it
    ("ISO_IR 100", "plain", "Иванов", [UTF8]),  # and at the top level
    ("ISO_IR 144", "Иванов", "КТ", ["ISO_IR 144"]),
    (["", "ISO 2022 IR 87"], "山田", "CT", ["", "ISO 2022 IR 87"]),
    (["", "ISO 2022 IR 87"], "홍길동", "CT", [UTF8]),  # Hangul is not in JIS X 0208
    ("ISO_IR 100", "plain", "CT HEAD", ["ISO_IR 100"]),  # all ASCII: nothing to check, the set is kept
    (None, "plain", "CT HEAD", []),
    (None, "Tête", "CT HEAD", [UTF8]),  # no set and non-ASCII text only in a sequence
])
def test_non_ascii_text_decides_the_set_wherever_it_is(source_terms, nested, top, expected):
    import ihd_node.charsets  # noqa: F401  (registers the fixes)

    source = Dataset()
    if source_terms is not None:
        source.SpecificCharacterSet = source_terms
    result = _result(nested, top)
    assert result_character_set(source, result) == expected
    assert every_element_set(source, result) == expected
