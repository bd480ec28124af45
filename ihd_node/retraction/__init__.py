"""Results for the clinical systems and taking them back (issue 18).

- messages: the per-destination message files of one result (HL7 ORU for hl7 destinations, FHIR Bundle for
  fhir ones, the object list of dicomweb ones), written before the outbox rows that send them; the node's
  worker calls it at analysis time, `retract` at retraction time.
- retract: `retract()` books a retraction and queues its notices (IOCM rejection note, withdrawn ORU,
  entered-in-error FHIR report); `ihd-node retract` and the console's retract action call it.

Floor 7 (as intake): it uses report (message and KOS builders), delivery (nothing yet), store and config; the
console (web, 8), the node (9) and the commands (10) call it.
"""

from ihd_node.retraction.messages import message_id, result_messages
from ihd_node.retraction.retract import Retraction, RetractionRefused, retract

__all__ = ["Retraction", "RetractionRefused", "message_id", "result_messages", "retract"]
