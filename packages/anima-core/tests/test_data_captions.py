"""Caption parsing and each per-epoch caption rule, one test per rule."""

import json
import random

import pytest
from pydantic import ValidationError

from anima_core.data.captions import (
    Caption,
    CaptionError,
    CaptionRules,
    parse_json_caption,
    parse_text_caption,
    read_caption_file,
    render_caption,
)
from anima_core.data.config import DatasetSection

TAGS = parse_text_caption("1girl, solo, red hair, smile, outdoors, blue sky, tree, hat")


def renders(caption: Caption, rules: CaptionRules, n: int = 200) -> list[str]:
    return [render_caption(caption, rules, random.Random(i)) for i in range(n)]


def test_text_caption_splits_on_commas_only_and_strips():
    assert parse_text_caption(" a,b , ,c,\n").tags == ("a", "b", "c")
    assert parse_text_caption("a girl standing in the rain").tags == ("a girl standing in the rain",)
    assert parse_text_caption("tag one, tag two\nsecond line").tags == ("tag one", "tag two", "second line")


def test_no_rules_keeps_the_caption_as_written():
    assert render_caption(TAGS, CaptionRules()) == "1girl, solo, red hair, smile, outdoors, blue sky, tree, hat"


def test_shuffle_keeps_the_first_keep_tokens_in_place_and_permutes_the_rest():
    out = renders(TAGS, CaptionRules(shuffle=True, keep_tokens=2))
    assert all(o.startswith("1girl, solo, ") for o in out)
    assert all(sorted(o.split(", ")) == sorted(TAGS.tags) for o in out)
    assert len({o.split(", ")[2] for o in out}) == 6  # every other tag gets to come third


def test_shuffle_without_keep_tokens_moves_the_first_tag_too():
    out = renders(TAGS, CaptionRules(shuffle=True))
    assert len({o.split(", ")[0] for o in out}) == 8


def test_keep_tokens_alone_changes_nothing():
    assert render_caption(TAGS, CaptionRules(keep_tokens=3)) == render_caption(TAGS, CaptionRules())


def test_tag_dropout_drops_each_unkept_tag_independently_and_never_a_kept_one():
    out = renders(TAGS, CaptionRules(tag_dropout=0.5, keep_tokens=1), n=400)
    assert all(o.startswith("1girl") for o in out)
    kept = [len(o.split(", ")) - 1 for o in out]
    assert 3.0 < sum(kept) / len(kept) < 4.0  # 7 droppable tags at p=0.5
    assert 0 in kept  # no guarantee of keeping any (kohya semantics)
    assert all(o.split(", ")[1:] == [t for t in TAGS.tags[1:] if t in o.split(", ")] for o in out)  # order kept


def test_caption_dropout_empties_the_whole_caption_including_the_trigger():
    out = renders(TAGS, CaptionRules(caption_dropout=0.3, trigger="sks"), n=1000)
    empty = out.count("")
    assert 230 < empty < 370
    assert all(o.startswith("sks, 1girl") for o in out if o)


def test_trigger_comes_first_is_never_shuffled_and_not_duplicated():
    caption = parse_text_caption("solo, SKS, smile")
    out = renders(caption, CaptionRules(trigger="sks", shuffle=True, tag_dropout=0.4))
    assert all(o.split(", ")[0] == "sks" for o in out)
    assert all(o.lower().count("sks") == 1 for o in out)


def test_regularisation_rules_drop_the_trigger_and_tag_dropout_but_keep_the_rest():
    section = DatasetSection(trigger="sks", shuffle_caption=True, keep_tokens=1, tag_dropout=0.5,
                             caption_dropout=0.1)
    reg = CaptionRules.for_section(section, reg=True)
    assert (reg.trigger, reg.tag_dropout, reg.shuffle, reg.keep_tokens, reg.caption_dropout) == (None, 0.0, True, 1,
                                                                                                  0.1)
    assert CaptionRules.for_section(section).trigger == "sks"


def test_same_rng_state_gives_the_same_caption():
    rules = CaptionRules(shuffle=True, tag_dropout=0.2, caption_dropout=0.1, keep_tokens=1)
    assert renders(TAGS, rules) == renders(TAGS, rules)
    assert len(set(renders(TAGS, rules))) > 50


def test_random_rules_without_an_rng_are_refused():
    with pytest.raises(ValueError):
        render_caption(TAGS, CaptionRules(shuffle=True))


STANDARD = {
    "meta": {"trigger": "sks"},
    "tags": {"quality": ["masterpiece", "best quality"], "count": "1girl", "character": "hatsune miku",
             "series": "vocaloid", "artist": "someone", "appearance": ["twintails", "aqua hair", "aqua eyes"],
             "tags": ["smile", "singing", "microphone"], "environment": ["stage", "night"],
             "nl": "A girl sings on a stage."},
}
FIXED = ["sks", "masterpiece", "best quality", "1girl", "hatsune miku", "vocaloid", "someone"]


def test_json_standard_shape_renders_fixed_categories_then_groups_then_nl():
    caption = parse_json_caption(json.dumps(STANDARD))
    assert render_caption(caption, CaptionRules()) == (
        "sks, masterpiece, best quality, 1girl, hatsune miku, vocaloid, someone, twintails, aqua hair, aqua eyes, "
        "smile, singing, microphone, stage, night. A girl sings on a stage.")


def test_json_shuffles_within_each_category_and_keeps_category_order():
    caption = parse_json_caption(json.dumps(STANDARD))
    groups = [set(g) for g in (STANDARD["tags"]["appearance"], STANDARD["tags"]["tags"],
                               STANDARD["tags"]["environment"])]
    orders = set()
    for out in renders(caption, CaptionRules(shuffle=True)):
        tags = out.split(". ")[0].split(", ")
        assert tags[:7] == FIXED  # fixed categories never move
        assert [set(tags[7:10]), set(tags[10:13]), set(tags[13:15])] == groups
        orders.add(tuple(tags[7:]))
    assert len(orders) > 20


def test_json_tag_dropout_spares_fixed_categories_and_the_natural_language_part():
    caption = parse_json_caption(json.dumps(STANDARD))
    out = renders(caption, CaptionRules(tag_dropout=0.9))
    assert all(o.split(". ")[0].split(", ")[:7] == FIXED and o.endswith("A girl sings on a stage.") for o in out)
    assert min(len(o.split(", ")) for o in out) == 7


def test_json_flat_shape_with_a_tag_list_and_meta_is_not_an_empty_caption():
    # the reference treated {"tags": [...], "meta": {...}} as the standard shape and trained on "" (#345)
    caption = parse_json_caption(json.dumps({"meta": {"trigger": "sks"}, "tags": ["smile", "hat"],
                                             "character": ["miku"]}))
    assert render_caption(caption, CaptionRules()) == "sks, miku, smile, hat"


def test_json_legacy_tag_list_and_comma_strings():
    assert render_caption(parse_json_caption('{"tags": ["a", "b, c"]}'), CaptionRules()) == "a, b, c"


def test_json_duplicates_are_removed_case_insensitively():
    caption = parse_json_caption('{"count": "1girl", "tags": ["1GIRL", "smile"]}')
    assert render_caption(caption, CaptionRules(trigger="Smile")) == "Smile, 1girl"


@pytest.mark.parametrize("text,match", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                        ('{"foo": "bar"}', "no caption fields"),
                                        ('{"tags": {"appearance": [1, 2]}}', "must be a string or a list"),
                                        ('{"meta": "x", "tags": ["a"]}', "'meta' must be an object")])
def test_malformed_json_captions_raise_with_the_reason(text, match):
    with pytest.raises(CaptionError, match=match):
        parse_json_caption(text)


def test_caption_files_decode_utf8_with_bom_and_flag_other_encodings(tmp_path):
    good = tmp_path / "a.txt"
    good.write_bytes("\ufeffcafé, smile".encode())
    loaded = read_caption_file(good)
    assert loaded.caption.tags == ("café", "smile") and not loaded.non_utf8
    bad = tmp_path / "b.txt"
    bad.write_bytes("café, smile".encode("latin-1"))
    loaded = read_caption_file(bad)
    assert loaded.non_utf8 and loaded.caption.tags == ("caf\ufffd", "smile")


def test_config_refuses_the_text_encoder_cache_with_random_captions():
    DatasetSection(cache_text_encoder=True, keep_tokens=2, flip_aug=True, trigger="sks")  # deterministic: fine
    for bad in ({"shuffle_caption": True}, {"tag_dropout": 0.1}, {"caption_dropout": 0.05}):
        with pytest.raises(ValidationError) as err:
            DatasetSection(cache_text_encoder=True, **bad)
        message = str(err.value)
        assert "cache_text_encoder" in message and next(iter(bad)) in message


def test_config_rejects_a_trigger_with_commas_and_bad_caption_extensions():
    with pytest.raises(ValidationError, match="one tag"):
        DatasetSection(trigger="a, b")
    with pytest.raises(ValidationError, match="look like"):
        DatasetSection(caption_extensions=["txt"])
    with pytest.raises(ValidationError, match="twice"):
        DatasetSection(resolution=[512, 512])
