"""Update log: byte layout checked against struct/zlib/numpy written out here, and crash repair."""

from __future__ import annotations

import binascii
import json
import math
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from zostream.engine import update_log as ul
from zostream.engine import update_log_tools as ult
from zostream.engine.update_log import UpdateLog
from zostream.engine.update_log_format import LogHeader, Step


def make_header(**kw: object) -> LogHeader:
    args: dict[str, object] = dict(
        base_fingerprint="sha256:abc",
        scope={"kind": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "init_seed": 123},
        noise="gaussian",
        generator_version=1,
        master_dtype="float32",
        rounding="nearest",
        eps=1e-3,
        weight_decay=0.0,
        decay_exclusions=["bias", "norm"],
        job_seed=42,
        q=1,
        extra={"lr_schedule": "constant"},
    )
    args.update(kw)
    return LogHeader(**args)  # type: ignore[arg-type]


def f32(x: float) -> float:
    return float(np.float32(x))  # independent of the struct-based rounding in the module


def seed(step: int) -> int:
    # The format spec, written out independently: crc_hqx of the little-endian u32 step, init 0x5A0C.
    return binascii.crc_hqx(step.to_bytes(4, "little"), 0x5A0C)


def expected_record(step: int, d: int, flags: int, g: float, lr: float) -> bytes:
    body = step.to_bytes(4, "little") + bytes([d, flags]) + np.float32(g).tobytes() + np.float32(lr).tobytes()
    return body + binascii.crc_hqx(body, seed(step)).to_bytes(2, "little")


def header_len(path: Path) -> int:
    n = int.from_bytes(path.read_bytes()[8:12], "little")
    return 12 + n + 4


@pytest.fixture
def no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bulk tests: durability is checked in test_append_is_one_write_then_fsync."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def write_log(path: Path, n: int, q: int = 1, lr: float | None = None) -> list[Step]:
    rng = random.Random(n * 31 + q)
    lrs = [lr if lr is not None else 1e-4 / (1 + t) for t in range(n)]
    steps = [Step(t, lrs[t], tuple(rng.gauss(0, 3) for _ in range(q)), t % 7 == 3) for t in range(n)]
    with UpdateLog.create(path, make_header(q=q)) as log:
        for s in steps:
            log.append(s)
    return steps


def test_header_bytes_and_roundtrip(tmp_path: Path) -> None:
    h = make_header(scope={"kind": "full"}, decay_exclusions=("bias",), q=3)
    assert LogHeader.from_json(h.to_json()) == h
    assert h.decay_exclusions == ["bias"]  # normalised, so equality survives the file
    p = tmp_path / "a.zolog"
    UpdateLog.create(p, h).close()
    raw = p.read_bytes()
    assert raw[:6] == b"ZOLOG\0" and struct.unpack("<H", raw[6:8])[0] == 1
    n = struct.unpack("<I", raw[8:12])[0]
    js = raw[12 : 12 + n]
    assert len(raw) == 12 + n + 4 and struct.unpack("<I", raw[12 + n :])[0] == zlib.crc32(js)
    d = json.loads(js)
    assert list(d) == sorted(d) and d["q"] == 3 and d["base_fingerprint"] == "sha256:abc"
    assert ul.read_header(p) == h and UpdateLog.open(p).header == h


@pytest.mark.parametrize(
    "kw",
    [
        {"noise": "uniform"},
        {"q": 0},
        {"q": 257},
        {"eps": 0.0},
        {"eps": float("nan")},
        {"weight_decay": -1.0},
        {"rounding": "floor"},
        {"master_dtype": "int8"},
        {"job_seed": -1},
        {"base_fingerprint": ""},
        {"scope": {"kind": "lora", "alpha": 16, "targets": ["q"], "init_seed": 1}},
        {"scope": {"kind": "adapter"}},
        {"decay_exclusions": "bias"},
        {"extra": {"x": float("inf")}},
    ],
)
def test_header_validation(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_header(**kw)


def test_records_exact_bytes_and_readback(tmp_path: Path) -> None:
    p = tmp_path / "a.zolog"
    steps = [
        Step(0, 1e-4, (0.1, -2.5)),
        Step(1, 3.3e-7, (1e-30, 123456.789), skipped=True),
        Step(2, 0.1, (-0.0, 7.0)),
    ]
    with UpdateLog.create(p, make_header(q=2)) as log:
        for s in steps:
            log.append(s)
        assert len(log) == 3
    body = p.read_bytes()[header_len(p) :]
    expected = b"".join(
        expected_record(s.step, d, int(s.skipped), g, s.lr) for s in steps for d, g in enumerate(s.directions)
    )
    assert len(body) == 3 * 2 * 16 and body == expected
    back = UpdateLog.open(p)
    assert back.repaired is None and back.damage is None
    want = [Step(s.step, f32(s.lr), tuple(f32(g) for g in s.directions), s.skipped) for s in steps]
    assert back.steps() == want and back.steps(1, 2) == want[1:2]
    assert back.steps()[0].directions[0] != 0.1  # really float32-rounded
    assert math.copysign(1.0, back.steps()[2].directions[0]) == -1.0


def test_20000_steps_fit_400kb(tmp_path: Path, no_fsync: None) -> None:
    p = tmp_path / "big.zolog"
    with UpdateLog.create(p, make_header()) as log:
        for t in range(20_000):
            log.append(Step(t, 1e-5, (t * 1e-3,)))
        assert log.size_bytes() == os.path.getsize(p)
    assert os.path.getsize(p) == header_len(p) + 20_000 * 16 < 400_000
    assert len(UpdateLog.open(p)) == 20_000


def test_torn_tail_is_truncated_to_last_step(tmp_path: Path, no_fsync: None) -> None:
    p = tmp_path / "a.zolog"
    steps = write_log(p, 5)
    good = p.read_bytes()
    with open(p, "ab") as f:
        f.write(random.Random(0).randbytes(7))
    rep = ult.verify(p)
    assert (rep.ok, rep.steps, rep.stops_at) == (False, 5, 5) and p.read_bytes()[:-7] == good
    log = UpdateLog.open(p)
    assert len(log) == 5 and p.read_bytes() == good
    assert log.repaired is not None and "7 bytes after step 4" in log.repaired and "torn" in log.repaired
    log.append(Step(5, 1e-4, (1.0,)))  # appends land right after the repaired end
    log.close()
    again = UpdateLog.open(p)
    want = [Step(s.step, f32(s.lr), tuple(f32(g) for g in s.directions), s.skipped) for s in steps]
    assert again.repaired is None and again.steps() == want + [Step(5, f32(1e-4), (1.0,))]


def test_one_writer_at_a_time(tmp_path: Path, no_fsync: None) -> None:
    p = tmp_path / "a.zolog"
    write_log(p, 2)
    a, b = UpdateLog.open(p), UpdateLog.open(p)
    a.append(Step(2, 1e-4, (1.0,)))  # a now holds the writer lock
    with pytest.raises(BlockingIOError):
        b.append(Step(2, 1e-4, (2.0,)))
    with open(p, "ab") as f:
        f.write(b"xx")  # looks torn while a holds the lock: a reader must not cut it
    c = UpdateLog.open(p)
    assert len(c) == 3 and c.repaired is None and c.damage is not None and "another process" in c.damage
    a.close()
    assert len(UpdateLog.open(p)) == 3 and os.path.getsize(p) == header_len(p) + 3 * 16


def test_bit_flip_in_last_record_drops_that_step(tmp_path: Path, no_fsync: None) -> None:
    p = tmp_path / "a.zolog"
    write_log(p, 5)
    raw = bytearray(p.read_bytes())
    raw[-16 + 9] ^= 0x10  # inside g of step 4
    p.write_bytes(bytes(raw))
    log = UpdateLog.open(p)
    assert len(log) == 4 and os.path.getsize(p) == len(raw) - 16
    assert log.repaired is not None and "after step 3" in log.repaired and "bad CRC" in log.repaired


@pytest.mark.parametrize("q", [1, 2])
def test_every_bit_flip_in_a_middle_record_stops_there(tmp_path: Path, no_fsync: None, q: int) -> None:
    p = tmp_path / "a.zolog"
    write_log(p, 6, q=q)
    clean = p.read_bytes()
    rec0 = header_len(p) + (2 * q + q - 1) * 16  # last direction of step 2
    for bit in range(128):
        raw = bytearray(clean)
        raw[rec0 + bit // 8] ^= 1 << (bit % 8)
        p.write_bytes(bytes(raw))
        rep = ult.verify(p)
        assert (rep.ok, rep.steps, rep.stops_at) == (False, 2, 2), bit
        assert p.read_bytes() == bytes(raw)  # verify never modifies
    log = UpdateLog.open(p)
    assert len(log) == 2 and os.path.getsize(p) == header_len(p) + 2 * q * 16
    assert log.repaired is not None and "after step 1" in log.repaired


def test_record_copied_to_wrong_place_is_rejected(tmp_path: Path, no_fsync: None) -> None:
    p = tmp_path / "a.zolog"
    write_log(p, 6)
    raw = bytearray(p.read_bytes())
    o = header_len(p)
    raw[o + 4 * 16 : o + 5 * 16] = raw[o + 1 * 16 : o + 2 * 16]
    p.write_bytes(bytes(raw))
    assert ult.verify(p).stops_at == 4


def test_missing_direction_at_tail(tmp_path: Path, no_fsync: None) -> None:
    p = tmp_path / "a.zolog"
    write_log(p, 4, q=2)
    size = os.path.getsize(p)
    with open(p, "ab") as f:
        f.write(expected_record(4, 0, 0, 0.5, 1e-4))  # a valid record, but its step lacks direction 1
    log = UpdateLog.open(p)
    assert len(log) == 4 and os.path.getsize(p) == size
    assert log.repaired is not None and "after step 3" in log.repaired and "incomplete" in log.repaired


def test_repair_false_leaves_file_and_refuses_append(tmp_path: Path, no_fsync: None) -> None:
    p = tmp_path / "a.zolog"
    write_log(p, 3)
    with open(p, "ab") as f:
        f.write(b"\x01\x02\x03")
    before = p.read_bytes()
    log = UpdateLog.open(p, repair=False)
    assert len(log) == 3 and log.repaired is None and log.damage is not None
    with pytest.raises(ValueError, match="repair"):
        log.append(Step(3, 1e-4, (1.0,)))
    assert p.read_bytes() == before
    exported = ult.export_json(p)
    assert exported["num_steps"] == 3 and exported["damage"] and p.read_bytes() == before


def test_misuse_raises(tmp_path: Path, no_fsync: None) -> None:
    p = tmp_path / "a.zolog"
    with UpdateLog.create(p, make_header(q=2)) as log:
        log.append(Step(0, 1e-4, (1.0, 2.0)))
        with pytest.raises(ValueError, match="next step must be 1"):
            log.append(Step(2, 1e-4, (1.0, 2.0)))
        with pytest.raises(ValueError, match="q=2"):
            log.append(Step(1, 1e-4, (1.0,)))
        with pytest.raises(ValueError, match="skipped"):
            log.append(Step(1, 1e-4, (float("nan"), 2.0)))
        with pytest.raises(ValueError, match="float32"):
            log.append(Step(1, 1e-4, (1e39, 2.0)))
        log.append(Step(1, 1e-4, (float("nan"), float("inf")), skipped=True))  # guard may log NaN
        assert len(log) == 2
    back = UpdateLog.open(p).steps()[1]
    assert back.skipped and math.isnan(back.directions[0]) and back.directions[1] == math.inf
    assert json.dumps(ult.export_json(p), allow_nan=False)  # NaN exported as null
    with pytest.raises(FileExistsError):
        UpdateLog.create(p, make_header(q=2))
    assert len(UpdateLog.open(p)) == 2  # the existing log is untouched


def test_expect_mismatch_names_field(tmp_path: Path) -> None:
    p = tmp_path / "a.zolog"
    UpdateLog.create(p, make_header()).close()
    UpdateLog.open(p, expect=make_header())
    with pytest.raises(ValueError, match="base_fingerprint"):
        UpdateLog.open(p, expect=make_header(base_fingerprint="sha256:other"))
    with pytest.raises(ValueError, match="job_seed"):
        UpdateLog.open(p, expect=make_header(job_seed=7))


def test_bad_header_errors_name_the_file(tmp_path: Path) -> None:
    p = tmp_path / "a.zolog"
    UpdateLog.create(p, make_header()).close()
    good = p.read_bytes()
    cases = {
        b"ZOLAG\0" + good[6:]: "magic",
        good[:6] + struct.pack("<H", 9) + good[8:]: "version 9",
        good[:20] + bytes([good[20] ^ 1]) + good[21:]: "header CRC",
        good[:30]: "truncated",
    }
    for raw, what in cases.items():
        p.write_bytes(raw)
        with pytest.raises(ValueError, match=what) as e:
            UpdateLog.open(p)
        assert str(p) in str(e.value)
        rep = ult.verify(p)
        assert not rep.ok and rep.reason is not None and what in rep.reason


def test_append_is_one_write_then_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "a.zolog"
    log = UpdateLog.create(p, make_header(q=3))
    events: list[tuple[str, int]] = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, b: events.append(("write", len(b))) or real_write(fd, b))
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", 0)))
    log.append(Step(0, 1e-4, (1.0, 2.0, 3.0)))
    assert events == [("write", 48), ("fsync", 0)]
    events.clear()
    log.truncate(0)
    assert events == [("fsync", 0)] and len(log) == 0
    log.close()


def test_truncate_then_resume(tmp_path: Path, no_fsync: None) -> None:
    p = tmp_path / "a.zolog"
    steps = write_log(p, 5)
    with UpdateLog.open(p) as log:
        log.truncate(3)
        assert len(log) == 3 and log.size_bytes() == header_len(p) + 3 * 16
        with pytest.raises(ValueError):
            log.truncate(4)
        log.append(Step(3, 2e-4, (9.0,)))
    back = UpdateLog.open(p).steps()
    assert [s.lr for s in back] == [f32(s.lr) for s in steps[:3]] + [f32(2e-4)]


def test_compaction_preserves_steps_and_shrinks(tmp_path: Path, no_fsync: None) -> None:
    src, dst = tmp_path / "a.zolog", tmp_path / "a.compact.zolog"
    q, rng = 2, random.Random(5)
    lrs = [1e-4] * 5000 + [5e-5] * 700 + [0.0, -0.0, 0.0]  # 5000 > one run; +-0 must stay apart
    with UpdateLog.create(src, make_header(q=q)) as log:
        for t, lr in enumerate(lrs):
            log.append(Step(t, lr, (rng.gauss(0, 1), rng.gauss(0, 1)), skipped=t % 11 == 0))
    with open(src, "ab") as f:
        f.write(b"torn")  # compaction drops a torn tail and leaves src alone
    size = ult.compact(src, dst)
    assert size == os.path.getsize(dst) and ult.verify(src).stops_at == len(lrs)
    runs = [4096, 904, 700, 1, 1, 1]
    hdr = header_len(dst)
    assert size == hdr + sum(16 + (n + 7) // 8 + 4 * q * n for n in runs) < os.path.getsize(src) / 3
    assert struct.unpack("<H", dst.read_bytes()[6:8])[0] == 2
    orig, comp = UpdateLog.open(src, repair=False), UpdateLog.open(dst, expect=make_header(q=q))
    assert comp.compacted and comp.steps() == orig.steps() and len(comp) == len(lrs)
    assert [math.copysign(1, s.lr) for s in comp.steps()[-3:]] == [1, -1, 1]
    assert comp.steps(4090, 4100) == orig.steps(4090, 4100)
    with pytest.raises(ValueError, match="read-only"):
        comp.append(Step(len(lrs), 1e-4, (0.0, 0.0)))
    raw = bytearray(dst.read_bytes())
    raw[hdr + 16 + 512 + 4 * q * 4096 + 16 + 3] ^= 4  # inside the second run's payload
    dst.write_bytes(bytes(raw))
    assert ult.verify(dst).stops_at == 4096
    assert len(UpdateLog.open(dst)) == 4096 and os.path.getsize(dst) == hdr + 16 + 512 + 8 * 4096


def test_export_json(tmp_path: Path, no_fsync: None) -> None:
    p = tmp_path / "a.zolog"
    steps = write_log(p, 4, q=2)
    d = ult.export_json(p)
    assert d["header"] == json.loads(make_header(q=2).to_json()) and d["num_steps"] == 4
    assert d["steps"][3] == {
        "step": 3,
        "lr": f32(steps[3].lr),
        "g": [f32(g) for g in steps[3].directions],
        "skipped": True,
    }
    assert ult.verify(p) == ult.VerifyReport(True, 4, None, None)


# ---- format 3 / 4: each step's training loss (the slow-climb guard reads it; engine/climb.py)


def expected_record_loss(step: int, d: int, flags: int, g: float, lr: float, loss: float) -> bytes:
    body = step.to_bytes(4, "little") + bytes([d, flags])
    body += np.float32(g).tobytes() + np.float32(lr).tobytes() + np.float32(loss).tobytes()
    return body + binascii.crc_hqx(body, seed(step)).to_bytes(2, "little")


def loss_steps() -> list[Step]:
    return [
        Step(0, 1e-4, (0.1, -2.5), loss=2.3456789),
        Step(1, 3.3e-7, (math.nan, math.inf), skipped=True, loss=math.nan),  # a skipped, non-finite step
        Step(2, 0.1, (-0.0, 7.0), loss=1e39),  # beyond float32: stored as inf, never an error
        Step(3, 0.1, (1.0, 2.0), loss=0.5),
    ]


def test_loss_records_exact_bytes_and_readback(tmp_path: Path) -> None:
    p = tmp_path / "a.zolog"
    steps = loss_steps()
    with UpdateLog.create(p, make_header(q=2), loss=True) as log:
        for s in steps:
            log.append(s)
        assert log.has_loss and log.step_bytes == 40
    raw = p.read_bytes()
    assert struct.unpack("<H", raw[6:8])[0] == 3
    stored = [2.3456789, math.nan, math.inf, 0.5]
    expected = b"".join(
        expected_record_loss(s.step, d, int(s.skipped), g, s.lr, stored[s.step])
        for s in steps
        for d, g in enumerate(s.directions)
    )
    assert raw[header_len(p) :] == expected and len(expected) == 4 * 2 * 20
    back = UpdateLog.open(p)
    assert back.repaired is None and back.has_loss
    got = back.steps()
    assert [s.loss for s in got][2:] == [math.inf, 0.5] and math.isnan(got[1].loss)
    assert got[0].loss == f32(2.3456789) and got[0].directions == (f32(0.1), -2.5)
    assert ult.export_json(p)["steps"][0]["loss"] == f32(2.3456789)
    assert ult.export_json(p)["steps"][1]["loss"] is None  # JSON has no NaN


def test_loss_log_needs_a_loss_and_old_logs_drop_it(tmp_path: Path) -> None:
    with (
        UpdateLog.create(tmp_path / "new.zolog", make_header(), loss=True) as log,
        pytest.raises(ValueError, match="give Step.loss"),
    ):
        log.append(Step(0, 1e-4, (1.0,)))
    # A format 1 log (written before losses were logged) keeps its 16-byte records when a job appends.
    p = tmp_path / "old.zolog"
    write_log(p, 3)
    with UpdateLog.open(p) as log:
        assert not log.has_loss and log.step_bytes == 16
        log.append(Step(3, 1e-4, (1.0,), loss=4.0))
    back = UpdateLog.open(p)
    assert back.format_version == 1 and [s.loss for s in back.steps()] == [None] * 4
    assert os.path.getsize(p) == header_len(p) + 4 * 16


def test_loss_log_repairs_torn_tail_and_catches_disagreeing_directions(tmp_path: Path, no_fsync: None):
    p = tmp_path / "a.zolog"
    with UpdateLog.create(p, make_header(q=2), loss=True) as log:
        for s in loss_steps():
            log.append(s)
    hdr = header_len(p)
    with open(p, "ab") as f:
        f.write(expected_record_loss(4, 0, 0, 1.0, 0.1, 3.0)[:13])
    log = UpdateLog.open(p)
    assert len(log) == 4 and "torn record" in log.repaired and os.path.getsize(p) == hdr + 160
    log.close()
    # Direction 1 of step 4 carries another loss than direction 0 (a valid CRC each): the step is refused.
    with open(p, "ab") as f:
        f.write(expected_record_loss(4, 0, 0, 1.0, 0.1, 3.0) + expected_record_loss(4, 1, 0, 1.0, 0.1, 3.5))
    assert ul.scan_file(str(p)).reason == "record 9 disagrees with direction 0 of step 4 on lr, flags or loss"
    assert len(UpdateLog.open(p)) == 4


def test_compacting_a_loss_log_keeps_the_losses(tmp_path: Path, no_fsync: None) -> None:
    src, dst = tmp_path / "a.zolog", tmp_path / "b.zolog"
    steps = loss_steps() + [Step(4 + t, 0.1, (0.5, -0.5), loss=1.0 / (t + 1)) for t in range(20)]
    with UpdateLog.create(src, make_header(q=2), loss=True) as log:
        for s in steps:
            log.append(s)
    size = ult.compact(src, dst)
    raw = dst.read_bytes()
    assert struct.unpack("<H", raw[6:8])[0] == 4 and json.loads(raw[12 : header_len(dst) - 4])["compacted"]
    runs = [1, 1, 22]  # lr 1e-4, 3.3e-7, then 0.1 for the rest
    assert size == header_len(dst) + sum(16 + (n + 7) // 8 + 4 * 2 * n + 4 * n for n in runs)
    orig, comp = UpdateLog.open(src), UpdateLog.open(dst)
    assert comp.compacted and comp.has_loss and len(comp) == len(steps)
    pack = [struct.pack("<f", s.loss) for s in orig.steps()]  # bitwise, NaN included
    assert [struct.pack("<f", s.loss) for s in comp.steps()] == pack
    assert [(s.lr, s.skipped) for s in comp.steps()] == [(s.lr, s.skipped) for s in orig.steps()]
    assert comp.steps()[5].directions == orig.steps()[5].directions
    # The old compacted format (v2) has no losses: a format 1 log compacts to it, as before.
    write_log(tmp_path / "c.zolog", 5, q=2)
    ult.compact(tmp_path / "c.zolog", tmp_path / "d.zolog")
    assert struct.unpack("<H", (tmp_path / "d.zolog").read_bytes()[6:8])[0] == 2
    assert [s.loss for s in UpdateLog.open(tmp_path / "d.zolog").steps()] == [None] * 5
