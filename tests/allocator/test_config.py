"""Operator config validation: every error names the key, what is allowed and what was found."""

from __future__ import annotations

import copy
import math
import re
import tomllib

import numpy as np
import pytest

from allocator import ConfigError, default_item_weights, load_config, parse_config, parse_config_text
from policy_api.jobs._configio import config_to_toml

# The example, verbatim, plus the modules it elides.
EXAMPLE = """
[homepage]
slots = 6
position_weights = [1.0, 0.8, 0.65, 0.5, 0.4, 0.3]
items_per_module = 10
[[categories]]
name = "songs"
value_per_engagement = 1.0        # money per unit of engagement
[[categories]]
name = "videos"
value_per_engagement = 1.4
[[categories]]
name = "audio"
value_per_engagement = 1.2
[[categories]]
name = "live"
value_per_engagement = 2.0
[[modules]]
id = "daily_30"
category = "songs"
[[modules]]
id = "new_releases"
category = "songs"
[[modules]]
id = "mv_picks"
category = "videos"
[[modules]]
id = "podcasts"
category = "audio"
[[modules]]
id = "live_now"
category = "live"
[[modules]]
id = "live_following"
category = "live"
[events]                           # engagement units per event type
play = 1.0
full_play = 2.0
favorite = 4.0
share = 5.0
skip = -0.5
[tilt]
levels = [0.0, 0.1, 0.25, 0.5]
head_share = 0.8
[[constraints]]
name = "live_floor"
kind = "category_share"            # slot-weighted share of exposure
category = "live"
min = 0.10                         # `max` also allowed
[[constraints]]
name = "long_tail"
kind = "long_tail_share"           # share of shown items that are long tail
min = 0.25
[exploration]
budget = 0.05                      # at most this share of traffic off the greedy layout
"""


def raw() -> dict:
    return tomllib.loads(EXAMPLE)


def test_example_parses_with_the_documented_meaning():
    cfg = parse_config_text(EXAMPLE)
    assert cfg.slots == 6 and cfg.items_per_module == 10
    assert cfg.position_weights == (1.0, 0.8, 0.65, 0.5, 0.4, 0.3)
    assert cfg.category_names == ("songs", "videos", "audio", "live")
    np.testing.assert_array_equal(cfg.category_values(), [1.0, 1.4, 1.2, 2.0])
    assert cfg.modules_of() == [[0, 1], [2], [3], [4, 5]]
    lo, hi = cfg.bounds()
    np.testing.assert_array_equal(lo, [0.10, 0.25])
    assert np.isinf(hi).all()
    np.testing.assert_array_equal(cfg.event_weight_vector(), [1.0, 2.0, 4.0, 5.0, -0.5])
    assert cfg.exploration.budget == 0.05 and cfg.warnings == ()


def test_item_position_weights_default_to_the_dcg_discount_and_round_trip():
    cfg = parse_config_text(EXAMPLE)
    assert cfg.item_position_weights == ()
    np.testing.assert_allclose(cfg.item_weights(), [1 / math.log2(j + 2) for j in range(10)])
    np.testing.assert_allclose(default_item_weights(3), [1.0, 1 / math.log2(3), 0.5])
    curve = [0.85 ** j for j in range(10)]
    d = raw()
    d["homepage"]["item_position_weights"] = curve
    own = parse_config(d)
    np.testing.assert_allclose(own.item_weights(), curve)
    assert parse_config_text(config_to_toml(own)) == own  # written back and read again: the same config


def test_impressions_are_viewed_by_default_or_rendered_and_weigh_accordingly():
    """A viewed impression is one examined impression whatever its slot; a rendered one counts as its slot's
    position weight over the mean weight (its expected examination, on the scale of a viewed one)."""
    cfg = parse_config_text(EXAMPLE)
    assert cfg.impressions == "viewed"
    np.testing.assert_array_equal(cfg.impression_weights(), np.ones(6))
    d = raw()
    d["homepage"]["impressions"] = "rendered"
    own = parse_config(d)
    w = [1.0, 0.8, 0.65, 0.5, 0.4, 0.3]
    np.testing.assert_allclose(own.impression_weights(), [x * 6 / sum(w) for x in w])
    assert parse_config_text(config_to_toml(own)) == own and own != cfg
    assert _errors(lambda d: d["homepage"].update(impressions="seen")) == [
        ("homepage.impressions", "must be one of 'viewed', 'rendered'; got 'seen'")]


def test_load_config_from_file(tmp_path):
    p = tmp_path / "homepage.toml"
    p.write_text(EXAMPLE)
    assert load_config(p).constraint_names == ("live_floor", "long_tail")
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def _errors(mutate) -> list[tuple[str, str]]:
    d = raw()
    mutate(d)
    with pytest.raises(ConfigError) as ei:
        parse_config(d)
    return ei.value.errors


@pytest.mark.parametrize(
    ("mutate", "key", "message"),
    [
        (lambda d: d["homepage"].pop("slots"), "homepage.slots", r"is required \(an integer\); got nothing"),
        (lambda d: d["homepage"].update(slots=0), "homepage.slots", r"must be an integer in \[1, 100\]; got 0"),
        (lambda d: d["homepage"].update(slots="6"), "homepage.slots", r"got '6'"),
        (lambda d: d["homepage"].update(position_weights=[1.0, 0.5]), "homepage.position_weights",
         r"must have one weight per slot \(6\); got 2 weights"),
        (lambda d: d["homepage"].update(position_weights=[1, 1, 1, 1, 1, -1]), "homepage.position_weights",
         r"must be a list of positive numbers; got \[1, 1, 1, 1, 1, -1\]"),
        (lambda d: d["homepage"].update(item_position_weights=[1.0, 0.5]), "homepage.item_position_weights",
         r"must have one weight per position in a module \(10\); got 2 weights"),
        (lambda d: d["homepage"].update(item_position_weights=[1] * 9 + [0]), "homepage.item_position_weights",
         r"must be a list of positive numbers, one per position in a module; got \[1, 1, .*, 0\]"),
        (lambda d: d["categories"][0].update(value_per_engagement=-1), "categories[0].value_per_engagement",
         r"must be in \[0, inf\]; got -1"),
        (lambda d: d["categories"][1].update(name="songs"), "categories[1].name", r"must be unique; 'songs'"),
        (lambda d: d["modules"][0].update(category="podcast"), "modules[0].category",
         r"must be one of 'songs', 'videos', 'audio', 'live'; got 'podcast'"),
        (lambda d: d["modules"][1].update(id="daily_30"), "modules[1].id", r"must be unique"),
        (lambda d: d["events"].pop("skip"), "events.skip", r"is required \(a number\)"),
        (lambda d: d["tilt"].update(levels=[]), "tilt.levels", r"must be a list of 1 to 16 numbers in \[0, 1\] \(the share of each module's items taken from the long "
         r"tail\); got \[\]"),
        (lambda d: d["tilt"].update(levels=[0, 2]), "tilt.levels", r"numbers in \[0, 1\] .*; got \[0, 2\]"),
        (lambda d: d["tilt"].update(head_share=1.5), "tilt.head_share", r"must be in \(0, 1\]; got 1.5"),
        (lambda d: d["constraints"][0].update(kind="share"), "constraints[0].kind",
         r"must be one of 'category_share', 'long_tail_share', 'module_share'; got 'share'"),
        (lambda d: d["constraints"][0].update(min=1.2), "constraints[0].min", r"must be in \[0, 1\]; got 1.2"),
        (lambda d: d["constraints"][0].update(max=0.05), "constraints[0].max", r"must be >= min \(0.1\); got 0.05"),
        (lambda d: d["constraints"][1].pop("min"), "constraints[1]", r"needs `min`, `max` or both"),
        (lambda d: d["constraints"][0].update(category="radio"), "constraints[0].category",
         r"must be one of .*; got 'radio'"),
        (lambda d: d["exploration"].update(budget=2), "exploration.budget", r"must be in \[0, 1\]; got 2"),
        (lambda d: d["exploration"].update(algorithm="thompson"), "exploration.algorithm",
         r"must be one of 'epsilon', 'squarecb', 'bag', 'cover'; got 'thompson'"),
        (lambda d: d.update(modules=d["modules"][:3]), "modules", r"at least as many modules as slots \(6\); got 3"),
        (lambda d: d.pop("categories"), "categories", r"is required"),
    ],
)
def test_each_error_names_key_allowed_and_found(mutate, key, message):
    errors = _errors(mutate)
    matching = [m for k, m in errors if k == key]
    assert matching, f"no error for {key}; got {errors}"
    assert any(re.search(message, m) for m in matching), matching


def test_all_errors_reported_at_once():
    def two(d):
        d["homepage"]["slots"] = -1
        d["exploration"]["budget"] = 7

    keys = [k for k, _ in _errors(two)]
    assert "homepage.slots" in keys and "exploration.budget" in keys


def test_error_message_lists_key_and_value():
    d = raw()
    d["constraints"][0]["min"] = "ten percent"
    with pytest.raises(ConfigError, match=r"constraints\[0\]\.min: must be a finite number; got 'ten percent'"):
        parse_config(d)


def test_invalid_toml_is_a_config_error():
    with pytest.raises(ConfigError, match=r"<toml>: is not valid TOML"):
        parse_config_text("[homepage\nslots = 6")


def test_unknown_keys_are_errors_naming_the_known_ones_all_at_once():
    """A misspelt optional key used to be a warning: the setting silently kept its default."""
    d = raw()
    d["homepage"]["slot"] = 6
    d["exploration"]["budjet"] = 0.2
    d["exploraton"] = {"budget": 0.2}
    d["learning"] = {"max_event_valu": 10.0}
    d["constraints"][0]["minn"] = 0.1
    with pytest.raises(ConfigError) as e:
        parse_config(d)
    assert sorted(k for k, _ in e.value.errors) == ["constraints[0].minn", "exploration.budjet", "exploraton",
                                                    "homepage.slot", "learning.max_event_valu"]
    msg = dict(e.value.errors)
    assert msg["exploration.budjet"].startswith("is not a known key; did you mean 'budget'?")
    assert msg["exploraton"].startswith("is not a known key; did you mean 'exploration'?")
    assert "slots" in msg["homepage.slot"] and "max_event_value" in msg["learning.max_event_valu"]


def test_feedback_limits_are_configurable_and_checked():
    d = raw()
    cfg = parse_config(d)
    assert (cfg.learning.max_event_value, cfg.learning.max_event_age_s, cfg.learning.max_clock_skew_s) == (
        1e6, 7 * 86400.0, 300.0)
    d["learning"] = {"max_event_value": 50.0, "max_event_age_s": 3600, "max_clock_skew_s": 0}
    got = parse_config(d).learning
    assert (got.max_event_value, got.max_event_age_s, got.max_clock_skew_s) == (50.0, 3600.0, 0.0)
    assert got.reward_window_s == 3600.0  # the others keep their defaults
    d["learning"] = {"max_event_value": 0, "max_event_age_s": -1.0, "max_clock_skew_s": float("inf")}
    with pytest.raises(ConfigError) as e:
        parse_config(d)
    assert sorted(k for k, _ in e.value.errors) == ["learning.max_clock_skew_s", "learning.max_event_age_s",
                                                    "learning.max_event_value"]


def test_live_state_half_lives_are_configurable_and_checked():
    d = raw()
    loop = parse_config(d).loop
    assert (loop.state_half_life_s, loop.state_half_life_impressions) == (3600.0, 300.0)
    d["loop"] = {"state_half_life_impressions": 120}
    assert parse_config(d).loop.state_half_life_impressions == 120.0
    d["loop"] = {"state_half_life_impressions": 0}
    with pytest.raises(ConfigError) as e:
        parse_config(d)
    assert dict(e.value.errors)["loop.state_half_life_impressions"] == "must be in (0, inf]; got 0"


def test_input_not_mutated():
    d = raw()
    before = copy.deepcopy(d)
    parse_config(d)
    assert d == before


def test_module_share_constraint():
    d = raw()
    d["constraints"].append({"name": "cap_live_now", "kind": "module_share", "module": "live_now", "max": 0.3})
    cfg = parse_config(d)
    assert cfg.constraints[-1].module == "live_now" and cfg.bounds()[1][-1] == 0.3
    d["constraints"][-1]["module"] = "nope"
    with pytest.raises(ConfigError, match=r"constraints\[2\]\.module: must be one of"):
        parse_config(d)
