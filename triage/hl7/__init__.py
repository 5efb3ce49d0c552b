"""The HL7 v2 boundary with the RIS: imaging orders in, ACKs back, the AI's preliminary results out, over MLLP.

Library: python-hl7 (`hl7` on PyPI) for everything here, and no second HL7 library.

- Parsing: its parser is tolerant the way a receiver must be (any encoding characters the sender declares in
  MSH-2, missing trailing fields, Z-segments, versions 2.3 to 2.8), and its accessors unescape field values
  (\\F\\, \\S\\, \\T\\, \\R\\, \\E\\, \\X..\\, \\.br\\) on the way out.
- Building: its containers and `escape` write the ACK in the sender's own encoding characters and the ORU^R01 in
  the standard ones, so free text never breaks a field, and the tests read both back with the same parser.
- Transport: `hl7.mllp` frames MLLP blocks (0x0b ... 0x1c 0x0d) on asyncio streams, with a buffer limit that
  bounds a message's size, and passes `ssl=` through to asyncio, which gives MLLP inside TLS on both sides.

hl7apy was tried for building with validation and left out: in 1.3.5 its STRICT level does not let OBX-5
(datatype "varies") take a datatype at all, building OBX-5 at the tolerant level proved fragile (a CWE value
missing from the output, 0.97 written as 0.96999999999999997335...), and its MLLP server is a plain
socketserver without TLS. Its STRICT parser did accept the ORU^R01 and ACKs written here as valid v2.5.1
(checked once by hand; PID-5, which v2.5.1 requires, is left empty on purpose: triage keeps no names).
"""

from triage.hl7.messages import (
    AI_NOTICE,
    SUPPORTED_ORDERS,
    Envelope,
    HL7Error,
    Order,
    ResultLine,
    ack,
    ack_status,
    build_oru,
    build_priority_notice,
    nak,
    parse_order,
    parse_orders,
)
from triage.hl7.mllp import MLLPError, MLLPServer, send, send_async

__all__ = [
    "AI_NOTICE",
    "SUPPORTED_ORDERS",
    "Envelope",
    "HL7Error",
    "MLLPError",
    "MLLPServer",
    "Order",
    "ResultLine",
    "ack",
    "ack_status",
    "build_oru",
    "build_priority_notice",
    "nak",
    "parse_order",
    "parse_orders",
    "send",
    "send_async",
]
