"""Associations the node requests (delivery; the simulator that plays a modality): socket options and
one fix of pynetdicom's requestor loop. Shared below the stages, beside ihd_node.dicom_network.
"""

from __future__ import annotations

import time

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association

from ihd_node.dicom_network import ended, set_nodelay


def on_outgoing_connection(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for associations the node requests (sender, simulator): TCP_NODELAY on its
    socket, and the requestor reactor that cannot take a response meant for a send_*() (RequestorAssociation).

    The connection opens before the association is negotiated, so the class is in place before pynetdicom
    calls its reactor loop."""
    if event.assoc.dul.socket is not None:
        set_nodelay(event.assoc.dul.socket)
    if type(event.assoc) is Association and _requestor_fix_available():
        event.assoc.__class__ = RequestorAssociation  # same state, other reactor loop (no new attributes)


class RequestorAssociation(Association):
    """Requestor whose reactor never takes a response that a send_*() call waits for.

    pynetdicom pauses its reactor for each send_*() with a flag pair: the sender clears a checkpoint and waits
    until the reactor says it is paused. The reactor says so *before* waiting at the checkpoint; when it has
    just passed the checkpoint, the sender can read "paused", send its request, and the reactor then takes
    the response off the DIMSE queue as if it were a request ("Received unexpected C-STORE service message").
    The sender waits dimse_timeout for a response that never comes and aborts the association. On a loaded
    2-core machine this hit about one C-STORE in a few thousand (tests/reliability/test_load.py;
    tests/test_network.py widens the window until it happens within 10 messages). Here the reactor checks
    the checkpoint again after saying it runs: a sender that cleared it in between owns the queue, and the
    reactor goes back to waiting. The checks after it are pynetdicom's, in its order (ihd_node.dicom_network.ended)."""

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            time.sleep(0.001)
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if not self._reactor_checkpoint.is_set():  # a send_*() paused the reactor meanwhile
                continue
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, int(context_id))  # type: ignore[arg-type]
            if ended(self):
                return


def _requestor_fix_available() -> bool:
    # _reactor_checkpoint, _is_paused and network_timeout_response are set per instance in 3.0's __init__
    return pynetdicom.__version__.startswith("3.") and all(
        hasattr(Association, n) for n in ("_run_reactor", "_serve_request", "kill", "release", "abort"))
