"""Near-duplicates (MinHash/LSH): counted with first locations within train and between train and
eval splits, removed from train with data.dedup: near."""
import pytest

from tunesmith.config import DataConfig
from tunesmith.data.check import check_data, format_report
from tunesmith.data.near_dup import find, shingles
from tunesmith.data.prepare import prepare

from helpers import write_jsonl

LONG = ("Glaucoma is a group of eye diseases that damage the optic nerve, which carries images from the eye "
        "to the brain; it often comes with high pressure inside the eye and can lead to blindness if untreated.")


def qa(question: str, answer: str) -> dict:
    return {"question": question, "answer": answer}


def train_rows() -> list[dict]:
    return [
        qa("What is glaucoma?", LONG),                                                  # line 1
        qa("How is asthma treated?", "Inhalers with steroids reduce the swelling of the airways over weeks."),
        qa("What is glaucoma ?", LONG.replace("often comes", "usually comes")),         # 3: near 1
        qa("What causes gout?", "Uric acid crystals that build up in a joint cause the sudden pain of gout attacks."),
        qa("Who gets shingles?", "Anyone who had chickenpox can get shingles later, most often after the age of fifty."),
        qa("What is glaucoma", LONG.replace("blindness", "vision loss")),               # 6: near 1
        qa("Totally different", "Bananas are yellow and grow in bunches on large tropical plants in warm places."),
    ]


def test_shingles_are_word_trigrams_of_normalised_text():
    assert shingles("The cat, the HAT") == {b"the cat the", b"cat the hat"}
    assert shingles("Hi there") == {b"hi there"} and shingles("...") == set()


def test_near_duplicates_counted_within_train_and_across(tmp_path):
    test = [{"messages": [{"role": "user", "content": "Who gets shingles?"},
                          {"role": "assistant", "content": "Anyone who had chickenpox can get shingles later, most "
                                                           "often after the age of 50."}]},
            {"messages": [{"role": "user", "content": "What is a cold?"},
                          {"role": "assistant", "content": "A viral infection of the nose and throat."}]}]
    train = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
             for r in train_rows()]
    inside, leaks = find(train, {"test": [t["messages"] for t in test]}, threshold=0.7)
    assert [(m.index, m.first) for m in inside] == [(2, 0), (5, 0)]
    assert [(m.index, m.first) for m in leaks["test"]] == [(0, 4)]
    assert all(0.7 <= m.similarity < 1 for m in inside + leaks["test"])
    # Stricter: one changed word in a short answer is too much difference.
    assert find(train, {"test": [t["messages"] for t in test]}, threshold=0.95)[1]["test"] == []


def test_a_removed_near_duplicate_is_not_the_first_of_another():
    """A chain: B is close to A, C close to B but not to A. B goes as A's near-duplicate; C stays, since
    the only example it resembles is gone (an example is matched against kept ones only). Each text:
    "Repeat the words" and 60 words, shifted by 4 from one to the next: 61 word 3-grams each, 55 of
    67 shared for a shift of 4 (Jaccard 0.82), 51 of 71 for 8 (0.72); MinHash estimates 0.81 (A, B),
    0.85 (B, C) and 0.70 (A, C) against the threshold 0.75."""
    def words(start):
        return [{"role": "user", "content": "Repeat the words"},
                {"role": "assistant", "content": " ".join(f"w{i}" for i in range(start, start + 60))}]

    chain = [words(0), words(4), words(8)]
    inside, _ = find(chain, {}, threshold=0.75)
    assert [(m.index, m.first) for m in inside] == [(1, 0)]


def test_data_check_reports_and_dedup_near_removes(tmp_path, tiny_model_dir):
    train = write_jsonl(tmp_path / "train.jsonl", train_rows())
    test = write_jsonl(tmp_path / "test.jsonl", [qa("Who gets shingles?", "Anyone who had chickenpox can get "
                                                 "shingles later, most often after the age of 50."),
                                                 qa("What is a cold?", "A viral infection of the nose and throat.")])
    settings = {"test": str(test), "validation": str(test), "near_dup_threshold": 0.7, "cache": False}
    report = check_data(str(train), str(tiny_model_dir), tmp_path / "check", settings)
    near = report["near_duplicates"]
    assert near["within_train"] == {"count": 2, "first": [f"{train}:3 ~ {train}:1", f"{train}:6 ~ {train}:1"]}
    assert near["test_in_train"] == {"count": 1, "first": [f"{test}:1 ~ {train}:5"]}
    text = format_report(report)
    assert "within train: 2" in text and "test examples close to train: 1" in text

    cfg = DataConfig(train=str(train), dedup="near", **settings)
    prepared = prepare(cfg, str(tiny_model_dir))
    assert len(prepared.splits["train"]) == 7 - 3
    assert [(p.line, p.kind) for p in prepared.problems] == [
        (3, "duplicate (near)"), (5, "duplicate (near), of validation"), (6, "duplicate (near)")]
    assert f"of {train}:1" in prepared.problems[0].reason
    after = check_data(str(train), str(tiny_model_dir), tmp_path / "check2", {**settings, "dedup": "near"})
    assert after["near_duplicates"]["within_train"]["count"] == 0
    assert after["duplicates"]["duplicate (near)"]["count"] == 2


@pytest.mark.parametrize("value", [True, False, "near"])
def test_dedup_setting_values(value):
    assert DataConfig(train="x.jsonl", dedup=value).dedup == value


def test_a_check_from_the_cache_reads_the_near_duplicates_found_before(tmp_path, tiny_model_dir, monkeypatch):
    import tunesmith.data.near_dup as near_dup

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    train = write_jsonl(tmp_path / "train.jsonl", train_rows())
    settings = {"near_dup_threshold": 0.7}
    first = check_data(str(train), str(tiny_model_dir), tmp_path / "check", settings)
    assert first["near_duplicates"]["within_train"]["count"] == 2

    def no_search(*args, **kwargs):
        raise AssertionError("searched again")

    monkeypatch.setattr(near_dup, "find", no_search)
    again = check_data(str(train), str(tiny_model_dir), tmp_path / "check2", settings)
    assert again["cached"] and again["near_duplicates"] == first["near_duplicates"]
    with pytest.raises(AssertionError, match="searched again"):  # another threshold is another search
        check_data(str(train), str(tiny_model_dir), tmp_path / "check3", {"near_dup_threshold": 0.9})
    write_jsonl(train, train_rows()[:5])  # other data: another cache entry, searched afresh
    with pytest.raises(AssertionError, match="searched again"):
        check_data(str(train), str(tiny_model_dir), tmp_path / "check4", settings)


def test_results_beside_a_cache_entry_are_whole_or_absent(tmp_path, monkeypatch):
    """A derived file is written aside and renamed: a failed write leaves neither it nor a temporary."""
    import shutil

    from tunesmith.data import cache

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    entry = cache.cache_root() / "k"
    entry.mkdir(parents=True)
    source = tmp_path / "lengths.png"
    source.write_bytes(b"png" * 1000)
    cache.add_file("k", "lengths.png", source)
    cache.add_text("k", "near.json", "[1, 2]")
    assert (entry / "lengths.png").read_bytes() == source.read_bytes() and (entry / "near.json").read_text() == "[1, 2]"

    def half_then_full_disk(src, dst):
        open(dst, "wb").write(b"pn")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", half_then_full_disk)
    cache.add_file("k", "other.png", source)
    assert sorted(p.name for p in entry.iterdir()) == ["lengths.png", "near.json"]
    cache.add_file("missing-entry", "x.png", source)  # no entry: nothing written, no error
    assert not (cache.cache_root() / "missing-entry").exists()


def test_dedup_near_removes_every_training_example_close_to_an_eval_one(tmp_path, tiny_tokenizer):
    """Two training examples near each other and both near a validation example: the validation
    example's closest is the second, which goes as a near-duplicate of the first; the first goes too."""
    train = write_jsonl(tmp_path / "train.jsonl", [qa("What is glaucoma?", LONG.replace("often comes", "usually comes")),
                                                   qa("What is glaucoma?", LONG), *train_rows()[1:2]])
    val = write_jsonl(tmp_path / "val.jsonl", [qa("What is glaucoma?", LONG.replace("comes with", "goes with"))])
    prepared = prepare(DataConfig(train=str(train), validation=str(val), dedup="near", near_dup_threshold=0.6,
                                  cache=False), tiny_tokenizer)
    assert [o[1] for o in prepared.splits["train"].origins] == [3]
    assert sorted(p.line for p in prepared.problems) == [1, 2]


def test_mixed_repeats_and_one_conversations_examples_are_not_near_duplicates(tmp_path, tiny_model_dir):
    """data.mix's weight 2 copies a record; they are not reported as near-duplicates of themselves
    (nor named as rows of a raw-text document)."""
    train = write_jsonl(tmp_path / "train.jsonl", train_rows()[1:2])
    extra = write_jsonl(tmp_path / "extra.jsonl", train_rows()[3:5])
    report = check_data(str(train), str(tiny_model_dir), tmp_path / "check", {"mix": {str(extra): 2.0}})
    assert report["near_duplicates"]["within_train"] == {"count": 0, "first": []}
