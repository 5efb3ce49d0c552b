"""HL7 v2 messages: orders read from ORM^O01 and OMI^O23, ACKs and NAKs, the ORU^R01 results read back."""

from __future__ import annotations

from datetime import UTC, datetime

import hl7
import pytest

from triage.domain import Finding
from triage.hl7 import (
    AI_NOTICE,
    Envelope,
    HL7Error,
    ResultLine,
    ack,
    ack_status,
    build_oru,
    build_priority_notice,
    nak,
    parse_order,
    parse_orders,
)
from triage.hl7.messages import SYNTHETIC_NOTICE, result_lines

MSH_ORM = "MSH|^~\\&|RIS|NORTH HOSPITAL|TRIAGE|READING CENTRE|20260312101500+0100||ORM^O01^ORM_O01|MSG00001|P|2.5.1"
PID = "PID|1||MRN-0042^^^NORTH^MR~NHS-999^^^NHS^NH||DOE^JANE||19700101|F"


def orm(orc: str, obr: str, *extra: str, msh: str = MSH_ORM, end: str = "\r") -> str:
    return end.join([msh, PID, "PV1|1|E", orc, obr, *extra]) + end


def obr(fields: dict[int, str]) -> str:
    """An OBR segment with the given fields (1-based), empty elsewhere."""
    values = [""] * (max(fields) + 1)
    values[0] = "OBR"
    for number, value in fields.items():
        values[number] = value
    return "|".join(values)


def orc(fields: dict[int, str]) -> str:
    values = [""] * (max(fields) + 1)
    values[0] = "ORC"
    for number, value in fields.items():
        values[number] = value
    return "|".join(values)


# An IHE Scheduled Workflow style order (RAD-2/RAD-3): STAT in ORC-7.6, the accession in OBR-18, escaped text.
STAT_ORM = orm(
    orc({1: "NW", 2: "PLC-77", 3: "FIL-77", 5: "SC", 7: "^^^^^S", 9: "20260312101400", 17: "ED^Emergency dept",
         21: "North Hospital Emergency"}),
    obr({1: "1", 2: "PLC-77", 3: "FIL-77", 4: "CTHEAD^CT head without contrast \\T\\ neck^L", 13: "Fall\\S\\ hit head",
         18: "ACC-1001", 19: "RP-1", 27: "^^^^^S", 31: "R51^Headache^I10~W19^Fall \\F\\ confused^I10"}),
    "ZDS|1.2.826.0.1.3680043.2.1125.1.7^RIS^Application^DICOM",
)  # fmt: skip


def omi(priority_tq1: str, end: str = "\r\n") -> str:
    """An OMI^O23 (chapter 4A): ORC, TQ1 with the priority, OBR, IPC with accession and Study Instance UID."""
    return end.join(
        [
            "MSH|^~\\&|RIS|SOUTH CLINIC|TRIAGE|RC|20260312101500||OMI^O23^OMI_O23|MSG00002|P|2.5.1",
            "PID|1||MRN-7^^^SOUTH^MR||ROE^RICHARD",
            "ORC|NW|PLC-9|FIL-9||SC",
            f"TQ1|1||||||||{priority_tq1}",
            obr({1: "1", 2: "PLC-9", 3: "FIL-9", 4: "XRCHEST^XR chest PA^L", 31: "^Shortness of breath"}),
            "IPC|ACC-2002|RP-2|1.2.3.4.5|SPS-2|DX",
        ]
    )


def test_an_ihe_style_orm_gives_accession_procedure_stat_reason_and_site() -> None:
    order = parse_order(STAT_ORM)

    assert order.message_type == "ORM^O01" and order.control_id == "MSG00001" and order.order_control == "NW"
    assert order.accession_number == "ACC-1001"  # OBR-18, not the placer or filler order numbers
    assert order.requested_procedure == "CT head without contrast & neck"  # \T\ is the subcomponent separator
    assert order.requested_procedure_code == "CTHEAD"
    assert (order.priority, order.priority_code) == ("stat", "S")
    assert order.reason == "Headache; Fall | confused"  # every OBR-31 repetition, \F\ unescaped
    assert order.ordering_site == "North Hospital Emergency"  # ORC-21 before MSH-4
    assert (order.sending_application, order.sending_facility) == ("RIS", "NORTH HOSPITAL")
    assert order.study_instance_uid == "1.2.826.0.1.3680043.2.1125.1.7"  # IHE ZDS-1
    assert order.patient_id == "MRN-0042"
    assert order.notes == ()


def test_the_patient_id_is_left_out_of_the_orders_repr() -> None:
    assert "MRN-0042" not in repr(parse_order(STAT_ORM))


@pytest.mark.parametrize("end", ["\r", "\n", "\r\n"])
def test_cr_lf_and_crlf_segment_ends_read_the_same(end: str) -> None:
    assert parse_order(orm(*STAT_ORM.split("\r")[3:5], STAT_ORM.split("\r")[5], end=end)) == parse_order(STAT_ORM)


def test_an_omi_o23_reads_the_imaging_procedure_control_segment() -> None:
    order = parse_order(omi("A^ASAP^HL70485"))

    assert order.message_type == "OMI^O23"
    assert order.accession_number == "ACC-2002"  # IPC-1
    assert order.study_instance_uid == "1.2.3.4.5"  # IPC-3
    assert (order.priority, order.priority_code) == ("urgent", "A")  # TQ1-9
    assert order.requested_procedure == "XR chest PA"
    assert order.reason == "Shortness of breath"
    assert order.ordering_site == "SOUTH CLINIC"  # MSH-4 when ORC names no facility


@pytest.mark.parametrize(
    ("orc7", "obr27", "obr5", "level"),
    [
        ("^^^^^S", "", "", "stat"),
        ("^^^^^STAT", "", "", "stat"),
        ("", "^^^^^A", "", "urgent"),
        ("", "", "ASAP", "urgent"),
        ("", "", "R", "routine"),
        ("^^^^^routine", "", "", "routine"),
    ],
)
def test_priority_codes_map_to_our_levels(orc7: str, obr27: str, obr5: str, level: str) -> None:
    order = parse_order(orm(orc({1: "NW", 7: orc7}), obr({1: "1", 3: "ACC-1", 5: obr5, 27: obr27})))
    assert order.priority == level and order.notes == ()


def test_a_priority_we_do_not_map_sets_no_floor_and_says_so() -> None:
    order = parse_order(orm(orc({1: "NW", 7: "^^^^^P"}), obr({1: "1", 3: "ACC-1"})))
    assert (order.priority, order.priority_code) == ("", "P")
    assert "'P' in ORC-7.6 is not one triage maps" in order.notes[0]


def test_an_order_without_any_priority_has_none() -> None:
    order = parse_order(orm(orc({1: "NW"}), obr({1: "1", 3: "ACC-1"})))
    assert (order.priority, order.notes) == ("", ())


def test_disagreeing_priorities_keep_the_highest_never_lowering() -> None:
    order = parse_order(orm(orc({1: "NW", 7: "^^^^^R"}), obr({1: "1", 3: "ACC-1", 5: "S"})))
    assert (order.priority, order.priority_code) == ("stat", "S")
    assert "disagree" in order.notes[0]


@pytest.mark.parametrize(
    ("orc_fields", "obr_fields", "accession"),
    [
        ({1: "NW", 2: "PLC", 3: "ORC-FILL"}, {1: "1", 2: "PLC", 3: "OBR-FILL", 18: "PLACER-FIELD-1"}, "PLACER-FIELD-1"),
        ({1: "NW", 2: "PLC", 3: "ORC-FILL"}, {1: "1", 2: "PLC", 3: "OBR-FILL"}, "OBR-FILL"),
        ({1: "NW", 2: "PLC", 3: "ORC-FILL"}, {1: "1", 2: "PLC"}, "ORC-FILL"),
    ],
)  # fmt: skip
def test_accession_precedence(orc_fields: dict[int, str], obr_fields: dict[int, str], accession: str) -> None:
    assert parse_order(orm(orc(orc_fields), obr(obr_fields))).accession_number == accession


def test_a_message_with_two_orders_gives_both() -> None:
    text = orm(orc({1: "NW"}), obr({1: "1", 3: "ACC-1", 5: "S"}), orc({1: "NW"}), obr({1: "2", 3: "ACC-2"}))
    orders = parse_orders(text)
    assert [(o.accession_number, o.priority) for o in orders] == [("ACC-1", "stat"), ("ACC-2", "")]
    assert parse_order(text) == orders[0]


def test_a_cancel_carries_its_order_control_and_reason() -> None:
    order = parse_order(orm(orc({1: "CA", 16: "DUP^Duplicate order"}), obr({1: "1", 3: "ACC-1"})))
    assert (order.order_control, order.reason) == ("CA", "Duplicate order")


# Malformed messages: a clear HL7Error, and the ACK that says it.


@pytest.mark.parametrize(
    ("text", "code", "ack_code", "words"),
    [
        ("hello, this is not HL7", "100", "AR", "must begin with an MSH segment"),
        ("", "100", "AR", "must begin with an MSH segment"),
        ("MSH", "100", "AR", "MSH segment is unreadable"),
        ("MSH|^~\\&|RIS|A|B|C|20260101||ADT^A01|1|P|2.5.1\rPID|1", "200", "AR", "accepts ORM^O01, OMI^O23"),
        ("MSH|^~\\&|RIS|A|B|C|20260101||ORM^O02|1|P|2.5.1\rORC|NW", "201", "AR", "unsupported event 'ORM^O02'"),
        ("MSH|^~\\&|RIS|A|B|C|20260101||ORM^O01||P|2.5.1\rORC|NW", "101", "AR", "MSH-10"),
        ("MSH|^~\\&|RIS|A|B|C|20260101||ORM^O01|1|P|2.5.1\rPID|1||X", "100", "AE", "has no ORC segment"),
        ("MSH|^~\\&|RIS|A|B|C|20260101||ORM^O01|1|P|2.5.1\rORC|NW|P1", "100", "AE", "ORC without its OBR"),
        ("MSH|^~\\&|RIS|A|B|C|20260101||ORM^O01|1|P|2.5.1\rORC|NW|P1\rOBR|1|P1", "101", "AE", "no accession number"),
    ],
)
def test_malformed_messages_raise_a_clear_error_and_are_answered_with_err(
    text: str, code: str, ack_code: str, words: str
) -> None:
    with pytest.raises(HL7Error) as caught:
        parse_order(text)
    error = caught.value
    assert (error.code, error.ack_code) == (code, ack_code) and words in str(error)

    reply = hl7.parse(nak(text, error))
    assert reply.extract_field("MSA", 1, 1) == ack_code
    assert reply.extract_field("ERR", 1, 3, 1, 1) == code and reply.extract_field("ERR", 1, 4) == "E"
    assert words in reply.extract_field("ERR", 1, 8)
    assert ack_status(str(reply))[0] == ack_code


def test_the_placer_order_number_alone_is_no_accession() -> None:
    with pytest.raises(HL7Error, match="IPC-1.*OBR-18.*OBR-3 and ORC-3"):
        parse_order(orm(orc({1: "NW", 2: "PLACER-ONLY"}), obr({1: "1", 2: "PLACER-ONLY"})))


# ACKs


def test_an_ack_swaps_sender_and_receiver_and_names_the_message() -> None:
    now = datetime(2026, 3, 12, 10, 15, 30, tzinfo=UTC)
    reply = hl7.parse(ack(STAT_ORM, control_id="ACK-1", now=now))

    msh = reply.segment("MSH")
    assert [str(msh(n)) for n in (3, 4, 5, 6)] == ["TRIAGE", "READING CENTRE", "RIS", "NORTH HOSPITAL"]
    assert str(msh(7)) == "20260312101530+0000" and str(msh(9)) == "ACK^O01^ACK"
    assert [str(msh(n)) for n in (10, 11, 12)] == ["ACK-1", "P", "2.5.1"]
    assert str(reply.segment("MSA")) == "MSA|AA|MSG00001"
    assert "ERR" not in [str(s[0]) for s in reply]
    assert ack_status(str(reply), control_id="MSG00001") == ("AA", "")


def test_an_ack_is_written_in_the_senders_own_encoding_characters() -> None:
    text = "MSH|$~\\&|RIS|SITE|TRIAGE|RC|20260101||ORM$O01|C-9|P|2.4\rORC|NW\rOBR|1"
    reply = ack(text, "AE", "bad $ thing", error_code="101")
    assert reply.startswith("MSH|$~\\&|TRIAGE|RC|RIS|SITE|")
    assert "|ACK$O01$ACK|" in reply and "|2.4\r" in reply
    assert ack_status(reply) == ("AE", "bad $ thing")  # the component separator in the text is escaped


def test_error_text_with_delimiters_survives_the_round_trip() -> None:
    error = "OBR-4 'CT|head^neck&x~y\\z' is not a procedure this reading centre reports; check the RIS's list"
    reply = hl7.parse(ack(STAT_ORM, "AE", error, error_code="103"))
    assert reply.extract_field("ERR", 1, 8) == error
    assert reply.extract_field("MSA", 1, 3) == error[:77] + "..."  # MSA-3 is at most 80 characters


def test_a_message_without_readable_msh_is_still_answered_with_a_reject() -> None:
    for garbage in ["", "\x00\x01binary", "PID|1||X", "MSH|", "MSH^^^"]:
        reply = hl7.parse(ack(garbage))
        assert reply.extract_field("MSA", 1, 1) == "AR"
        assert reply.extract_field("ERR", 1, 3, 1, 1) == "100"
        assert "no readable MSH" in reply.extract_field("ERR", 1, 8)


def test_ack_status_refuses_what_is_not_an_acknowledgment() -> None:
    with pytest.raises(HL7Error, match="not an acknowledgment: a ORM\\^O01 without MSA"):
        ack_status(STAT_ORM)
    with pytest.raises(HL7Error, match="must begin with an MSH"):
        ack_status("OK")
    with pytest.raises(HL7Error, match="answers message 'MSG00001'.*not 'OTHER'"):
        ack_status(ack(STAT_ORM), control_id="OTHER")
    with pytest.raises(HL7Error, match="'XX' is none of"):
        ack_status("MSH|^~\\&|RIS||||||ACK|1|P|2.5.1\rMSA|XX|1")


def test_ack_status_reads_the_reason_from_err_when_msa_3_is_empty() -> None:
    reply = (
        "MSH|^~\\&|RIS||||||ACK^R01^ACK|1|P|2.5.1\rMSA|AR|T1\rERR|||207^Application internal error^HL70357|E||||db down"
    )
    assert ack_status(reply, control_id="T1") == ("AR", "db down")


# ORU^R01: the AI's preliminary result, read back with python-hl7


def oru_segments(text: str, name: str) -> list[hl7.Segment]:
    return [s for s in hl7.parse(text) if str(s[0]) == name]


def test_the_oru_carries_the_result_where_a_ris_reads_it() -> None:
    lines = [
        ResultLine("intracranial_haemorrhage", True, 0.97312, "ct-head-ich", "1.2.0", synthetic=False),
        ResultLine("pneumothorax", False, 0.04, "xr-chest-pneumothorax", "0.3.0", synthetic=True),
    ]
    now = datetime(2026, 3, 12, 10, 20, tzinfo=UTC)
    text = build_oru(
        "ACC-1001", "1.2.3.4.5", lines, "stat", "ICH flagged by ct-head-ich",
        patient_id="MRN-0042", control_id="TRIAGE0000000001",
        envelope=Envelope(sending_facility="RC", receiving_application="RIS", receiving_facility="NORTH"), now=now,
    )  # fmt: skip
    message = hl7.parse(text)

    assert text.endswith("\r") and "\n" not in text
    assert [str(s[0]) for s in message] == [
        "MSH", "PID", "ORC", "OBR", "NTE", "OBX", "OBX", "OBX", "OBX", "OBX", "OBX", "OBX", "NTE",
    ]  # fmt: skip
    msh = message.segment("MSH")
    assert [str(msh(n)) for n in (3, 4, 5, 6, 7)] == ["TRIAGE", "RC", "RIS", "NORTH", "20260312102000+0000"]
    assert [str(msh(n)) for n in (9, 10, 11, 12)] == ["ORU^R01^ORU_R01", "TRIAGE0000000001", "P", "2.5.1"]
    assert message.extract_field("PID", 1, 3) == "MRN-0042" and message.extract_field("PID", 1, 5) == ""
    assert message.extract_field("OBR", 1, 3) == message.extract_field("OBR", 1, 18) == "ACC-1001"
    assert message.extract_field("OBR", 1, 25) == "P"  # preliminary
    assert message.extract_field("NTE", 1, 3) == AI_NOTICE

    obx = oru_segments(text, "OBX")
    assert all(str(s(11)) == "P" for s in obx)
    assert [str(s(1)) for s in obx] == ["1", "2", "3", "4", "5", "6", "7"]
    uid, priority, reason, ich, ich_p, ptx, ptx_p = obx
    assert (str(uid(2)), str(uid(3)), str(uid(5))) == ("ST", "110180^Study Instance UID^DCM", "1.2.3.4.5")
    assert str(priority(2)) == "CWE" and str(priority(5)) == "S^Stat^HL70027^stat^AI triage stat^99TRIAGE"
    assert str(reason(2)) == "TX" and reason.extract_field(1, 5) == "ICH flagged by ct-head-ich"
    assert str(ich(3)) == "intracranial_haemorrhage^Intracranial haemorrhage^99TRIAGE"
    assert (str(ich(2)), str(ich(4)), str(ich(5)), str(ich(8))) == ("CWE", "1", "Y^Yes^HL70136", "A")
    assert str(ich(17)) == "ct-head-ich^ct-head-ich 1.2.0^99TRIAGE"
    assert (str(ich_p(2)), str(ich_p(4)), str(ich_p(5)), str(ich_p(7))) == ("NM", "1", "0.9731", "0-1")
    assert (str(ptx(4)), str(ptx(5)), str(ptx(8))) == ("2", "N^No^HL70136", "N")
    assert str(ptx_p(17)) == "xr-chest-pneumothorax^xr-chest-pneumothorax 0.3.0^99TRIAGE"
    # The synthetic model's note follows its observation.
    assert str(message[-1][0]) == "NTE" and message[-1].extract_field(1, 3) == SYNTHETIC_NOTICE


def test_free_text_is_escaped_and_reads_back_the_same() -> None:
    reason = "p=0.97 | flagged ^ by ct-head-ich & co ~ see C:\\notes\nsecond line"
    text = build_oru("ACC|1^2", "1.2.3", [], "urgent", reason)
    message = hl7.parse(text)
    assert message.extract_field("OBR", 1, 18) == "ACC|1^2"
    observation = oru_segments(text, "OBX")[2]
    assert observation.extract_field(1, 5) == reason.replace("\n", "\r")  # a line break is \.br\ in TX
    assert str(observation(5)).count("\\F\\") == 1 and "\\.br\\" in str(observation(5))


def test_latin_1_is_kept_and_the_rest_becomes_ascii() -> None:
    text = build_oru("ACC-1", "1.2.3", [], "routine", "Schädel – Übersicht")
    assert text.isascii()
    assert "|8859/1" in text.split("\r")[0]  # MSH-18: the \Xhh\ escapes are ISO 8859-1
    assert oru_segments(text, "OBX")[2].extract_field(1, 5) == "Schädel - Übersicht"


def test_without_patient_id_there_is_no_pid() -> None:
    text = build_oru("ACC-1", "1.2.3", [], "routine")
    assert [str(s[0]) for s in hl7.parse(text)] == ["MSH", "ORC", "OBR", "NTE", "OBX", "OBX"]


def test_an_oru_needs_an_accession_number() -> None:
    with pytest.raises(HL7Error, match="accession number"):
        build_oru(" ", "1.2.3", [], "stat")


def test_control_ids_are_new_unless_given() -> None:
    first, second = (hl7.parse(build_oru("A", "1.2", [], "stat")) for _ in range(2))
    assert first.extract_field("MSH", 1, 10) != second.extract_field("MSH", 1, 10)
    assert len(first.extract_field("MSH", 1, 10)) == 20


def test_a_priority_notice_says_what_changed_and_why() -> None:
    text = build_priority_notice("ACC-1001", "1.2.3", "routine", "stat", "ICH flagged", control_id="TRIAGE0000000002")
    message = hl7.parse(text)
    assert (
        message.extract_field("MSH", 1, 9, 1, 1) == "ORU" and message.extract_field("MSH", 1, 10) == "TRIAGE0000000002"
    )
    notes = [s.extract_field(1, 3) for s in oru_segments(text, "NTE")]
    assert notes == [AI_NOTICE, "AI triage priority raised from routine to stat: ICH flagged"]
    obx = oru_segments(text, "OBX")
    assert [s.extract_field(1, 3) for s in obx] == [
        "110180",
        "AI-PRIORITY",
        "AI-PRIORITY-PREVIOUS",
        "AI-PRIORITY-REASON",
    ]
    assert [s.extract_field(1, 5, 1, 4) for s in obx[1:3]] == ["stat", "routine"]
    assert obx[3].extract_field(1, 5) == "ICH flagged"


def test_a_first_priority_notice_has_no_previous_level() -> None:
    text = build_priority_notice("ACC-1001", "1.2.3", None, "urgent")
    assert [s.extract_field(1, 3) for s in oru_segments(text, "OBX")] == ["110180", "AI-PRIORITY"]
    assert oru_segments(text, "NTE")[1].extract_field(1, 3) == "AI triage priority set to urgent"


def test_shadow_findings_never_leave_as_result_lines() -> None:
    def finding(label: str, shadow: bool) -> Finding:
        return Finding(label=label, probability=0.9, flagged=True, model="m", model_version="1", synthetic=False,
                       shadow=shadow)  # fmt: skip

    assert [line.label for line in result_lines([finding("seen", False), finding("shadow", True)])] == ["seen"]
