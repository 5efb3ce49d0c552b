"""HL7 v2 messages with python-hl7: imaging orders read, ACKs written, the AI's preliminary results as ORU^R01.

Segment and field numbers are those of HL7 v2.5.1 (chapter 2 control, 4 orders, 4A OMI, 7 observations); a
sender of 2.3 to 2.8 messages puts the fields read here in the same places.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import hl7
import hl7.containers
import hl7.util

from triage.domain import Finding, PriorityLevel
from triage.errors import TriageError

# python-hl7 logs the raw text of a field whose escape sequence it cannot decode; that text can be a patient's
# name or ID, and logs never carry patient identifiers.
hl7.util.logger.disabled = True
hl7.containers.logger.disabled = True

SUPPORTED_ORDERS = ("ORM^O01", "OMI^O23")
HL7_VERSION = "2.5.1"
# A local coding system (HL7 table 0396: "99zzz") for triage's own observation identifiers.
CODING_SYSTEM = "99TRIAGE"
AI_NOTICE = "AI triage, not a diagnosis: a preliminary machine result that orders the worklist, not a report."
SYNTHETIC_NOTICE = "Synthetic demonstration model: trained on synthetic data, not validated, not for clinical use."

# HL7 table 0357, message error condition codes (ERR-3).
SEGMENT_SEQUENCE_ERROR = "100"
REQUIRED_FIELD_MISSING = "101"
DATA_TYPE_ERROR = "102"
UNSUPPORTED_MESSAGE_TYPE = "200"
UNSUPPORTED_EVENT_CODE = "201"
APPLICATION_INTERNAL_ERROR = "207"
_ERROR_NAMES = {
    SEGMENT_SEQUENCE_ERROR: "Segment sequence error",
    REQUIRED_FIELD_MISSING: "Required field missing",
    DATA_TYPE_ERROR: "Data type error",
    UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    UNSUPPORTED_EVENT_CODE: "Unsupported event code",
    APPLICATION_INTERNAL_ERROR: "Application internal error",
}
# HL7 table 0008: original mode (A*) and enhanced mode commit (C*) acknowledgment codes.
ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")
_NEGATIVE = ("AE", "AR", "CE", "CR")

# HL7 table 0027 (ORC-7.6, OBR-27.6, OBR-5) and 0485 (TQ1-9) priorities that map onto our levels. The others
# (P preop, C callback, T timing critical, PRN) say when, not how urgent: they set no floor.
_PRIORITY_CODES = {
    "S": PriorityLevel.STAT,
    "STAT": PriorityLevel.STAT,
    "A": PriorityLevel.URGENT,
    "ASAP": PriorityLevel.URGENT,
    "URGENT": PriorityLevel.URGENT,
    "R": PriorityLevel.ROUTINE,
    "ROUTINE": PriorityLevel.ROUTINE,
}
# Our level as the RIS's table 0027 code (CWE.1-3) and as ours (CWE.4-6).
_TABLE_0027 = {
    PriorityLevel.STAT: ("S", "Stat"),
    PriorityLevel.URGENT: ("A", "ASAP"),
    PriorityLevel.ROUTINE: ("R", "Routine"),
}
_DEFAULT_SEPARATORS = "MSH|^~\\&|"
# Typography beyond Latin-1 that free text (a reason typed into an order) often has, and its ASCII.
_TYPOGRAPHY = str.maketrans({"\u2013": "-", "\u2014": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


class HL7Error(TriageError):
    """An HL7 message that cannot be used as it is, with what to answer it.

    `code` is the HL7 table 0357 error condition for ERR-3 ("100" segment sequence error or missing segment,
    "101" required field missing, "200" unsupported message type, "201" unsupported event code, "207"
    application internal error). `ack_code` is "AR" (rejected: not HL7, unreadable MSH, a message type triage
    does not take; resending it cannot help) or "AE" (read, but its content is not usable).
    """

    def __init__(self, code: str, text: str, ack_code: str = "") -> None:
        super().__init__(text)
        self.code = code
        self.text = text
        self.ack_code = ack_code or ("AR" if code in (UNSUPPORTED_MESSAGE_TYPE, UNSUPPORTED_EVENT_CODE) else "AE")


@dataclass(frozen=True)
class Envelope:
    """Who sends and who receives (MSH-3 to MSH-6) and the processing ID (MSH-11: P production, T training)."""

    sending_application: str = "TRIAGE"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    processing_id: str = "P"


DEFAULT_ENVELOPE = Envelope()


@dataclass(frozen=True)
class Order:
    """One imaging order of an ORM^O01 or OMI^O23 message (one ORC and its OBR).

    `accession_number` joins the order to its study (DICOM Accession Number, 0008,0050). `priority` is our level
    ("stat", "urgent", "routine") or "" when the order names none triage maps (`notes` says what it named);
    `priority_code` is the value as sent. `patient_id` is PID-3's first identifier: hash it, never log it (it
    is left out of `repr`). `notes` lists what a reader of the order should know (a priority not understood,
    priorities that disagree).
    """

    message_type: str
    control_id: str
    accession_number: str
    order_control: str = ""
    requested_procedure: str = ""
    requested_procedure_code: str = ""
    priority: str = ""
    priority_code: str = ""
    reason: str = ""
    ordering_site: str = ""
    sending_application: str = ""
    sending_facility: str = ""
    study_instance_uid: str = ""
    patient_id: str = dataclasses.field(default="", repr=False)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResultLine:
    """One AI finding as it goes to the RIS: label, whether it is flagged, its probability and the model."""

    label: str
    flagged: bool
    probability: float
    model: str
    model_version: str
    synthetic: bool = False

    @classmethod
    def from_finding(cls, finding: Finding) -> ResultLine:
        return cls(
            label=finding.label,
            flagged=finding.flagged,
            probability=float(finding.probability),
            model=finding.model,
            model_version=finding.model_version,
            synthetic=finding.synthetic,
        )


def result_lines(findings: Iterable[Finding]) -> list[ResultLine]:
    """The findings that may leave triage, as result lines: a shadow finding is never sent out."""
    return [ResultLine.from_finding(f) for f in findings if not f.shadow]


# ---------------------------------------------------------------------------------------------------------------
# Reading


def parse_order(text: str) -> Order:
    """The first order of an ORM^O01 or OMI^O23 message (most RIS send one order per message).

    Use `parse_orders` to get every order of a message that carries several.

    Raises:
        HL7Error: as `parse_orders`.
    """
    return parse_orders(text)[0]


def parse_orders(text: str) -> tuple[Order, ...]:
    """Every order (ORC with its TQ1, OBR, IPC, ZDS) of an ORM^O01 or OMI^O23 message, in message order.

    Segments may end with CR (the standard), LF or CRLF. Field values come back unescaped.

    Where the accession number is taken from, first found wins:
    1. IPC-1 Accession Identifier (OMI^O23, chapter 4A: the imaging procedure control segment carries it);
    2. OBR-18 Placer Field 1 (ORM^O01 as IHE Scheduled Workflow profiles it, RAD TF-2 4.4);
    3. OBR-3, then ORC-3, Filler Order Number (the RIS is the order filler, and many put their accession there).
    Placer order numbers (ORC-2, OBR-2) are not used: they are the ordering system's numbers, not the RIS's
    accession that the modality writes into the images, and joining on them would attach orders to the wrong
    studies.

    Priority is read from TQ1-9 (the 2.5 place), ORC-7.6 and OBR-27.6 (quantity/timing, deprecated but what most
    RIS send) and OBR-5; S/STAT is "stat", A/ASAP "urgent", R/ROUTINE "routine". When these disagree the highest
    is kept: an order sets a priority floor, and reading it must never lower one.

    The reason is OBR-31 (reason for study, every repetition), else OBR-13 (relevant clinical information), else
    ORC-16 (order control code reason). The ordering site is ORC-21 (ordering facility name), else ORC-17
    (entering organization), else MSH-4 (sending facility).

    Raises:
        HL7Error: the text is not an HL7 message or its MSH is unreadable (AR, 100); the message type is not one of
            `SUPPORTED_ORDERS` (AR, 200 or 201); MSH-10 is empty (AR, 101); there is no ORC, or an ORC without
            OBR (AE, 100); an order has no accession number (AE, 101).
    """
    message = _parse(text)
    msh = message.segment("MSH")
    message_type = _message_type(msh)
    control_id = _value(msh, 10)
    if not control_id:
        raise HL7Error(
            REQUIRED_FIELD_MISSING, "MSH-10 (message control ID) is empty: an ACK must name the message", "AR"
        )
    patient_id = ""
    for segment in message:
        if _name(segment) == "PID":
            patient_id = _value(segment, 3)
            break
    groups = _order_groups(message)
    if not groups:
        raise HL7Error(
            SEGMENT_SEQUENCE_ERROR,
            f"{message_type} has no ORC segment: an order needs ORC (common order) followed by OBR (observation "
            "request)",
        )
    orders = []
    for index, group in enumerate(groups, start=1):
        if "OBR" not in group:
            raise HL7Error(
                SEGMENT_SEQUENCE_ERROR,
                f"order {index} of {message_type} has an ORC without its OBR segment (observation request)",
            )
        orders.append(_order(message_type, control_id, msh, patient_id, group, index))
    return tuple(orders)


def _order(
    message_type: str, control_id: str, msh: Any, patient_id: str, group: Mapping[str, Any], index: int
) -> Order:
    orc, obr = group["ORC"], group["OBR"]
    ipc, tq1, zds = group.get("IPC"), group.get("TQ1"), group.get("ZDS")
    accession = (_value(ipc, 1) if ipc is not None else "") or _value(obr, 18) or _value(obr, 3) or _value(orc, 3)
    if not accession:
        raise HL7Error(
            REQUIRED_FIELD_MISSING,
            f"order {index} of {message_type} has no accession number: looked in IPC-1 (accession identifier), "
            "OBR-18 (placer field 1), OBR-3 and ORC-3 (filler order number)",
        )
    priority, priority_code, notes = _priority(
        [
            ("TQ1-9", _value(tq1, 9) if tq1 is not None else ""),
            ("ORC-7.6", _value(orc, 7, component=6)),
            ("OBR-27.6", _value(obr, 27, component=6)),
            ("OBR-5", _value(obr, 5)),
        ]
    )
    reasons = [_text_of(obr, 31, repetition) for repetition in range(1, 1 + _repetitions(obr, 31))]
    reason = "; ".join(r for r in reasons if r) or _value(obr, 13) or _text_of(orc, 16)
    return Order(
        message_type=message_type,
        control_id=control_id,
        accession_number=accession,
        order_control=_value(orc, 1).upper(),
        requested_procedure=_text_of(obr, 4),
        requested_procedure_code=_value(obr, 4),
        priority=priority,
        priority_code=priority_code,
        reason=reason,
        ordering_site=_value(orc, 21) or _text_of(orc, 17) or _value(msh, 4),
        sending_application=_value(msh, 3),
        sending_facility=_value(msh, 4),
        study_instance_uid=(_value(ipc, 3) if ipc is not None else "") or (_value(zds, 1) if zds is not None else ""),
        patient_id=patient_id,
        notes=notes,
    )


def _priority(candidates: Sequence[tuple[str, str]]) -> tuple[str, str, tuple[str, ...]]:
    """Our level, the code as sent and notes, from (where, value) pairs in order of precedence."""
    known: list[tuple[PriorityLevel, str, str]] = []
    unknown: list[tuple[str, str]] = []
    for where, raw in candidates:
        value = raw.strip()
        if not value:
            continue
        level = _PRIORITY_CODES.get(value.upper())
        if level is None:
            unknown.append((where, value))
        else:
            known.append((level, value, where))
    notes = []
    if not known:
        notes += [
            f"priority {value!r} in {where} is not one triage maps (S/STAT, A/ASAP, R/ROUTINE): no priority floor"
            for where, value in unknown
        ]
        return "", (unknown[0][1] if unknown else ""), tuple(notes)
    highest = max(known, key=lambda item: item[0].rank)
    if len({level for level, _, _ in known}) > 1:
        said = ", ".join(f"{where} {value!r}" for _, value, where in known)
        notes.append(f"priorities disagree ({said}); the highest, {highest[0].value}, is kept")
    return highest[0].value, highest[1], tuple(notes)


def ack_status(ack_text: str, control_id: str = "") -> tuple[str, str]:
    """The acknowledgment code (MSA-1: AA, AE, AR or CA, CE, CR) and its text (MSA-3, else ERR-8, else ERR-3).

    For an outbox: AA (or CA) ends a message; AR (CR) refuses the message itself, resending cannot help; AE (CE)
    is an error on the receiver's side that may pass.

    Args:
        ack_text: The reply as received.
        control_id: When given, the MSH-10 of the message sent: an ACK for another message is an error.

    Raises:
        HL7Error: the reply is not HL7, has no MSA, has an acknowledgment code outside HL7 table 0008, or answers
            another message than `control_id`.
    """
    message = _parse(ack_text)
    msa = next((s for s in message if _name(s) == "MSA"), None)
    if msa is None:
        kind = f"{_value(message.segment('MSH'), 9)}^{_value(message.segment('MSH'), 9, component=2)}"
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, f"the reply is not an acknowledgment: a {kind} without MSA segment")
    code = _value(msa, 1).upper()
    if code not in ACK_CODES:
        raise HL7Error(DATA_TYPE_ERROR, f"MSA-1 acknowledgment code {code!r} is none of {', '.join(ACK_CODES)}")
    answered = _value(msa, 2)
    if control_id and answered != control_id:
        raise HL7Error(DATA_TYPE_ERROR, f"the acknowledgment answers message {answered!r} (MSA-2), not {control_id!r}")
    text = _value(msa, 3)
    if not text:
        err = next((s for s in message if _name(s) == "ERR"), None)
        if err is not None:
            text = _value(err, 8) or _text_of(err, 3)
    return code, text


def _parse(text: str) -> Any:
    """An hl7.Message from one message's text, whatever its line ends.

    Raises:
        HL7Error: (AR, 100) not an HL7 message, an MSH without readable encoding characters, several messages.
    """
    # Segments end with CR (v2.5.1 section 2.5.1); files and hand-made messages use LF or CRLF, and blank lines
    # are no segments.
    body = re.sub(r"[\r\n]+", "\r", text.lstrip("\ufeff\x0b \t\r\n").rstrip("\x1c\r\n \t"))
    if not body.startswith("MSH"):
        start = body[:3].encode("ascii", "backslashreplace").decode()
        raise HL7Error(
            SEGMENT_SEQUENCE_ERROR, f"not an HL7 v2 message: it must begin with an MSH segment, not {start!r}", "AR"
        )
    if not _readable_msh(body):
        raise HL7Error(
            SEGMENT_SEQUENCE_ERROR,
            "the MSH segment is unreadable: it must begin 'MSH' + field separator + encoding characters + field "
            "separator, as MSH|^~\\&|",
            "AR",
        )
    if "\rMSH" in body:
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, "several messages in one: send one message per MLLP block", "AR")
    try:
        return hl7.parse(body)
    except Exception as exc:  # python-hl7 raises ParseException, IndexError or ValueError on malformed text
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, f"unreadable HL7 message: {exc}", "AR") from exc


def _readable_msh(body: str) -> bool:
    """MSH, a field separator, 2 to 5 encoding characters, the field separator again (v2.5.1 2.5.4, 2.14.9.1-2)."""
    if len(body) < 8 or body[3].isalnum() or body[3].isspace():
        return False
    end = body.find(body[3], 4)
    return 6 <= end <= 9 and not any(c.isalnum() or c.isspace() for c in body[4:end])


def _message_type(msh: Any) -> str:
    code = _value(msh, 9).upper()
    event = _value(msh, 9, component=2).upper()
    message_type = f"{code}^{event}"
    supported = ", ".join(SUPPORTED_ORDERS)
    if message_type in SUPPORTED_ORDERS:
        return message_type
    if code in {t.split("^")[0] for t in SUPPORTED_ORDERS}:
        raise HL7Error(
            UNSUPPORTED_EVENT_CODE, f"unsupported event {message_type!r} (MSH-9); triage accepts {supported}", "AR"
        )
    raise HL7Error(
        UNSUPPORTED_MESSAGE_TYPE, f"unsupported message type {message_type!r} (MSH-9); triage accepts {supported}", "AR"
    )


def _order_groups(message: Any) -> list[dict[str, Any]]:
    """Each ORC with the segments after it up to the next ORC (first of each kind)."""
    groups: list[dict[str, Any]] = []
    for segment in message:
        name = _name(segment)
        if name == "ORC":
            groups.append({"ORC": segment})
        elif groups and name in ("TQ1", "OBR", "IPC", "ZDS"):
            groups[-1].setdefault(name, segment)
    return groups


def _name(segment: Any) -> str:
    try:
        return str(segment[0]).strip().upper()
    except (IndexError, TypeError):
        return ""


def _value(segment: Any, field: int, component: int = 1, repetition: int = 1) -> str:
    """One component of one field, unescaped; "" where the message has none (or the null value "")."""
    try:
        value = str(segment.extract_field(1, field, repetition, component, 1))
    except (IndexError, KeyError, TypeError, ValueError):
        return ""
    value = value.replace("\r", "\n").strip()
    return "" if value == '""' else value


def _text_of(segment: Any, field: int, repetition: int = 1) -> str:
    """A coded element's text (CE/CWE component 2), else its code (component 1)."""
    return _value(segment, field, 2, repetition) or _value(segment, field, 1, repetition)


def _repetitions(segment: Any, field: int, most: int = 20) -> int:
    try:
        return max(1, min(most, len(segment(field)))) if field < len(segment) else 1
    except (IndexError, TypeError):
        return 1


# ---------------------------------------------------------------------------------------------------------------
# Writing


class _Raw(str):
    """A value already in ER7 (copied from the message being answered): written as it is, not escaped again."""


_Value = str | Sequence[str] | None


class _Writer:
    """Segments as python-hl7 containers; each value given is plain text, escaped with the base's characters."""

    def __init__(self, base: Any) -> None:
        self.base = base  # an hl7.Message whose separators and escape character the new message uses
        self.segments: list[Any] = []

    def add(self, name: str, fields: Mapping[int, _Value]) -> None:
        segment = self.base.create_segment([self.base.create_field([name])])
        if name == "MSH":
            msh = self.base.segment("MSH")
            segment.assign_field(str(msh(1)), 1)
            segment.assign_field(str(msh(2)), 2)
        for number in sorted(fields):
            value = fields[number]
            if value is None or value == "":
                continue
            if isinstance(value, str):
                segment.assign_field(value if isinstance(value, _Raw) else self.escape(value), number)
                continue
            components = list(value)
            while components and not components[-1]:
                components.pop()
            for position, component in enumerate(components, start=1):
                segment.assign_field(self.escape(component), number, 1, position)
        self.segments.append(segment)

    def escape(self, text: str) -> str:
        return str(self.base.escape(_plain(text)))

    def text(self) -> str:
        return str(self.base.create_message(self.segments))


def _plain(text: str) -> str:
    """Text python-hl7 can escape faithfully: Latin-1 (written as \\Xhh\\, MSH-18 says 8859/1), line breaks as CR
    (written as \\.br\\), no other control characters; anything beyond Latin-1 becomes its closest ASCII or '?'."""
    text = (
        unicodedata.normalize("NFKC", str(text))
        .translate(_TYPOGRAPHY)
        .replace("\r\n", "\r")
        .replace("\n", "\r")
        .replace("\t", " ")
    )
    out = []
    for char in text:
        if char == "\r" or (0x20 <= ord(char) <= 0xFF and not 0x7F <= ord(char) <= 0x9F):
            out.append(char)
        elif ord(char) > 0xFF:
            ascii_form = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
            out.append(ascii_form or "?")
    return "".join(out)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _timestamp(now: datetime | None) -> str:
    """An HL7 DTM with its UTC offset (v2.5.1 2A.3.22)."""
    moment = now or datetime.now(UTC)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.strftime("%Y%m%d%H%M%S%z")


def _new_control_id() -> str:
    """20 characters, the length MSH-10 allows in v2.5.1."""
    return uuid.uuid4().hex[:20].upper()


def _header(message_text: str) -> tuple[Any, Any]:
    """The readable MSH of a message to answer, as (message to build the answer from, MSH segment or None)."""
    body = re.sub(r"[\r\n]+", "\r", message_text.lstrip("\ufeff\x0b \t\r\n"))
    first = body.split("\r", 1)[0]
    if first.startswith("MSH") and _readable_msh(first):
        try:
            message = hl7.parse(first)
            return message, message.segment("MSH")
        except Exception:  # an unreadable header is answered from the defaults below
            pass
    return hl7.parse(_DEFAULT_SEPARATORS), None


def ack(
    message_text: str,
    code: str = "AA",
    error: str = "",
    *,
    error_code: str = "",
    control_id: str = "",
    envelope: Envelope = DEFAULT_ENVELOPE,
    now: datetime | None = None,
) -> str:
    """An original-mode ACK (v2.5.1 2.9.2) for `message_text`, in the sender's own encoding characters.

    MSH swaps sender and receiver (MSH-3/4 are the message's MSH-5/6, or `envelope`'s when those are empty);
    MSH-9 is ACK^<trigger>^ACK; MSH-11 and MSH-12 repeat the message's. MSA-1 is `code`, MSA-2 the message's
    control ID, MSA-3 the error (80 characters at most). A negative code adds ERR with ERR-3 the table 0357 code,
    ERR-4 "E" and ERR-8 the whole error text.

    Whatever the text, an ACK comes back: when it has no readable MSH it can only be rejected, so the code
    becomes AR and MSA-2 is empty.

    Args:
        code: HL7 table 0008: AA accept, AE error, AR reject (or CA, CE, CR).
        error: What was wrong, in words the RIS's interface engineer can act on.
        error_code: HL7 table 0357 code for ERR-3; "207" (application internal error) when empty.
        control_id: MSH-10 of the ACK itself; a new one when empty.

    Raises:
        ValueError: `code` is not in HL7 table 0008.
    """
    if code not in ACK_CODES:
        raise ValueError(f"acknowledgment code {code!r} is none of {', '.join(ACK_CODES)}")
    base, msh = _header(message_text)
    if msh is None and code in ("AA", "AE", "CA", "CE"):
        code = "AR" if code[0] == "A" else "CR"
        error = error or "the message has no readable MSH segment"
        error_code = error_code or SEGMENT_SEQUENCE_ERROR

    def copied(number: int, component: int = 0) -> str:
        if msh is None or number >= len(msh):
            return ""
        if component:
            return _value(msh, number, component)
        return _Raw(str(msh(number)))

    writer = _Writer(base)
    writer.add(
        "MSH",
        {
            3: copied(5) or envelope.sending_application,
            4: copied(6) or envelope.sending_facility,
            5: copied(3),
            6: copied(4),
            7: _timestamp(now),
            9: ("ACK", copied(9, component=2), "ACK"),
            10: control_id or _new_control_id(),
            11: copied(11) or envelope.processing_id,
            12: copied(12) or HL7_VERSION,
        },
    )
    summary = _one_line(error)
    writer.add("MSA", {1: code, 2: copied(10), 3: summary[:77] + "..." if len(summary) > 80 else summary})
    if code in _NEGATIVE:
        condition = error_code or APPLICATION_INTERNAL_ERROR
        writer.add(
            "ERR",
            {3: (condition, _ERROR_NAMES.get(condition, ""), "HL70357"), 4: "E", 8: error or summary},
        )
    return writer.text()


def nak(message_text: str, error: HL7Error, **kwargs: Any) -> str:
    """The negative ACK that `error` calls for: its `ack_code`, its text, its table 0357 code in ERR-3."""
    return ack(message_text, error.ack_code, error.text, error_code=error.code, **kwargs)


def build_oru(
    accession_number: str,
    study_uid: str,
    results: Sequence[ResultLine],
    priority: PriorityLevel | str,
    priority_reason: str = "",
    *,
    patient_id: str = "",
    notice: str = AI_NOTICE,
    control_id: str = "",
    envelope: Envelope = DEFAULT_ENVELOPE,
    now: datetime | None = None,
) -> str:
    """An ORU^R01 (v2.5.1 7.3.1) with the AI's preliminary result for one study.

    Layout, all results preliminary (OBR-25 and OBX-11 "P"):
    - PID with PID-3 only when `patient_id` is given (no name: triage keeps none; the RIS matches on the
      accession);
    - ORC-1 "RE", ORC-3 and OBR-3 the accession (filler order number), OBR-18 the accession again (IHE placer
      field 1), OBR-4 AI-TRIAGE^AI triage^99TRIAGE, NTE the notice ("AI triage, not a diagnosis");
    - OBX ST 110180^Study Instance UID^DCM;
    - OBX CWE AI-PRIORITY: the level as HL7 table 0027 (S Stat, A ASAP, R Routine) with ours as the alternate
      code (stat, urgent, routine); OBX TX AI-PRIORITY-REASON when a reason is given;
    - per finding n (OBX-4 sub-ID n): OBX CWE <label> with Y^Yes^HL70136 or N^No^HL70136 and OBX-8 "A" when
      flagged, "N" when not; OBX NM <label>.probability in 0-1 (4 decimals); both with OBX-17 (observation
      method) <model>^<model> <version>^99TRIAGE; NTE the synthetic-data notice for a synthetic model.

    Raises:
        HL7Error: (101) the accession number is empty: the RIS could not attach the result to anything.
    """
    level = PriorityLevel.parse(str(priority))
    writer, observations = _oru_start(accession_number, study_uid, patient_id, [notice], control_id, envelope, now)
    observations.add("CWE", ("AI-PRIORITY", "AI triage priority", CODING_SYSTEM), _priority_code(level))
    if priority_reason:
        observations.add("TX", ("AI-PRIORITY-REASON", "AI triage priority reason", CODING_SYSTEM), priority_reason)
    for number, line in enumerate(results, start=1):
        label_text = line.label.replace("_", " ").capitalize()
        method = (line.model, f"{line.model} {line.model_version}", CODING_SYSTEM)
        observations.add(
            "CWE",
            (line.label, label_text, CODING_SYSTEM),
            ("Y", "Yes", "HL70136") if line.flagged else ("N", "No", "HL70136"),
            sub_id=str(number),
            abnormal="A" if line.flagged else "N",
            method=method,
        )
        observations.add(
            "NM",
            (f"{line.label}.probability", f"{label_text} probability", CODING_SYSTEM),
            f"{float(line.probability):.4f}",
            sub_id=str(number),
            units=("1", "unity", "UCUM"),
            reference_range="0-1",
            method=method,
            notes=[SYNTHETIC_NOTICE] if line.synthetic else [],
        )
    return writer.text()


def build_priority_notice(
    accession_number: str,
    study_uid: str,
    previous: PriorityLevel | str | None,
    current: PriorityLevel | str,
    reason: str = "",
    *,
    patient_id: str = "",
    notice: str = AI_NOTICE,
    control_id: str = "",
    envelope: Envelope = DEFAULT_ENVELOPE,
    now: datetime | None = None,
) -> str:
    """An ORU^R01 that announces a change of the study's priority, with the reason.

    An ORU^R01 because the RIS already files triage's results to the order by accession number and shows them on
    the order: the notice lands where the preliminary result is. An order message (ORM^O01 or OMI^O23 with ORC-1
    "XO") would ask the RIS to change the order itself, which only the ordering side may do.

    Layout as `build_oru` without findings: OBX CWE AI-PRIORITY (the new level), OBX CWE AI-PRIORITY-PREVIOUS
    (the level before, when known), OBX TX AI-PRIORITY-REASON, and a second NTE in words ("AI triage priority
    raised from routine to stat: ...").

    Raises:
        HL7Error: (101) the accession number is empty.
    """
    new = PriorityLevel.parse(str(current))
    old = PriorityLevel.parse(str(previous)) if previous else None
    if old is None:
        change = f"AI triage priority set to {new.value}"
    else:
        verb = "raised" if new.rank > old.rank else "lowered" if new.rank < old.rank else "confirmed"
        change = f"AI triage priority {verb} from {old.value} to {new.value}"
    change += f": {_one_line(reason)}" if reason else ""
    writer, observations = _oru_start(
        accession_number, study_uid, patient_id, [notice, change], control_id, envelope, now
    )
    observations.add("CWE", ("AI-PRIORITY", "AI triage priority", CODING_SYSTEM), _priority_code(new))
    if old is not None:
        observations.add(
            "CWE", ("AI-PRIORITY-PREVIOUS", "AI triage priority before", CODING_SYSTEM), _priority_code(old)
        )
    if reason:
        observations.add("TX", ("AI-PRIORITY-REASON", "AI triage priority reason", CODING_SYSTEM), reason)
    return writer.text()


def _priority_code(level: PriorityLevel) -> tuple[str, ...]:
    code, text = _TABLE_0027[level]
    return (code, text, "HL70027", level.value, f"AI triage {level.value}", CODING_SYSTEM)


class _Observations:
    """The OBX (and NTE) segments of one ORU order observation, numbered in order."""

    def __init__(self, writer: _Writer, now: str) -> None:
        self.writer = writer
        self.now = now
        self.count = 0
        self.notes = 0

    def note(self, text: str, source: str = "L") -> None:
        """An NTE (source L: the filler's ancillary department, table 0105); numbered per segment it follows."""
        self.notes += 1
        self.writer.add("NTE", {1: str(self.notes), 2: source, 3: text})

    def add(
        self,
        value_type: str,
        identifier: Sequence[str],
        value: _Value,
        *,
        sub_id: str = "",
        units: Sequence[str] = (),
        reference_range: str = "",
        abnormal: str = "",
        method: Sequence[str] = (),
        notes: Sequence[str] = (),
    ) -> None:
        self.count += 1
        if value_type != "TX" and isinstance(value, str):
            value = _one_line(value)
        self.writer.add(
            "OBX",
            {
                1: str(self.count),
                2: value_type,
                3: identifier,
                4: sub_id,
                5: value,
                6: units,
                7: reference_range,
                8: abnormal,
                11: "P",
                14: self.now,
                17: method,
            },
        )
        self.notes = 0
        for text in notes:
            self.note(text)


def _oru_start(
    accession_number: str,
    study_uid: str,
    patient_id: str,
    notes: Sequence[str],
    control_id: str,
    envelope: Envelope,
    now: datetime | None,
) -> tuple[_Writer, _Observations]:
    """MSH, PID, ORC, OBR, its notes and the Study Instance UID observation; the rest is the caller's."""
    accession = _one_line(accession_number)
    if not accession:
        raise HL7Error(REQUIRED_FIELD_MISSING, "a result needs the study's accession number: the RIS files it by it")
    stamp = _timestamp(now)
    writer = _Writer(hl7.parse(_DEFAULT_SEPARATORS))
    writer.add(
        "MSH",
        {
            3: envelope.sending_application,
            4: envelope.sending_facility,
            5: envelope.receiving_application,
            6: envelope.receiving_facility,
            7: stamp,
            9: ("ORU", "R01", "ORU_R01"),
            10: control_id or _new_control_id(),
            11: envelope.processing_id,
            12: HL7_VERSION,
            # python-hl7 writes characters beyond ASCII as \Xhh\ escapes of their Latin-1 byte.
            18: "8859/1",
        },
    )
    if patient_id:
        writer.add("PID", {1: "1", 3: (_one_line(patient_id),)})
    writer.add("ORC", {1: "RE", 3: (accession,)})
    writer.add(
        "OBR",
        {
            1: "1",
            3: (accession,),
            4: ("AI-TRIAGE", "AI triage", CODING_SYSTEM),
            7: stamp,
            18: accession,
            22: stamp,
            24: "RAD",
            25: "P",
        },
    )
    observations = _Observations(writer, stamp)
    for text in notes:
        if text:
            observations.note(text)
    if study_uid:
        observations.add("ST", ("110180", "Study Instance UID", "DCM"), study_uid)
    return writer, observations
