"""Hostile configs (issue 17): seconds and peak memory of each hostile document of
``tests/test_hostile_config.py`` (alias and interpolation bombs, nesting past the recursion limit)
through the real reader that refuses it, in one fresh process (``tests/bounded_cases.py``).

    .venv/bin/python benchmarks/hostile_configs.py

Before the fix the same documents hung for minutes at 1.4-2.8 GB (alias bombs) or took 4.1 GB
(Hydra interpolation bomb, a class-order file bomb expanded by the job); the tests bound each case
at 60 s and 400 MiB over the process's imports, which this prints with the load average.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine_line, table

sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from test_hostile_config import BOUNDED

    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        for i, (name, reader, file_name, text, _) in enumerate(BOUNDED):
            path = Path(tmp) / f"{i}-{file_name}"
            path.write_text(text, encoding="utf-8")
            cases.append({"name": name, "reader": reader, "arg": str(path)})
        (Path(tmp) / "cases.json").write_text(json.dumps(cases))
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tests" / "bounded_cases.py"), str(Path(tmp) / "cases.json")],
            capture_output=True,
            text=True,
            cwd=tmp,
            check=True,
        )
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    done = records.pop()
    rows = [
        [r["name"], r["outcome"], f"{r['seconds']:.2f} s", f"{r['peak_over_baseline_mib']:.0f} MiB"]
        for r in records
    ]
    print(machine_line())
    print(f"process after imports: {done['baseline_mib']:.0f} MiB peak")
    print(table(rows, ["hostile document", "outcome", "time", "peak over the imports"]))


if __name__ == "__main__":
    main()
