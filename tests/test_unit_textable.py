"""The CLI's table printer."""
from runtime import textable


def test_columns_aligned_left_or_right_with_a_rule_and_no_trailing_blanks():
    assert textable.lines(["name", "n", "note"], [["a", 10, ""], ["bbb", 2, "x"]], left=(0, -1)) == [
        "name   n  note",
        "----  --  ----",
        "a     10",
        "bbb    2  x"]


def test_without_a_rule_and_all_left():
    assert textable.render(["k", "v"], [["key", "1"]], rule=False) == "k    v\nkey  1"
