"""`captioner bleu-bench`: every checkpoint x beam size lands in the tables, files and run record."""

import csv
import json
import shutil

import pytest

from captioner.cli import main


def _bench(trained_run, synthetic_dataset, out, *extra):
    return main(["bleu-bench", "--checkpoints", str(trained_run / "best.pt"), str(trained_run / "last.pt"),
                 "--beam-sizes", "1", "2", "--dataset", "coco", "--captions", str(synthetic_dataset.val_captions),
                 "--images", str(synthetic_dataset.val_images), "--out", str(out), "--device", "cpu", *extra])


def test_bleu_bench_writes_tables_plot_results_and_run_record(trained_run, synthetic_dataset, tmp_path, capsys):
    out = tmp_path / "bench"
    assert _bench(trained_run, synthetic_dataset, out) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    label = trained_run.name  # runs are named RUNFOLDER_STEM_beamK_lpA
    assert [(r["run"].split("_beam")[0], r["beam_size"]) for r in rows] == [
        (f"{label}_best", "1"), (f"{label}_best", "2"), (f"{label}_last", "1"), (f"{label}_last", "2")]
    assert all(0 <= float(r["Bleu_4"]) <= 1 and float(r["captions_per_s"]) > 0 and r["num_images"] == "8"
               for r in rows)
    assert (out / "results.md").read_text().count("\n") == 2 + len(rows)
    assert (out / "bleu_vs_beam.png").read_bytes()[:4] == b"\x89PNG"
    for r in rows:
        results = json.loads((out / "results" / f"{r['run']}.json").read_text())
        assert len(results) == 8 and all(isinstance(x["image_id"], int) and isinstance(x["caption"], str) for x in results)
        assert len((out / "per_image" / f"{r['run']}.jsonl").read_text().splitlines()) == 8
    assert "data:image/jpeg;base64," in (out / "report.html").read_text()
    record = json.loads((out / "run.json").read_text())
    assert {"versions", "seed", "device", "split_hash", "checkpoints", "best_run"} <= set(record)
    assert record["versions"]["torch"] and len(record["checkpoints"]) == 2
    assert record["dataset"] == {"dataset": "coco", "captions": str(synthetic_dataset.val_captions),
                                 "images": str(synthetic_dataset.val_images), "limit": 0}  # no split: the files say


def test_run_names_tell_files_of_the_same_name_apart_in_ensembles_too():
    from captioner.benchmarks.bleu_bench import _labels

    assert _labels(["a/run/best.pt", "b/run/best.pt", "a/run/best.pt+b/run/best.pt", "a/run/best.pt"]) == [
        "run_best", "run_best-2", "run_best+run_best-2", "run_best-3"]


def test_split_hash_identifies_the_split(trained_run, synthetic_dataset, tmp_path):
    def split_hash(name, *extra):
        assert _bench(trained_run, synthetic_dataset, tmp_path / name, "--beam-sizes", "1", *extra) == 0
        return json.loads((tmp_path / name / "run.json").read_text())["split_hash"]

    same = split_hash("a")
    assert split_hash("b") == same
    assert split_hash("c", "--limit", "4") != same
    shutil.rmtree(tmp_path / "a")


def test_a_rerun_into_the_same_folder_leaves_only_its_own_runs_there(trained_run, synthetic_dataset, tmp_path,
                                                                     capsys):
    out = tmp_path / "bench"
    assert _bench(trained_run, synthetic_dataset, out) == 0  # 2 checkpoints x 2 beams
    (out / "results" / "mine.json").write_text("[]")  # not a run of the earlier benchmark: left alone
    assert _bench(trained_run, synthetic_dataset, out, "--beam-sizes", "1", "--limit", "4") == 0
    assert "removed 4 per-run files of the earlier benchmark" in capsys.readouterr().err  # its two beam-2 runs
    runs = {r["run"] for r in csv.DictReader(open(out / "results.csv"))}
    assert len(runs) == 2
    assert {p.stem for p in (out / "results").iterdir()} == runs | {"mine"}
    assert {p.stem for p in (out / "per_image").iterdir()} == runs
    assert all(len(json.loads((out / "results" / f"{run}.json").read_text())) == 4 for run in runs)
    assert _bench(trained_run, synthetic_dataset, out, "--length-penalties", "-1") == 2
    assert "--length-penalties must be >= 0" in capsys.readouterr().err

    (tmp_path / "a_file").write_text("")
    code = _bench(trained_run, synthetic_dataset, tmp_path / "a_file", "--beam-sizes", "1")
    assert code == 2 and "cannot write to the bleu-bench folder" in capsys.readouterr().err


def test_flags_of_another_dataset_are_refused(trained_run, synthetic_dataset, tmp_path, capsys):
    assert _bench(trained_run, synthetic_dataset, tmp_path / "o", "--root", str(tmp_path)) == 2
    assert "--root and --karpathy-json belong to flickr8k and karpathy" in capsys.readouterr().err
    code = main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--dataset", "flickr8k", "--root",
                 str(tmp_path), "--images", str(synthetic_dataset.val_images)])
    assert code == 2 and "--captions and --images belong to coco" in capsys.readouterr().err


def test_missing_checkpoint_is_a_usage_error(synthetic_dataset, tmp_path, capsys):
    code = main(["bleu-bench", "--checkpoints", str(tmp_path / "nope.pt"), "--dataset", "coco", "--captions",
                 str(synthetic_dataset.val_captions), "--images", str(synthetic_dataset.val_images), "--out",
                 str(tmp_path / "o")])
    assert code == 2 and "nope.pt" in capsys.readouterr().err


def test_no_repeat_ngrams_are_a_dimension_of_the_benchmark(trained_run, synthetic_dataset, tmp_path):
    """`--no-repeat-ngrams 0 2`: one run per ban, and the banned run's captions never repeat a word pair."""
    out = tmp_path / "bench"
    assert _bench(trained_run, synthetic_dataset, out, "--beam-sizes", "2", "--no-repeat-ngrams", "0", "2") == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    label = f"{trained_run.name}_best"
    assert [(r["run"], r["no_repeat_ngram"]) for r in rows if r["run"].startswith(label)] == [
        (f"{label}_beam2_lp0", "0"), (f"{label}_beam2_lp0_nr2", "2")]

    def repeats_a_pair(caption):
        words = caption.split()
        pairs = list(zip(words, words[1:]))
        return len(pairs) != len(set(pairs))

    plain, banned = ([x["caption"] for x in json.loads((out / "results" / f"{run}.json").read_text())]
                     for run in (f"{label}_beam2_lp0", f"{label}_beam2_lp0_nr2"))
    assert any(repeats_a_pair(c) for c in plain)  # the tiny model repeats itself without the ban
    assert not any(repeats_a_pair(c) for c in banned)
    assert json.loads((out / "run.json").read_text())["no_repeat_ngrams"] == [0, 2]


def test_a_metric_that_fails_in_some_runs_only_leaves_their_cells_blank_and_names_them(
        trained_run, synthetic_dataset, tmp_path, monkeypatch):
    """METEOR (a Java program) may time out in one run of many: the benchmark still writes every table."""
    pytest.importorskip("pycocoevalcap")
    from captioner import coco_eval
    calls = []

    def meteor_that_works_once(gts, res, timeout):
        calls.append(len(res))
        if len(calls) > 1:
            raise RuntimeError("METEOR failed: timed out")
        return 0.25, [0.25] * len(res)

    monkeypatch.setattr(coco_eval.shutil, "which", lambda name: "/usr/bin/java")
    monkeypatch.setattr(coco_eval, "_meteor", meteor_that_works_once)
    out = tmp_path / "bench"
    assert _bench(trained_run, synthetic_dataset, out, "--metrics", "all") == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(calls) == len(rows) == 4
    assert [r["METEOR"] for r in rows] == ["0.25", "", "", ""] and all(r["CIDEr"] for r in rows)
    table = (out / "results.md").read_text().splitlines()
    meteor = table[0].split(" | ").index("METEOR")
    assert [line.split(" | ")[meteor] for line in table[2:]] == ["0.2500", "", "", ""]
    reason = json.loads((out / "run.json").read_text())["skipped_metrics"]["METEOR"]
    assert reason == f"METEOR skipped: METEOR failed: timed out (runs {', '.join(r['run'] for r in rows[1:])})"
