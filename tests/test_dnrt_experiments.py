"""The DNRT experiments run end to end and write their outputs."""
import csv

from bionets.cli import main


def test_dnrt_seeds_and_responses(tmp_path, capsys):
    out = tmp_path / "seeds"
    assert main(["experiment", "dnrt_seeds", "seeds=2", "epochs=1", "--out", str(out)]) == 0
    said = capsys.readouterr().err.splitlines()             # a line a run (a log has no progress bar)
    assert len(said) == 8 and said[2].startswith("dnrt_seeds: +RAA seed 0: final test top-1 ")
    assert said[-1].endswith(f"(8 of 8 runs; {out / 'runs' / 'both_1'})")
    rows = list(csv.DictReader((out / "dnrt_seeds.csv").open()))
    assert {r["variant"] for r in rows} == {"baseline", "+RAA", "+ARR", "+both"} and len(rows) == 8
    assert all(60 < float(r["final_top1"]) <= 100 for r in rows)      # one epoch trains each (73-82% measured)
    assert (out / "dnrt_seeds.png").stat().st_size > 0
    both = out / "runs" / "both_0" / "best.pt"
    base = out / "runs" / "baseline_0" / "best.pt"
    assert main(["experiment", "responses", f"checkpoint={both}", f"compare={base}", "--out", str(tmp_path / "r")]) == 0
    assert "within-class std" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "r" / "responses.csv").open()))
    assert {r["run"] for r in rows} == {"both_0", "baseline_0"} and (tmp_path / "r" / "responses.png").exists()
    # two checkpoints of one run: both kept, the second named by its file too (it replaced the first)
    assert main(["experiment", "responses", f"checkpoint={both}", f"compare={both.with_name('last.pt')}",
                 "--out", str(tmp_path / "r2")]) == 0
    assert {r["run"] for r in csv.DictReader((tmp_path / "r2" / "responses.csv").open())} == {"both_0", "both_0/last"}
    assert main(["experiment", "responses"]) == 2                      # checkpoint= is required
    # a rerun into the same output directory replaces its runs (a run elsewhere would take NAME-2),
    # and only them: the whole runs/ folder went, a user's own runs with it
    before = both.stat().st_mtime_ns
    (out / "runs" / "mine").mkdir()
    (out / "runs" / "mine" / "best.pt").write_bytes(b"a run of one's own")
    assert main(["experiment", "dnrt_seeds", "seeds=1", "epochs=1", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "dnrt_seeds.csv").open()))
    assert [r["run_dir"] for r in rows if r["variant"] == "+both"] == [str(out / "runs" / "both_0")]
    assert both.stat().st_mtime_ns != before and not (out / "runs" / "both_0-2").exists()
    assert not (out / "runs" / "both_1").exists() and (out / "runs" / "mine" / "best.pt").exists()


def test_arr_and_responses_on_a_spiking_net(tmp_path, monkeypatch):
    """A spiking net folds its T time steps into the classifier's batch ([T N, F]): ARR and the
    responses experiment average each sample's responses over time (both failed on the row count)."""
    import torch
    from bionets.layers.arr import per_sample
    r = torch.arange(12.0).view(6, 2)                                  # T = 3 steps of N = 2 samples
    torch.testing.assert_close(per_sample(r, 2), r.view(3, 2, 2).mean(0))
    assert per_sample(r, 6) is r
    args = ["train", "model.name=snn_digits", "model.kwargs={T: 2}", "train.epochs=2", "train.progress=false",
            "mechanisms={arr: {weight: 1.0}}", f"out_dir={tmp_path}", "name=snn", "--quiet"]
    assert main(args) == 0
    assert main(["experiment", "responses", f"checkpoint={tmp_path / 'snn' / 'last.pt'}", "--out", str(tmp_path / "r")]) == 0
    rows = list(csv.DictReader((tmp_path / "r" / "responses.csv").open()))
    assert rows and {r["class"] for r in rows} == {"0", "1", "2", "3"}
    # more classes asked for than the data has (digits: 10): the figure has a column a class it has
    from bionets.experiments import responses
    plotted = []
    monkeypatch.setattr(responses, "_plot", lambda runs, path, channels, classes, what: plotted.append(classes))
    assert main(["experiment", "responses", f"checkpoint={tmp_path / 'snn' / 'last.pt'}", "classes=12",
                 "--out", str(tmp_path / "r12")]) == 0
    assert plotted == [10] and {r["class"] for r in csv.DictReader((tmp_path / "r12" / "responses.csv").open())} \
        == {str(k) for k in range(10)}


def test_dnrt_seeds_on_a_config_that_needs_data(tmp_path, capsys):
    """Any config with its dataset under data_root (MNIST's idx files here); without it, one line
    naming the experiment's option, not bionets train's --data-root."""
    from bionets.data.fakes import write_mnist

    root = write_mnist(tmp_path / "data").parent.parent
    config = tmp_path / "mnist.yaml"
    config.write_text("base: dnrt/digits\nmodel: {kwargs: {img_size: 28, in_chans: 1}}\n"
                      "data: {name: mnist, batch_size: 8}\n")
    args = ["experiment", "dnrt_seeds", f"config={config}", "seeds=1", "epochs=1", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == ("bionets: error: data.root is not set for dataset 'mnist': pass "
                                               "data_root=DIR")
    assert main(args + [f"data_root={root}"]) == 0
    assert "DNRT on mnist" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "out" / "dnrt_seeds.csv").open()))
    assert len(rows) == 4 and all(0 <= float(r["final_top1"]) <= 100 for r in rows)
