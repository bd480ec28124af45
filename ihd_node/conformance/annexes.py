"""Sections 3 to 6 of the statement: media, character sets, security, annexes (created objects, templates and
codes, private attributes, the IHE integration statement)."""

from __future__ import annotations

import ssl

from ihd_node.classes import NOT_FOR_DIAGNOSTIC_USE
from ihd_node.config.audit import describe as describe_audit
from ihd_node.conformance.facts import Facts, uid_name
from ihd_node.conformance.render import Document
from ihd_node.report.codes import PRIVATE_SCHEME
from ihd_node.report.source import IDENTITY_ATTRIBUTES, UTF8
from ihd_node.sr_classes import SR_CLASS_NAMES

KOS_REJECTION = "IOCM rejection note"


def media(doc: Document) -> None:
    doc.h(1, "3 Media Interchange")
    doc.p("Not supported: ihd-node reads and writes no DICOM media (no File-set Reader, Creator or Updater). "
          "`ihd-node analyze PATH --out DIR` reads and writes DICOM files for offline checks, without a DICOMDIR.")


def character_sets(doc: Document, facts: Facts) -> None:
    doc.h(1, "4 Support of Character Sets")
    doc.p("**Received objects** are stored byte for byte whatever their Specific Character Set (0008,0005); no "
          "object is refused for its character set. The node reads patient and study text in the sets below; an "
          "absent value or `ISO_IR 6` (not a defined term) reads as the default repertoire.")
    doc.p(f"**Created objects** are written in the source's own Specific Character Set when it can carry every "
          f"text of the object, so copied names stay byte-identical; ISO 2022 code extensions keep their form "
          f"(also with an empty first value). A source on the default repertoire stays there when all text is "
          f"ASCII. Text the source's set cannot carry, or an unknown term, makes the object `{UTF8}` (UTF-8).")
    doc.table("character-sets", "Specific Character Set values read and written",
              ["Defined term", "Python codec", "Read", "Written"],
              [[term, codec, "Yes", "Yes"] for term, codec in facts.character_sets])


def security(doc: Document, facts: Facts) -> None:
    cfg = facts.config
    default = ssl.create_default_context()
    minimum = default.minimum_version.name.replace("TLSv", "TLS ").replace("_", ".")
    doc.h(1, "5 Security")
    doc.h(2, "5.1 Security Profiles")
    inbound = ("enabled: only TLS on node.port" + (", client certificates required"
                                                   if cfg.node.tls.require_client_certificate else
                                                   ", client certificates verified when sent"
                                                   if cfg.node.tls.ca_certificates else ""))
    doc.table("tls", "DICOM TLS (this configuration)", ["Direction", "TLS", "Peer authentication"], [
        ["Inbound (node.tls)", inbound if cfg.node.tls.enabled else "off (plain TCP)",
         "server certificate node.tls.certificate; client certificates against node.tls.ca_certificates"],
        *[[f"Outbound to {d.name}", "enabled" if d.tls.enabled else "off", "the destination's certificate and "
           "host name are verified (tls.ca_certificates or the system CAs); client certificate when configured"]
          for d in cfg.dicom_destinations]])
    doc.p(f"TLS uses the Python `ssl` default context of the installed OpenSSL ({ssl.OPENSSL_VERSION}): "
          f"{minimum} or later, its default cipher suites, certificates in PEM files. This follows BCP 195, which "
          "PS3.15's BCP 195 TLS Secure Transport Connection Profiles reference; the node does not restrict the "
          "cipher list further and claims no other PS3.15 security profile.")
    doc.h(2, "5.2 Association Level Security")
    doc.p("Associations are admitted only for the node's called AE title, the configured calling AE titles and "
          "source addresses (section 2.2.1.4.1), and refused while the analysis queue is full. User Identity "
          "negotiation is not supported.")
    doc.h(2, "5.3 Application Level Security")
    doc.ul([f"Audit trail (IHE ATNA, DICOM PS3.15 A.5 audit messages, each checked against the standard's schema): "
            f"{describe_audit(facts.config.audit).removeprefix('audit: ')}. Events: application start and stop "
            "(110100), configuration "
            "change, association refused and console actions (110113), instances received and sent per study "
            "(110104), exports to HL7, FHIR and DICOMweb (110106), the PACS instance-count query (110112), "
            "console log-in (110114), retraction (110103), reads imported (110107).",
            "The log database and the node's log never carry a patient name or birth date.",
            "Received files are stored owner-only (mode 0600) under storage.dir."])


def annexes(doc: Document, facts: Facts) -> None:
    doc.h(1, "6 Annexes")
    doc.h(2, "6.1 IOD Contents")
    doc.h(3, "6.1.1 Created SOP Instances")
    doc.table("created", "Created SOP instances (read from a result set the report stage builds)",
              ["Object", "SOP Class", "SOP Class UID", "Transfer Syntax of the file", "Modality",
               "Series Description", "Content Template"],
              [[c.kind, uid_name(c.sop_class), c.sop_class, f"{uid_name(c.transfer_syntax)} ({c.transfer_syntax})",
                c.modality, c.series_description, c.template or "-"] for c in facts.created])
    doc.p("Every created object is in the source study, in a series of its own, with "
          f"\"{NOT_FOR_DIAGNOSTIC_USE}\" in its Series Description. The SR is sent as "
          f"{' or '.join(SR_CLASS_NAMES.values())}: the first of these, from the destination's sr_class on, that "
          "the destination accepts (its content is 2D only, valid in each). Basic Text SR is not created.")
    doc.table("created-values", "Fixed values of created objects", ["Object", "Attribute", "Value"],
              [[c.kind, k, v] for c in facts.created for k, v in c.values if k != "SpecificCharacterSet"])
    for c in facts.created:
        doc.p(f"**{c.kind}** ({uid_name(c.sop_class)}): attributes present at the top level: "
              + ", ".join(c.attributes) + ".")
    doc.h(3, "6.1.2 Usage of Attributes from Received IODs")
    doc.p("Of received CT objects the node reads the SOP, study and series UIDs, Modality, SOP class, image "
          "geometry (Image Position/Orientation (Patient), Pixel Spacing, Slice Thickness; per-frame functional "
          "groups of Enhanced CT), Rescale Slope/Intercept, Pixel Data, Image Type / Frame Type (localizers), "
          "Body Part Examined, Convolution Kernel, Series Description and Number, Instance Number, Lossy Image "
          "Compression, and the patient and study attributes it copies into the results.")
    doc.h(3, "6.1.3 Attribute Mapping")
    doc.p("The results repeat the source's patient and study attributes (the highdicom core: Patient Name, ID, "
          "Birth Date, Sex, Study Date/Time/ID, Accession Number, Referring Physician) and, when the source has "
          "them: " + ", ".join(IDENTITY_ATTRIBUTES) + ". The SR, captures, Segmentation and key images reference "
          "the source images (and frames) by SOP Instance UID.")
    doc.h(3, "6.1.4 Coerced/Modified Fields")
    doc.p("None: received objects are stored as received and never changed. Missing Type 2 attributes of a "
          "sparse source are written empty in the results.")
    doc.h(2, "6.2 Data Dictionary of Private Attributes")
    doc.p("The created objects contain no private attributes." if not facts.private_tags else
          "Private attributes in the created objects: " + ", ".join(facts.private_tags) + ".")
    doc.h(2, "6.3 Coded Terminology and Templates")
    doc.table("templates", "Templates in the SR (counts from the specimen: a series with all findings but one present "
              "on two slices)", ["Template", "Title", "Instances in the specimen"],
              [[t, title, str(n)] for t, title, n in facts.templates])
    doc.table("codes", "Coded terms in the created objects", ["Coding Scheme", "Code Value", "Code Meaning",
                                                             "Used in"],
              [[c.scheme, c.value, c.meaning, ", ".join(sorted(c.used_in))] for c in facts.codes])
    private = [c for c in facts.codes if c.scheme == PRIVATE_SCHEME]
    if private:
        doc.p(f"`{PRIVATE_SCHEME}` is a private coding scheme, declared in CodingSchemeIdentificationSequence, "
              f"for {', '.join(c.meaning for c in private)}: public sources disagreed on their SNOMED CT codes.")
    doc.h(2, "6.4 Grayscale Image Consistency")
    doc.p("Not supported (no Grayscale Standard Display Function calibration; the captures are RGB).")
    doc.h(2, "6.5 Standard Extended, Specialized and Private SOP Classes")
    doc.p("None. All created objects are standard SOP classes.")
    doc.h(2, "6.6 Private Transfer Syntaxes")
    doc.p("None.")
    integration_statement(doc, facts)


def integration_statement(doc: Document, facts: Facts) -> None:
    kinds = {c.kind for c in facts.created}
    air = [name for name, done in facts.primitives.items() if done]
    no_air = [name for name, done in facts.primitives.items() if not done]
    doc.h(2, "6.7 IHE Integration Statement")
    rows = [["AI Results (AIR)", "Evidence Creator", "Store AI results as Comprehensive 3D SR (TID 1500) in the "
             f"source study; encoded result primitives: {', '.join(air)}", "Yes"]]
    if "Attention regions" in kinds:
        rows.append(["AI Results (AIR)", "Evidence Creator", "Segmentation (BINARY) of the attention regions, "
                     "referenced from the SR (TID 1411)", "Yes"])
    if KOS_REJECTION in kinds:
        rows.append(["Imaging Object Change Management (IOCM)", "Change Requester", "Rejection note \"Rejected for "
                     "Patient Safety Reasons\" (DCM 113037) for a retracted result set", "Yes"])
    if "Key images" in kinds:
        rows.append(["Key Image Note (KIN)", "Evidence Creator", "Key Object Selection \"Of Interest\" (DCM "
                     "113000) of the slices with findings; not tested at an IHE Connectathon", "Partly"])
    rows += [["AI Results (AIR)", "Image Manager/Archive, Image Display", "-", "No"],
             ["AI Workflow for Imaging (AIW-I)", "any", "no UPS workitems", "No"],
             ["Scheduled Workflow (SWF.b)", "Image Manager", "MPPS is received (2.2.1.4.3) only as evidence of "
              "completeness; no Storage Commitment, no Query/Retrieve SCP", "No"],
             ["Audit Trail and Node Authentication (ATNA)", "Secure Application", "Audit record transmission "
              "(ITI-20) as RFC 5424 syslog over TLS (RFC 5425) or UDP (RFC 5426), with a durable outbox; DICOM "
              "TLS optional (section 5.1); the host's own node authentication and time synchronization (ITI-1) "
              "are the site's; not tested at an IHE Connectathon", "Partly"]]
    doc.table("ihe", "IHE integration statement", ["Integration Profile", "Actor", "Options and notes",
                                                   "Supported"], rows)
    doc.p("AIR result primitives not encoded: " + (", ".join(no_air) or "none") + ". Not supported at all: "
          "Storage Commitment, Query/Retrieve SCP, Modality Worklist, IOCM data adjustment and expiration, "
          "IOCM rejection notes other than Rejected for Patient Safety Reasons, Basic Text SR.")
