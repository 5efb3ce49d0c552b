"""A deterministic corpus of damaged and hostile DICOM instances, for fuzzing every way in (C-STORE, STOW-RS).

`build_corpus(seed)` returns `[(case_name, part10_bytes), ...]`: a few valid instances generated with real
geometry (tests/dicom_factory.py, tests/dicom_modalities.py), then, from each, truncations, byte flips in the
header and in the pixel data, unknown and wrong VRs, missing UIDs, huge declared lengths, a transfer syntax that
does not match the bytes, short or broken pixel data, pixel bombs, and bytes that are not DICOM at all. The
same seed gives the same bytes (UIDs included), so a failing case can be named and replayed:

    cases = dict(build_corpus(seed=9))
    data = cases["ct-native/flip-header-3"]

The case name says what was done (`<base>/<mutation>-<n>`); `family(name)` gives the mutation family for
summaries. Some mutations leave a valid instance (a flipped byte in a description, in native pixels): a
receiver may store those, as long as what it stores is still a valid instance.

The building blocks (`encode`, `part10`, `with_vr`, `implicit_declared_explicit`, `with_fragments`,
`pixel_bomb`) are importable for targeted tests.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from tests.dicom_factory import compress_dataset, make_ct_series, make_radiograph, make_sr
from tests.dicom_modalities import make_enhanced_mr, make_mr_series, make_us_image

_PIXEL_TAG_LE = b"\xe0\x7f\x10\x00"
_PYDICOM_ROOT = "1.2.826.0.1.3680043.8.498."
# Explicit VR elements with a 4-byte length (PS3.5 7.1.2, Table 7.1-1).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

Case = tuple[str, bytes]


# ---------------------------------------------------------------------------------------------- building blocks
def part10(ds: Dataset, body: bytes | None = None, transfer_syntax: str | None = None) -> bytes:
    """A Part-10 file: preamble, "DICM", the File Meta of `ds` (optionally declaring `transfer_syntax`), then
    `body` (default: `ds` encoded in the declared syntax)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(str(ds.SOPClassUID))
    meta.MediaStorageSOPInstanceUID = UID(str(ds.SOPInstanceUID))
    syntax = UID(transfer_syntax or str(ds.file_meta.TransferSyntaxUID))
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    if body is None:
        body = encode(ds, syntax)
    return b"\x00" * 128 + b"DICM" + buffer.getvalue() + body


def encode(ds: Dataset, transfer_syntax: str) -> bytes:
    """The data set of `ds` (no File Meta) encoded as `transfer_syntax` says (implicit/explicit, endianness)."""
    syntax = UID(transfer_syntax)
    plain = copy.copy(ds)
    if "file_meta" in plain.__dict__:
        del plain.file_meta
    buffer = DicomBytesIO()
    buffer.is_little_endian = syntax.is_little_endian if syntax.is_transfer_syntax else True
    buffer.is_implicit_VR = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
    write_dataset(buffer, plain)
    return buffer.getvalue()


def body_offset(data: bytes) -> int:
    """Where the data set starts in Part-10 bytes (after the File Meta group, PS3.10 7.1)."""
    group_length = int.from_bytes(data[140:144], "little")
    return 144 + group_length


def top_level_elements(data: bytes) -> list[tuple[int, int, bytes, int, int]]:
    """The Explicit VR Little Endian top-level elements of Part-10 bytes, up to the first undefined length:
    (offset, tag, VR, header length, value length)."""
    out = []
    position = body_offset(data)
    while position + 8 <= len(data):
        group, element = (
            int.from_bytes(data[position : position + 2], "little"),
            int.from_bytes(data[position + 2 : position + 4], "little"),
        )
        vr = data[position + 4 : position + 6]
        if vr in _LONG_VRS:
            length = int.from_bytes(data[position + 8 : position + 12], "little")
            header = 12
        else:
            length = int.from_bytes(data[position + 6 : position + 8], "little")
            header = 8
        out.append((position, (group << 16) | element, vr, header, length))
        if length == 0xFFFFFFFF:
            break
        position += header + length
    return out


def with_vr(data: bytes, tag: int, vr: bytes) -> bytes:
    """Part-10 Explicit VR bytes with the VR of top-level element `tag` replaced by two other bytes (same
    length field: an unknown VR such as b"ZZ" keeps the stream's framing)."""
    for offset, found, _vr, _header, _length in top_level_elements(data):
        if found == tag:
            return data[: offset + 4] + vr + data[offset + 6 :]
    raise KeyError(f"tag {tag:08X} not at the top level")


def implicit_declared_explicit(ds: Dataset) -> bytes:
    """`ds` encoded Implicit VR Little Endian behind File Meta that declares Explicit VR Little Endian."""
    return part10(ds, body=encode(ds, ImplicitVRLittleEndian), transfer_syntax=ExplicitVRLittleEndian)


def with_fragments(ds: Dataset, fragments: list[bytes], transfer_syntax: str = RLELossless) -> bytes:
    """`ds` declared as `transfer_syntax` with its Pixel Data replaced by these encapsulated fragments (an empty
    list leaves the Basic Offset Table alone)."""
    broken = copy.deepcopy(ds)
    broken.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    if fragments:
        items = b"".join(
            b"\xfe\xff\x00\xe0" + len(f + b"\x00" * (len(f) % 2)).to_bytes(4, "little") + f + b"\x00" * (len(f) % 2)
            for f in fragments
        )
    else:
        items = b""
    broken.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" + items
    broken["PixelData"].VR = "OB"
    broken["PixelData"].is_undefined_length = True
    return part10(broken)


def pixel_bomb(
    rows: int = 65535,
    columns: int = 65535,
    frames: int = 1,
    syntax: str = RLELossless,
    base: Dataset | None = None,
) -> bytes:
    """A few kilobytes of compressed pixels declaring `rows` x `columns` x `frames` (65535 x 65535 x 16 bits:
    8 GiB for a decoder to allocate), made from `base` (default: a new 32 x 32 CT slice)."""
    ds = compress_dataset(base if base is not None else make_ct_series(1, rows=32, columns=32)[0], syntax)
    ds.Rows, ds.Columns = rows, columns
    if frames > 1:
        ds.NumberOfFrames = frames
    return part10(ds)


# ---------------------------------------------------------------------------------------------- the corpus
def _bases(rng: random.Random) -> dict[str, Dataset]:
    """The valid instances mutated below, with UIDs drawn from `rng` so the bytes repeat for one seed."""
    study = _uid(rng)
    ct = make_ct_series(2, rows=32, columns=32, study_uid=study)[0]
    bases = {
        "ct-native": ct,
        "ct-rle": compress_dataset(ct, RLELossless),
        "ct-j2k": compress_dataset(ct, JPEG2000Lossless),
        "dx-native": make_radiograph(rows=64, columns=64, study_uid=study),
        "mr-native": make_mr_series(1, study_uid=study)[0],
        "mr-enhanced": make_enhanced_mr(4, study_uid=study),
        "us-multiframe": make_us_image(frames=3, study_uid=study),
        "sr": make_sr(study_uid=study),
    }
    mapping: dict[str, str] = {}

    def fixed(dataset: Dataset, element: DataElement) -> None:
        # The factories draw UIDs at random (pydicom's root): replace each by one drawn from `rng`.
        if element.VR == "UI" and str(element.value).startswith(_PYDICOM_ROOT):
            element.value = mapping.setdefault(str(element.value), _uid(rng))

    for ds in bases.values():
        ds.walk(fixed)
        ds.file_meta.walk(fixed)
    return bases


def _uid(rng: random.Random) -> str:
    return f"2.25.{rng.getrandbits(120)}"


def _flip(data: bytes, rng: random.Random, start: int, end: int, n: int) -> bytes:
    out = bytearray(data)
    for _ in range(n):
        position = rng.randrange(start, max(start + 1, end))
        if position < len(out):
            out[position] ^= 1 << rng.randrange(8) if rng.random() < 0.5 else rng.randrange(1, 256)
    return bytes(out)


def _pixel_offset(data: bytes) -> int:
    position = data.rfind(_PIXEL_TAG_LE)
    return position if position > 0 else len(data)


def _mutations(name: str, ds: Dataset, data: bytes, rng: random.Random) -> list[Case]:
    cases: list[Case] = []
    start = body_offset(data)
    pixels = _pixel_offset(data)
    is_native = UID(str(ds.file_meta.TransferSyntaxUID)) in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

    # Truncations: in the File Meta, right after it, in the header, just before and inside the pixels, one byte.
    cuts = [rng.randrange(1, start), start, rng.randrange(start, pixels), pixels, len(data) - 1]
    cuts += [rng.randrange(pixels, len(data)) for _ in range(3)] if pixels < len(data) else []
    cases += [(f"{name}/truncate-{i}", data[:cut]) for i, cut in enumerate(cuts)]

    # Byte flips in the header (after the File Meta) and in the pixel data.
    cases += [(f"{name}/flip-header-{i}", _flip(data, rng, start, pixels, 1 + i % 4)) for i in range(8)]
    if pixels < len(data):
        cases += [(f"{name}/flip-pixels-{i}", _flip(data, rng, pixels + 12, len(data), 1 + 4 * i)) for i in range(5)]

    # VRs: unknown ones, and valid ones that do not fit the value.
    elements = [e for e in top_level_elements(data) if e[2] not in _LONG_VRS and e[1] >> 16 != 0x7FE0]
    for i, vr in enumerate((b"ZZ", b"\x00\x00", b"ui", b"??", b"US", b"FD")):
        tag = 0x00080018 if i == 0 else rng.choice(elements)[1]
        cases.append((f"{name}/vr-{vr.hex()}-{i}", with_vr(data, tag, vr)))

    # Huge declared lengths on a short element, and on the pixels.
    for i, length in enumerate((0xFFFF, 0xFFF0)):
        offset = rng.choice(elements)[0]
        cases.append(
            (f"{name}/huge-length-{i}", data[: offset + 6] + length.to_bytes(2, "little") + data[offset + 8 :])
        )
    if pixels < len(data):
        for i, length in enumerate((0x7FFFFFF0, 0xFFFFFFF0)):
            cases.append(
                (
                    f"{name}/huge-pixel-length-{i}",
                    data[: pixels + 8] + length.to_bytes(4, "little") + data[pixels + 12 :],
                )
            )

    # Missing UIDs (re-encoded, so the rest is well formed).
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        missing = copy.deepcopy(ds)
        delattr(missing, keyword)
        cases.append((f"{name}/missing-{keyword}", part10(ds, body=encode(missing, _syntax(ds)))))

    # A transfer syntax that does not match the bytes.
    body = data[start:]
    for i, syntax in enumerate((ImplicitVRLittleEndian, ExplicitVRBigEndian, JPEG2000Lossless, RLELossless)):
        if syntax != _syntax(ds):
            cases.append((f"{name}/declared-{_short(syntax)}-{i}", part10(ds, body=body, transfer_syntax=syntax)))
    if _syntax(ds) == ExplicitVRLittleEndian:
        cases.append((f"{name}/implicit-declared-explicit", implicit_declared_explicit(ds)))

    # Short or broken pixel data.
    if "PixelData" in ds:
        if is_native:
            short = copy.deepcopy(ds)
            short.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
            cases.append((f"{name}/short-pixels", part10(short)))
            odd = copy.deepcopy(ds)
            odd.PixelData = b""
            cases.append((f"{name}/empty-pixels", part10(odd)))
        else:
            cases.append((f"{name}/fragments-none", with_fragments(ds, [], _syntax(ds))))
            cases.append((f"{name}/fragments-empty", with_fragments(ds, [b""], _syntax(ds))))
            garbage = bytes(rng.randrange(256) for _ in range(200))
            cases.append((f"{name}/fragments-garbage", with_fragments(ds, [garbage], _syntax(ds))))
    return cases


def _syntax(ds: Dataset) -> UID:
    return UID(str(ds.file_meta.TransferSyntaxUID))


def _short(syntax: str) -> str:
    return {ImplicitVRLittleEndian: "implicit", ExplicitVRBigEndian: "big-endian", JPEG2000Lossless: "j2k"}.get(
        syntax, "rle"
    )


def _not_dicom(rng: random.Random) -> list[Case]:
    junk = bytes(rng.randrange(256) for _ in range(4096))
    return [
        ("not-dicom/empty", b""),
        ("not-dicom/zeros", b"\x00" * 1024),
        ("not-dicom/random-4k", junk),
        ("not-dicom/text", b"Hello, this is not a DICOM file.\n" * 20),
        ("not-dicom/png", b"\x89PNG\r\n\x1a\n" + junk[:500]),
        ("not-dicom/jpeg", b"\xff\xd8\xff\xe0" + junk[:500]),
        ("not-dicom/html", b"<html><body>error 500</body></html>"),
        ("not-dicom/preamble-only", b"\x00" * 128 + b"DICM"),
        ("not-dicom/preamble-garbage", b"\x00" * 128 + b"DICM" + junk[:1000]),
        ("not-dicom/meta-only", b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\x00\x00\x00\x00"),
    ]


def _bombs(base: Dataset) -> list[Case]:
    return [
        ("bomb/65535x65535-rle", pixel_bomb(base=base)),
        ("bomb/65535x65535-j2k", pixel_bomb(syntax=JPEG2000Lossless, base=base)),
        ("bomb/20000x20000-rle", pixel_bomb(20000, 20000, base=base)),
        ("bomb/frames-1e9-rle", pixel_bomb(32, 32, frames=1_000_000_000, base=base)),
        ("bomb/4096x4096x100000-rle", pixel_bomb(4096, 4096, frames=100_000, base=base)),
    ]


def build_corpus(seed: int = 9, bases: Callable[[random.Random], dict[str, Dataset]] = _bases) -> list[Case]:
    """Every case of the corpus for `seed`: valid instances first ("<base>/valid"), then their mutations,
    pixel bombs and non-DICOM bytes. About 340 cases; deterministic for one seed."""
    rng = random.Random(seed)
    cases: list[Case] = []
    made = bases(rng)
    for name, ds in made.items():
        data = part10(ds)
        cases.append((f"{name}/valid", data))
        cases += _mutations(name, ds, data, rng)
    cases += _bombs(made["ct-native"])
    cases += _not_dicom(rng)
    return cases


def family(case_name: str) -> str:
    """The mutation family of a case name: "truncate", "flip-header", "vr", "bomb", "not-dicom", ..."""
    base, _, mutation = case_name.partition("/")
    if base in ("bomb", "not-dicom"):
        return base
    stem = mutation.rsplit("-", 1)[0] if mutation[-1:].isdigit() else mutation
    return stem.split("-")[0] if stem.startswith(("vr", "declared")) else stem
