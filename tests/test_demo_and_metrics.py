import json

from tunesmith.data.demo import FIELDS, PRODUCTS, make_splits
from tunesmith.eval.metrics import json_field_scores, parse_json_object


def test_demo_data_is_seeded_and_splits_are_disjoint():
    a, b = make_splits(300, seed=7), make_splits(300, seed=7)
    assert a == b
    assert make_splits(300, seed=8)["train"] != a["train"]
    tickets = {name: {r["messages"][1]["content"] for r in rows} for name, rows in a.items()}
    assert len(tickets["train"]) == 300 and len(tickets["test"]) == 200
    assert not tickets["train"] & tickets["test"] and not tickets["validation"] & tickets["test"]


def test_demo_answer_is_in_the_text_and_varied():
    rows = make_splits(400, seed=1)["train"]
    labels = [json.loads(r["messages"][2]["content"]) for r in rows]
    for row, label in zip(rows, labels):
        assert set(label) == set(FIELDS)
        assert label["product"] in row["messages"][1]["content"]
    for field in FIELDS:
        assert len({str(l[field]) for l in labels}) > 1, field
    assert len({l["product"] for l in labels}) == len(PRODUCTS)
    # Same category and priority, many different texts: the label has to be read, not memorised.
    same = [r["messages"][1]["content"] for r, l in zip(rows, labels) if (l["category"], l["priority"]) == ("billing", "high")]
    assert len(set(same)) == len(same) > 5


def test_json_field_scores_by_hand():
    ref = json.dumps({"category": "billing", "priority": "low", "product": "PixelPad", "needs_human": False})
    predictions = [
        ref,  # all right
        'Sure! ```json\n{"category": "billing", "priority": "high", "product": "PixelPad", "needs_human": false}\n```',
        "not json at all",
        '{"category": "billing", "priority": "low", "product": "PixelPad", "needs_human": false',  # cut off
    ]
    scores = json_field_scores(predictions, [ref] * 4)
    assert scores["json_valid"] == 0.5
    assert scores["all_fields"] == 0.25
    assert scores["field/priority"] == 0.25 and scores["field/category"] == 0.5


def test_parse_json_object_skips_prose_and_braces():
    assert parse_json_object('a {broken} then {"x": 1}') == {"x": 1}
    assert parse_json_object("[1, 2]") is None
