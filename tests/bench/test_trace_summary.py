"""tools/trace_summary.py: busy time is the union of device intervals; gaps are binned by size."""

import gzip
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))

import trace_summary  # noqa: E402


def _trace(tmp_path):
    ev = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
          # two streams overlapping in [10, 15): busy [0, 20) then a 3 us gap, then [23, 30), a 200 us gap
          {"ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 15.0, "name": "gemm"},
          {"ph": "X", "pid": 1, "tid": 2, "ts": 10.0, "dur": 10.0, "name": "attn"},
          {"ph": "X", "pid": 1, "tid": 1, "ts": 23.0, "dur": 7.0, "name": "gemm"},
          {"ph": "X", "pid": 1, "tid": 1, "ts": 230.0, "dur": 10.0, "name": "gemm"},
          {"ph": "X", "pid": 2, "tid": 9, "ts": 0.0, "dur": 1000.0, "name": "python"}]
    p = tmp_path / "plugins" / "profile" / "x"
    p.mkdir(parents=True)
    with gzip.open(p / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": ev}, f)
    return tmp_path


def test_busy_union_and_gaps(tmp_path):
    events, names = trace_summary.load_events(str(_trace(tmp_path)))
    s = trace_summary.summarize(events, names)
    assert s["span_us"] == 240.0
    assert s["busy_us"] == 20.0 + 7.0 + 10.0            # host events excluded, overlap counted once
    gaps = {g["us"]: g for g in s["gaps"]}
    assert gaps["0-5"]["count"] == 1 and gaps["0-5"]["total_us"] == 3.0
    assert gaps["100-1000"]["count"] == 1 and gaps["100-1000"]["total_us"] == 200.0
    assert s["top"][0]["name"] == "gemm" and s["top"][0]["count"] == 3


def test_cli_reports_no_device_events(tmp_path, capsys):
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"traceEvents": [{"ph": "M", "pid": 2, "name": "process_name",
                                              "args": {"name": "/host:CPU"}}]}))
    assert trace_summary.main([str(p)]) == 1
    assert "no device events" in capsys.readouterr().err
