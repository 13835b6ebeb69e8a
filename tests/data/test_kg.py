import os
import tarfile
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jaxemb.data import kg
from jaxemb.models.nfe import filtered_rank

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "kg")

# entities a, b, c, d -> 0..3; relations r1, r2 -> 0, 1 (reciprocals 2, 3)
HAND = {"train": "a\tr1\tb\na\tr1\tc\nb\tr2\tc\nc\tr2\tb\nd\tr2\ta\n",
        "valid": "a\tr1\td\n",
        "test": "c\tr2\ta\n"}


def write_graph(root, files=HAND):
    root.mkdir(parents=True, exist_ok=True)
    for split, text in files.items():
        (root / f"{split}.txt").write_text(text)
    return str(root)


def test_reads_vocab_reciprocals_and_filter(tmp_path):
    g = kg.load(write_graph(tmp_path / "hand"))
    assert g.entities == ["a", "b", "c", "d"] and g.relations == ["r1", "r2"]
    assert g.num_entities == 4 and g.num_relations == 4
    np.testing.assert_array_equal(g.test, [[2, 1, 0]])
    np.testing.assert_array_equal(kg.reciprocal(g.test, 4), [[2, 1, 0], [0, 3, 2]])
    f = kg.Filter(g)
    assert f.known(0, 0).tolist() == [1, 2, 3]  # (a, r1): b, c (train) and d (valid)
    assert f.known(2, 1).tolist() == [0, 1]     # (c, r2): a (test), b (train)
    assert f.known(0, 3).tolist() == [2, 3]     # (a, r2^-1): c (test), d (train)
    assert f.known(3, 0).tolist() == []


def test_filtered_ranking_with_ties_and_reciprocal_queries(tmp_path):
    """Test queries (c, r2, ?a) and its reciprocal (a, r2^-1, ?c), with hand-set scores over a, b, c, d."""
    g = kg.load(write_graph(tmp_path / "hand"))
    src = kg.QuerySource(kg.reciprocal(g.test, g.num_relations), kg.Filter(g), batch_size=4)
    batch = src.get(0)
    np.testing.assert_array_equal(batch["filter"][:2, :2], [[1, -1], [3, -1]])  # other true tails: b; d
    assert batch["weights"].tolist() == [1, 1, 0, 0]
    scores = np.array([[2.0, 5.0, 2.0, 1.0],   # target a: b above but a known tail; c ties
                       [3.0, 0.5, 1.0, 4.0],   # target c: a above; d above but a known tail
                       [0, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    expected = {"mean": [1.5, 2.0], "pessimistic": [2.0, 2.0], "optimistic": [1.0, 2.0]}
    for ties, want in expected.items():
        ranks = filtered_rank(jnp.asarray(scores), jnp.asarray(batch["tail"]), jnp.asarray(batch["filter"]), ties)
        np.testing.assert_allclose(np.asarray(ranks)[:2], want)
    # a NaN true-tail score ranks last
    bad = scores.copy()
    bad[0, 0] = np.nan
    assert float(filtered_rank(jnp.asarray(bad), jnp.asarray(batch["tail"]), jnp.asarray(batch["filter"]))[0]) == 4


def test_train_source_epochs_cover_every_triple_once(tmp_path):
    triples = np.arange(30, dtype=np.int32).reshape(10, 3)
    src = kg.TrainSource(triples, batch_size=4, seed=3)
    assert src.num_batches == 3
    for epoch in range(2):
        batches = [src.get(epoch * 3 + i) for i in range(3)]
        w = np.concatenate([b["weights"] for b in batches])
        heads = np.concatenate([b["head"] for b in batches])[w > 0]
        assert sorted(heads.tolist()) == triples[:, 0].tolist()
        assert w.tolist() == [1] * 10 + [0] * 2
    assert src.get(0)["head"].tolist() != src.get(3)["head"].tolist()  # a new permutation per epoch
    again = kg.TrainSource(triples, 4, seed=3)
    np.testing.assert_array_equal(again.get(4)["tail"], src.get(4)["tail"])
    np.testing.assert_array_equal(src.get(4, slice(2, 4))["rel"], src.get(4)["rel"][2:4])


def test_missing_file_malformed_line_and_empty_split(tmp_path):
    d = tmp_path / "g"
    write_graph(d, {"train": HAND["train"], "valid": HAND["valid"]})
    with pytest.raises(FileNotFoundError, match=r"test\.txt: triple file not found"):
        kg.load(str(d))
    write_graph(d, {"test": "a\tr1\tb\n\nc\tr2\n"})
    with pytest.raises(kg.KGFormatError, match=r"test\.txt:3: expected head<TAB>relation<TAB>tail, got 'c\\tr2'"):
        kg.load(str(d))
    write_graph(d, {"test": "a\tr1\t\n"})
    with pytest.raises(kg.KGFormatError, match=r"test\.txt:1: expected"):
        kg.load(str(d))
    write_graph(d, {"test": "\n  \n"})
    with pytest.raises(kg.KGFormatError, match=r"test\.txt: split is empty"):
        kg.load(str(d))
    (d / "test.txt").write_bytes(b"a\tr1\tb\n\xff\tr1\tc\n")
    with pytest.raises(kg.KGFormatError, match=r"test\.txt:2: not UTF-8"):
        kg.load(str(d))
    with pytest.raises(FileNotFoundError, match="no such dataset under"):
        kg.load("nope", str(tmp_path))


def test_space_separated_lines_are_read(tmp_path):
    d = write_graph(tmp_path / "s", {"train": "a r1 b\nb r1 c\n", "valid": "a r1 c\n", "test": "b r1 a\n"})
    assert kg.load(d).train.tolist() == [[0, 0, 1], [1, 0, 2]]


def test_unseen_entities_keep_skip_error(tmp_path):
    files = dict(HAND, test="c\tr2\ta\ne\tr1\ta\nc\tr3\tb\n")  # e and r3 never occur in train
    d = write_graph(tmp_path / "u", files)
    keep = kg.load(d)
    assert keep.unseen == {"valid": 0, "test": 2} and len(keep.test) == 3 and "e" in keep.entities
    skip = kg.load(d, unseen="skip")
    assert skip.unseen == {"valid": 0, "test": 2} and len(skip.test) == 1 and "e" not in skip.entities
    with pytest.raises(kg.KGFormatError, match=r"test\.txt:2: 'e' does not occur in train\.txt"):
        kg.load(d, unseen="error")
    with pytest.raises(ValueError, match="unseen='maybe'"):
        kg.load(d, unseen="maybe")


def test_real_umls_counts():
    g = kg.load("umls", SHARED)
    assert (g.num_entities, g.num_relations, len(g.train), len(g.valid), len(g.test)) == (135, 92, 5216, 652, 661)
    assert kg.sha256_file(os.path.join(SHARED, "umls", "train.txt")) == kg.SHA256["umls"][0]


def test_fetch_verifies_checksum_and_writes_atomically(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3_000_000)
    good = kg.sha256_file(str(src))
    out = tmp_path / "dl" / "file.bin"
    kg.fetch(src.as_uri(), str(out), good)
    assert out.read_bytes() == src.read_bytes()
    out2 = tmp_path / "dl" / "other.bin"
    with pytest.raises(ValueError, match="does not match the expected"):
        kg.fetch(src.as_uri(), str(out2), "0" * 64)
    assert sorted(os.listdir(tmp_path / "dl")) == ["file.bin"]  # no partial or temp file left


def test_download_extracts_and_verifies_a_local_archive(tmp_path):
    graph = tmp_path / "pkg" / "hand"
    write_graph(graph)
    archive = tmp_path / "hand.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(graph, arcname="hand")
    sums = tuple(kg.sha256_file(str(graph / f"{s}.txt")) for s in kg.SPLITS)
    root = tmp_path / "data"
    with pytest.raises(ValueError, match=r"valid\.txt has sha256"):
        kg.download("hand", str(root), url=archive.as_uri(), checksums=(sums[0], "0" * 64, sums[2]))
    assert os.listdir(root) == []  # nothing half-written
    path = kg.download("hand", str(root), url=archive.as_uri(), checksums=sums)
    assert kg.load(path).entities == ["a", "b", "c", "d"]
    assert os.listdir(root) == ["hand"]
    assert kg.download("hand", str(root), url="file:///nonexistent") == path  # already there: no fetch
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        kg.download("nope", str(root))


def test_utf8_bom_at_the_start_of_a_file_is_dropped(tmp_path):
    files = {k: "\ufeff" + v for k, v in HAND.items()}
    for name in ("train", "valid", "test"):
        (tmp_path / "bom").mkdir(exist_ok=True)
        (tmp_path / "bom" / f"{name}.txt").write_text(files[name], encoding="utf-8")
    g = kg.load(str(tmp_path / "bom"))
    plain = kg.load(write_graph(tmp_path / "plain"))
    assert g.entities == plain.entities == ["a", "b", "c", "d"] and g.relations == ["r1", "r2"]
    for s in kg.SPLITS:
        np.testing.assert_array_equal(g.split(s), plain.split(s))


def test_duplicates_and_test_triples_in_train_are_counted_and_reported(tmp_path):
    files = {"train": HAND["train"] + "a\tr1\tb\na\tr1\tb\nb\tr2\tc\n",  # 3 repeats
             "valid": "a\tr1\td\na\tr1\td\n",                        # 1 repeat
             "test": "c\tr2\ta\nb\tr2\tc\nd\tr2\ta\nd\tr2\ta\n"}       # 3 also in train, 1 repeat
    d = write_graph(tmp_path / "dup", files)
    with pytest.warns(UserWarning, match=r"duplicate triples per split \{'train': 3, 'valid': 1, 'test': 1\}; "
                                         r"valid/test triples also in train \{'valid': 0, 'test': 3\}"):
        g = kg.load(d)
    assert g.duplicates == {"train": 3, "valid": 1, "test": 1} and g.in_train == {"valid": 0, "test": 3}
    assert (len(g.train), len(g.valid), len(g.test)) == (8, 2, 4)  # kept as given
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean graph gives no warning
        clean = kg.load(write_graph(tmp_path / "hand"))
    assert clean.duplicates == {"train": 0, "valid": 0, "test": 0} and clean.in_train == {"valid": 0, "test": 0}


def test_overlap_counts_match_a_set_reference():
    rng = np.random.default_rng(0)
    for _ in range(50):
        arrays = {s: rng.integers(0, 4, (int(rng.integers(1, 40)), 3)).astype(np.int32) for s in kg.SPLITS}
        dup, in_train = kg.overlap_counts(arrays)
        train = {tuple(r) for r in arrays["train"].tolist()}
        assert dup == {s: len(a) - len({tuple(r) for r in a.tolist()}) for s, a in arrays.items()}
        assert in_train == {s: sum(tuple(r) in train for r in arrays[s].tolist()) for s in ("valid", "test")}


def test_shipped_graphs_have_no_duplicates_or_leaks():
    g = kg.load("umls", SHARED)
    assert g.duplicates == {"train": 0, "valid": 0, "test": 0} and g.in_train == {"valid": 0, "test": 0}
