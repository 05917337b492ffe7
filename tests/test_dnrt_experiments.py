"""The DNRT experiments run end to end and write their outputs."""
import csv

from bionets.cli import main


def test_dnrt_seeds_and_responses(tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["experiment", "dnrt_seeds", "seeds=2", "epochs=1", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "dnrt_seeds.csv").open()))
    assert {r["variant"] for r in rows} == {"baseline", "+RAA", "+ARR", "+both"} and len(rows) == 8
    assert all(0 < float(r["final_top1"]) <= 100 for r in rows)
    assert (out / "dnrt_seeds.png").stat().st_size > 0
    both = out / "runs" / "both_0" / "best.pt"
    base = out / "runs" / "baseline_0" / "best.pt"
    assert main(["experiment", "responses", f"checkpoint={both}", f"compare={base}", "--out", str(tmp_path / "r")]) == 0
    assert "within-class std" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "r" / "responses.csv").open()))
    assert len({r["run"] for r in rows}) == 2 and (tmp_path / "r" / "responses.png").exists()
    assert main(["experiment", "responses"]) == 2                      # checkpoint= is required
