"""The generated docs/results.md keeps every section a benchmark owns: compare_methods regenerates the file but
keeps the DynaMMo-merging and pretrained-backbone sections; pretrained_cil replaces only its own section."""
from benchmarks.tables import pretrained_cil
from benchmarks.tables.compare_methods import MERGING_TITLE, kept


def test_pretrained_section_replaces_only_itself_and_compare_methods_keeps_it(tmp_path):
    doc = tmp_path / "results.md"
    (tmp_path / "out").mkdir()
    png = tmp_path / "out" / "pretrained_cil.png"
    png.write_bytes(b"png")
    doc.write_text(f"# Methods\n\ntable\n\n{MERGING_TITLE}\n\nmerging table\n")
    pretrained_cil.into_docs(str(doc), [pretrained_cil.TITLE, "", "### mnist5k", "", "first"], str(png))
    pretrained_cil.into_docs(str(doc), [pretrained_cil.TITLE, "", "### mnist5k", "", "second"], str(png))
    text = doc.read_text()
    assert text.count(pretrained_cil.TITLE) == 1 and "second" in text and "first" not in text
    assert "merging table" in text and text.index(MERGING_TITLE) < text.index(pretrained_cil.TITLE)
    assert (tmp_path / "pretrained_cil.png").read_bytes() == b"png"
    assert kept(str(doc), MERGING_TITLE) == ["", f"{MERGING_TITLE}\n\nmerging table"]
    assert kept(str(doc), pretrained_cil.TITLE) == ["", f"{pretrained_cil.TITLE}\n\n### mnist5k\n\nsecond"]
    doc.write_text(f"# Methods\n\n{pretrained_cil.TITLE}\n\nold\n\n{MERGING_TITLE}\n\nmerging table\n")
    pretrained_cil.into_docs(str(doc), [pretrained_cil.TITLE, "", "new"], str(png))
    text = doc.read_text()
    assert "old" not in text and "new" in text and "merging table" in text
    assert kept(str(tmp_path / "missing.md"), MERGING_TITLE) == []


def test_the_table_sweep_runs_each_tuned_row_at_its_chosen_point_and_every_other_row_as_it_is(tmp_path,
                                                                                                  monkeypatch):
    """compare_methods' table: the tuning sweep's choice (by validation) replaces a tuned row's points, written out
    as the sweep file that makes the table; the other rows keep theirs, and every row shares the budget; no
    reported seed is a tuning seed."""
    import os

    import yaml

    from benchmarks.run import ROOT
    from benchmarks.tables import compare_methods
    from trainer import sweep

    monkeypatch.chdir(ROOT)
    bic = os.path.abspath(os.path.join("options", "bic", "digits.yaml"))
    table = compare_methods.table_sweep({bic: {"overrides": {"epochs_bias": 100, "lrate_bias": 0.01}}},
                                        str(tmp_path))
    notes = {(p.cfg.method, p.note) for p in table.points}
    assert ("bic", "epochs_bias=100_lrate_bias=0.01") in notes and ("bic", "default") not in notes
    assert {("icarl", "default"), ("finetune_il", "apply_nme=false_memory_size=0"), ("gem", "default")} <= notes
    (chosen,) = [p for p in table.points if p.cfg.method == "bic"]
    assert (chosen.cfg.epochs_bias, chosen.cfg.lrate_bias, chosen.cfg.val_split) == (100, 0.01, 0.0)
    assert {(p.cfg.img_size, p.cfg.epochs, p.cfg.batch_size, tuple(p.cfg.seed)) for p in table.points} == {
        (16, 5, 32, (1, 2, 3))}
    assert [p.note for p in sweep.load_sweep(str(tmp_path / "table.yaml")).points] == [p.note for p in table.points]
    tuning = sweep.load_sweep(compare_methods.TUNING)
    assert not set(tuning.points[0].seeds) & {1, 2, 3} and {p.cfg.val_split for p in tuning.points} == {0.2}
    assert {p.cfg.method for p in tuning.points} == {"bic", "gem", "podnet", "ewc"}
