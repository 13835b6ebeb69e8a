import collections
import sys

import numpy as np
import pytest
import scipy.stats

from jaxemb import metrics as M
from jaxemb.data import ppi
from jaxemb.data import proteins as P

DATA = "../shared/data/ppi/skempi_multichain.csv"
SPLIT = "../shared/data/ppi/cv5_pdb_split.json"
HEADER = "PDB,Ligand Sequences,Receptor Sequences,KD(M),pKd\n"


@pytest.fixture(scope="module")
def real():
    import os
    base = os.path.join(os.path.dirname(__file__), "..", "..")
    return ppi.read_affinity_csv(os.path.join(base, DATA)), os.path.join(base, SPLIT)


def write(tmp_path, text, name="d.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_real_file_loads(real):
    d, _ = real
    # 6,698 rows, 26 of them exact duplicates (dropped), 345 PDB ids, up to 6 ligand / 3 receptor chains
    assert (len(d), d.duplicates, len(set(d.pdbs))) == (6698 - 26, 26, 345)
    assert max(len(c.ligands) for c in d.complexes) == 6 and max(len(c.receptors) for c in d.complexes) == 3
    c = d.complexes[0]
    assert c.pdb == "1A22" and c.kd == 9e-10 and c.line == 2
    assert c.target == pytest.approx(abs(np.log10(9e-10 + 1e-10)))


def test_targets_abs_log10_and_pkd(tmp_path):
    path = write(tmp_path, HEADER + "X1,AC,DE,1e-9,\nX2,AC,DF,,7.5\n")
    a, b = ppi.read_affinity_csv(path), ppi.read_affinity_csv(path, target="pkd")
    np.testing.assert_allclose(a.y, [abs(np.log10(1e-9 + 1e-10)), abs(np.log10(10 ** -7.5 + 1e-10))])
    np.testing.assert_allclose(b.y, [9.0, 7.5])
    with pytest.raises(ValueError, match="target='kd'"):
        ppi.read_affinity_csv(path, target="kd")


@pytest.mark.parametrize("body, match", [
    ("X1,AC,,1e-9,\n", "line 2, column 'Receptor Sequences': chain 0 is empty"),
    ("X1,\"AC,,DE\",DE,1e-9,\n", "line 2, column 'Ligand Sequences': chain 1 is empty"),
    ("X1,AC,DE,1e-9,\nX2,AcJ,DE,1e-9,\n", r"line 3, column 'Ligand Sequences'.*\['J', 'c'\]"),
    ("X1,AC,DE,0,\n", "line 2, column 'KD\\(M\\)': KD=0.0 must be > 0"),
    ("X1,AC,DE,-1e-9,\n", "KD=-1e-09 must be > 0"),
    ("X1,AC,DE,strong,\n", "line 2, column 'KD\\(M\\)': 'strong' is not a number"),
    ("X1,AC,DE,nan,\n", "'nan' is not a finite number"),
    ("X1,AC,DE,,NaN\n", "column 'pKd': 'NaN' is not a finite number"),
    ("X1,AC,DE,,\n", "line 2: no affinity"),
    (",AC,DE,1e-9,\n", "line 2, column 'PDB': empty PDB id"),
])
def test_bad_rows_name_line_and_column(tmp_path, body, match):
    with pytest.raises(ValueError, match=match):
        ppi.read_affinity_csv(write(tmp_path, HEADER + body))


def test_missing_columns(tmp_path):
    with pytest.raises(ValueError, match="no column 'Receptor Sequences'"):
        ppi.read_affinity_csv(write(tmp_path, "PDB,Ligand Sequences,KD(M)\nX,AC,1e-9\n"))
    with pytest.raises(ValueError, match="neither 'KD\\(M\\)' nor 'pKd'"):
        ppi.read_affinity_csv(write(tmp_path, "PDB,Ligand Sequences,Receptor Sequences\nX,AC,DE\n"))
    with pytest.raises(ValueError, match="no data rows"):
        ppi.read_affinity_csv(write(tmp_path, HEADER))


def test_duplicates_dropped_and_counted_or_error(tmp_path):
    path = write(tmp_path, HEADER + "X1,AC,DE,1e-9,\nX1,AC,DE,1e-9,\nX1,AC,DE,2e-9,\nX1, AC ,DE,1e-9,\n")
    d = ppi.read_affinity_csv(path)
    assert (len(d), d.duplicates) == (2, 2) and [c.kd for c in d.complexes] == [1e-9, 2e-9]
    with pytest.raises(ValueError, match="line 3 duplicates .*, line 2 "):
        ppi.read_affinity_csv(path, duplicates="error")


def test_cv5_split_does_not_leak(real):
    d, split = real
    folds = ppi.read_cv5(split)
    seen_test = collections.Counter()
    for k in range(5):
        s = ppi.cv5_split(d, split, fold=k, val_fraction=0.1, seed=k)
        parts = {name: {d.pdbs[i] for i in idx} for name, idx in s.items()}
        assert not (parts["train"] & parts["test"] or parts["train"] & parts["val"] or parts["val"] & parts["test"])
        assert sum(len(v) for v in s.values()) == len(d)
        assert parts["test"] <= folds[k][1] and len(s["val"]) > 0
        seen_test.update(parts["test"])
    assert set(seen_test) == set(d.pdbs) and max(seen_test.values()) == 1  # every PDB is test exactly once
    with pytest.raises(ValueError, match="fold=5"):
        ppi.cv5_split(d, split, fold=5)


def test_fallback_groups_keep_mutants_together(real):
    d, _ = real
    g = ppi.groups(d)
    s = ppi.grouped_split(g, test_fraction=0.2, val_fraction=0.1, seed=0)
    parts = {name: {d.pdbs[i] for i in idx} for name, idx in s.items()}
    assert not (parts["train"] & parts["test"] or parts["train"] & parts["val"] or parts["val"] & parts["test"])
    assert 0.15 < len(s["test"]) / len(d) < 0.3
    # from sequences alone (PDB ids ignored): each complex's point mutants share its group
    g = ppi.groups(d, use_pdb=False)
    first = {}
    for i, c in enumerate(d.complexes):
        shape = (len(c.ligands), tuple(map(len, c.ligands + c.receptors)))
        j = first.setdefault((c.pdb, shape), i)
        assert g[i] == g[j], (c.pdb, c.line)
    assert len(set(g)) < len(set(d.pdbs))  # shared proteins link some PDB ids too


def test_groups_link_point_mutants_only(tmp_path):
    body = ("A,AAAAAAAAAA,CCCCC,1e-9,\nB,AAAAAAAAAK,CCCCC,1e-8,\nC,KKKKKAAAAA,CCCCC,1e-7,\n"
            "D,AAAAAAAAAAA,CCCCC,1e-7,\n")
    d = ppi.read_affinity_csv(write(tmp_path, HEADER + body))
    g = ppi.groups(d, identity=0.9)
    assert g[0] == g[1] and len({g[0], g[2], g[3]}) == 3


def test_truncated_tokens_keep_eos():
    t = P.tokenize(["ACDEFGHIK", "AC"] * 2, max_length=6)
    assert t.ids.shape == (4, 6) and t.truncated == 2
    assert (t.ids[:, 0] == P.CLS).all() and t.ids[0, -1] == P.EOS and t.ids[1, 3] == P.EOS


def test_metrics_match_scipy():
    rng = np.random.default_rng(7)
    for n in (5, 50, 400):
        a = rng.normal(size=n)
        b = 0.5 * a + rng.normal(size=n)
        b[: n // 5] = np.round(b[: n // 5], 1)  # some ties
        np.testing.assert_allclose(M.rankdata(b), scipy.stats.rankdata(b))
        assert M.spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a, b)[0], abs=1e-12)
        assert M.pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a, b)[0], abs=1e-12)
        assert M.rmse(a, b) == pytest.approx(np.sqrt(np.mean((a - b) ** 2)), rel=1e-12)
        rho = M.spearman(a, b)
        assert M.spearman_error_bar(rho, n) == pytest.approx(
            np.sqrt((1 - rho ** 2) ** 2 * (1 + rho ** 2 / 2) / (n - 3)), rel=1e-12)
    assert np.isnan(M.pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="3 values and y_pred 2"):
        M.spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="n > 3"):
        M.spearman_error_bar(0.5, 3)


def test_composition_baseline_beats_constant_on_planted_signal():
    rng = np.random.default_rng(0)
    aa = np.array(list("ACDEFGHIKLMNPQRSTVWY"))
    comps = []
    for i in range(300):
        w = rng.dirichlet(np.ones(20))
        lig = "".join(rng.choice(aa, 60, p=w))
        rec = "".join(rng.choice(aa, 80))
        signal = 3 * lig.count("W") / 60 - 2 * rec.count("K") / 80  # planted in the composition
        kd = 10.0 ** -(8 + 10 * signal + 0.05 * rng.normal())
        comps.append(ppi.Complex(f"P{i}", (lig,), (rec,), kd, float(-np.log10(kd)), i + 2))
    d = ppi.Dataset(comps, "pkd", 0)
    split = ppi.grouped_split(ppi.groups(d), test_fraction=0.3, seed=0)
    r = ppi.composition_baseline(d, split)
    y_test = d.y[split["test"]]
    const = M.rmse(y_test, np.full_like(y_test, d.y[split["train"]].mean()))
    assert r["spearman"] > 0.5 and r["rmse"] < 0.7 * const and r["n"] == len(split["test"])


def test_fit_chains_cuts_the_longest_chains_first():
    assert ppi.fit_chains([5, 3], 20) == [5, 3]
    assert ppi.fit_chains([10, 3, 8], 15) == [6, 3, 6]
    assert sum(ppi.fit_chains([100, 1, 50], 30)) <= 30 and ppi.fit_chains([100, 1, 50], 30)[1] == 1
    with pytest.raises(ValueError, match="3 chains do not fit in 2"):
        ppi.fit_chains([4, 4, 4], 2)


def test_layouts_frame_every_chain_as_documented():
    lig, rec = ("ACDEFGHIKL", "MK"), ("WY",)
    c = ppi.Complex("X", lig, rec, 1e-9, 9.0, 2)
    c2 = ppi.Complex("Y", ("MK",), ("WY", "ACD"), 1e-8, 8.0, 3)
    lay = ppi.layouts([c, c2], ppi.Layout(max_chain=6, max_side=10, max_joint=14))
    ids = lambda s: [P.INDEX[a] for a in s]
    row = lambda name, i: lay[name][i][:lay[name + "_len"][i]].tolist()
    # side: <cls> c1 <eos> c2 <eos>, room 10 - 3 = 7 residues: the longer chain cut to 5
    assert row("lig", 0) == [P.CLS] + ids("ACDEF") + [P.EOS] + ids("MK") + [P.EOS]
    assert row("rec", 1) == [P.CLS] + ids("WY") + [P.EOS] + ids("ACD") + [P.EOS]
    # sc: ligands first, one <cls>, every chain closed by <eos>; 14 - 4 = 10 residues: cap 6 on the longest
    assert row("sc", 0) == [P.CLS] + ids("ACDEFG") + [P.EOS] + ids("MK") + [P.EOS] + ids("WY") + [P.EOS]
    # chains: a table of distinct chains, each <cls> chain <eos> within max_chain; complexes index it
    table = [row("chain_tokens", j) for j in range(len(lay["chain_tokens"]))]
    assert len(table) == 4 and table[0] == [P.CLS] + ids("ACDE") + [P.EOS]
    assert lay["chain_idx"].tolist() == [[0, 1, 2], [1, 2, 3]]
    assert lay["n_lig"].tolist() == [2, 1] and lay["n_rec"].tolist() == [1, 2]
    # packed: framed chains with segment ids 1, 2, ... and 0 after
    seg = lay["packed_seg"][0]
    assert seg[:7].tolist() == [1] * 6 + [2] and seg.max() == 3 and (lay["packed"][0][seg == 0] == P.PAD).all()
    assert [lay["packed"][0][seg == k][-1] for k in (1, 2, 3)] == [P.EOS] * 3
    assert lay["cut"] == {"side": 1, "sc": 1, "chain": 1, "packed": 1}
    with pytest.raises(ValueError, match="max_side=2"):
        ppi.layouts([c], ppi.Layout(max_side=2))


class FakeHub:
    """datasets.load_dataset for a PPB-Affinity-format hub dataset, offline: three splits of row dicts."""

    def __init__(self, parts):
        self.parts, self.calls = parts, []

    def __call__(self, repo, config, split, trust_remote_code):
        self.calls.append((repo, config, tuple(split)))
        return [Part(self.parts[s]) for s in split]


class Part(list):
    @property
    def column_names(self):
        return list(self[0])


def hub_rows(rng, n, pdb):
    letters = list("ACDEFGHIKLMNPQRSTVWY")
    seq = lambda: "".join(rng.choice(letters, int(rng.integers(5, 20))))
    return [{"PDB": f"{pdb}{i % 3}", "Ligand Sequences": f"{seq()},{seq()}", "Receptor Sequences": seq(),
             "KD(M)": float(10.0 ** -rng.uniform(5, 11))} for i in range(n)]


def test_hub_dataset_rows_and_its_own_split():
    rng = np.random.default_rng()
    parts = {"train": hub_rows(rng, 9, "T"), "validation": hub_rows(rng, 4, "V"), "test": hub_rows(rng, 5, "S")}
    parts["test"].append(dict(parts["test"][0]))  # an exact duplicate: dropped and counted
    hub = FakeHub(parts)
    assert ppi.is_hub_name("proteinea/ppb_affinity") and ppi.is_hub_name("proteinea/ppb_affinity:raw")
    assert not ppi.is_hub_name("data/x.csv") and not ppi.is_hub_name("a/b.csv") and not ppi.is_hub_name("x.csv")
    d, split = ppi.read_affinity_hub("proteinea/ppb_affinity", "pkd", load_dataset=hub)
    assert hub.calls == [("proteinea/ppb_affinity", "filtered", ("train", "validation", "test"))]
    assert (len(d), d.duplicates) == (18, 1) and [len(split[k]) for k in ("train", "val", "test")] == [9, 4, 5]
    assert {d.pdbs[i][0] for i in split["val"]} == {"V"} and {d.pdbs[i][0] for i in split["test"]} == {"S"}
    kd = np.array([r["KD(M)"] for r in parts["train"]])
    np.testing.assert_allclose(d.y[split["train"]], -np.log10(kd))
    assert d.complexes[0].ligands == tuple(parts["train"][0]["Ligand Sequences"].split(","))
    ppi.read_affinity_hub("proteinea/ppb_affinity:raw", load_dataset=hub)
    assert hub.calls[-1][1] == "raw"
    parts["validation"][2]["KD(M)"] = -1.0
    with pytest.raises(ValueError, match=r"proteinea/ppb_affinity, val row 2, column 'KD\(M\)': KD=-1.0"):
        ppi.read_affinity_hub("proteinea/ppb_affinity", load_dataset=hub)


def test_hub_dataset_without_the_datasets_library_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="needs the `datasets` library"):
        ppi.read_affinity_hub("proteinea/ppb_affinity")


def test_the_study_reads_a_hub_name_through_datasets_with_its_split(monkeypatch):
    import types
    from experiments import ppi as study
    from experiments.configs.ppi import get_config
    rng = np.random.default_rng()
    hub = FakeHub({"train": hub_rows(rng, 12, "T"), "validation": hub_rows(rng, 6, "V"), "test": hub_rows(rng, 6, "S")})
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=hub))
    cfg = get_config("default")
    cfg.data.source = "proteinea/ppb_affinity"
    d, split, derived = study.load(cfg)
    assert derived["split"] == "the dataset's own" and derived["test_complexes"] == 6 and len(d) == 24
    assert hub.calls[0][0] == "proteinea/ppb_affinity"
