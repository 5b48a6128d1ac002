"""`make demo` end to end: each step of the demo shows what it should, and it cleans up."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from agent import cgroups

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end(bpf_required):
    out_dir = tempfile.mkdtemp(prefix="warden-demo-test-")
    res = subprocess.run([sys.executable, str(ROOT / "packaging" / "demo.py")], capture_output=True, text=True,
                         timeout=400, env={**os.environ, "WARDEN_DEMO_DIR": out_dir, "COLUMNS": "200"})
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-4000:]
    # 4: reads are masked in flight
    assert re.search(r"\*\*\*-\*\*-\d{4}", out) and "**** **** **** 1111" in out and "****@example.com" in out
    # 5: a DELETE without WHERE is denied by policy
    assert "permission denied by Warden" in out and "pg:delete" in out
    # 6: the UPDATE waited for an approver and then ran
    assert "pending approval" in out and "the workload's UPDATE then ran: UPDATE 1" in out
    # 7: the API response was masked too
    assert re.search(r'"card_number":\s*"\*{4} \*{4} \*{4} 1111"', out.split("7. Workload calls the partner API")[1])
    # 8-12: the audit trail answers from the collector and the evidence verifies
    assert "billing-report" in out.split("8. Audit trail")[1]
    assert "public.customers" in out.split("9. Who touched")[1]
    assert "intact" in out.split("11. Evidence integrity")[1]
    assert re.search(r"\d+ OCSF records written to", out)
    # cleanup: no demo cgroup left, so nothing of ours stays attached
    assert not (Path(cgroups.cgroup2_mount()) / "warden-demo").exists()
