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
