"""The shape check runs in seconds with small overrides and refuses what does not fit."""
from dllm_decode.tools import shape_check


def test_shape_check_small_overrides(capsys):
    rc = shape_check.main(["--layers", "1", "--d-model", "32", "--heads", "4", "--vocab", "64",
                           "--prompt", "8", "--gen", "16", "32", "--block", "8",
                           "--repeats", "1", "--warmup", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = [line.split() for line in out.splitlines() if line and not line.startswith(("#", "gen", " gen"))]
    rows = [r for r in rows if r[0].isdigit()]
    assert [int(r[0]) for r in rows] == [16, 32] and [int(r[1]) for r in rows] == [24, 40]
    assert all(float(x) > 0 for r in rows for x in r[2:])


def test_shape_check_default_is_llada_8b_and_checks_memory(capsys, monkeypatch):
    # pretend the device has 1 GiB free: the 8B default shape must be refused, not faked
    monkeypatch.setattr(shape_check, "_available_bytes", lambda device: 1 << 30)
    rc = shape_check.main(["--device", "cpu"])
    cap = capsys.readouterr()
    assert rc == 2
    assert "params=8.016B" in cap.out and "not enough memory" in cap.err
