"""The short version of benchmarks/serve_load.py: vLLM's own benchmark client against
the OpenAI server with offload (disk store, pool 25%): nothing fails."""

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_server_holds_load_with_offload(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import serve_load

    written = {}
    monkeypatch.setattr(serve_load, "write_results",
                        lambda name, command, table, rows, plot: written.update(rows=rows))
    serve_load.main(["--quick", "--work-dir", str(tmp_path)])  # raises if any failed
    rows = written["rows"]
    assert {r["config"] for r in rows} == {"disk 25%"}
    assert all(r["failed"] == 0 and r["completed"] == r["requests"] for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["rss_peak_mib"] > 0 for r in rows)
    log = next(tmp_path.glob("server-disk_25.log")).read_text()
    assert "expert offload: pool" in log  # offload really ran
