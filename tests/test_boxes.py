"""Grounding spans: parse_boxes finds every box in the styles the models emit, to_pixels maps them back."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_image
from PIL import Image

from glm4v_mtmd import Box, draw_boxes, parse_boxes


def span(body: str) -> str:
    return f"<|begin_of_box|>{body}<|end_of_box|>"


@pytest.mark.parametrize(
    "body, expected",
    [
        ("[94,598,177,991]", [(94, 598, 177, 991)]),
        ("[[94,598,177,991]]", [(94, 598, 177, 991)]),
        ("[[ 94, 598, 177, 991 ]]", [(94, 598, 177, 991)]),
        ("[[1,2,3,4],[5,6,7,8]]", [(1, 2, 3, 4), (5, 6, 7, 8)]),
        ("[[1,2,3,4], [5,6,7,8]]", [(1, 2, 3, 4), (5, 6, 7, 8)]),
        ("[1,2,3,4],[5,6,7,8]", [(1, 2, 3, 4), (5, 6, 7, 8)]),
        ("\n[[10.5, 20, 30.25, 40]]\n", [(10.5, 20, 30.25, 40)]),
    ],
    ids=["flat", "double", "spaces", "two-boxes", "two-boxes-spaced", "two-flat-boxes", "decimals-newlines"],
)
def test_box_styles(body, expected):
    boxes = parse_boxes(f"The object is at {span(body)}.")
    assert [(b.x1, b.y1, b.x2, b.y2) for b in boxes] == expected
    assert not any(b.point for b in boxes)


@pytest.mark.parametrize("body", ["[500,250]", "[[500,250]]", "[[500, 250]]"])
def test_point_styles(body):
    assert parse_boxes(span(body)) == [Box(500, 250, 500, 250, point=True, span=0)]


def test_several_spans_are_numbered_in_order():
    text = f"cat {span('[[1,2,3,4]]')} dog {span('true')} bird {span('[[5,6]]')} {span('[[7,8,9,10],[11,12,13,14]]')}"
    boxes = parse_boxes(text)
    assert [(b.span, b.point) for b in boxes] == [(0, False), (2, True), (3, False), (3, False)]


@pytest.mark.parametrize(
    "text",
    [
        span("true"),
        span('{"x": 100, "y": 200}'),
        span("[[1,2,3]]"),
        span("[[1,2,3,4]"),
        span("[1,2,3,4]]"),
        span("[[[1,2,3,4]]]"),
        span("[[1,2,3,4,5,6]]"),
        span("[[a,b,c,d]]"),
        span("box: [1,2,3,4]"),
        span(""),
        "<|begin_of_box|>[[1,2,3,4]]",
        "[[1,2,3,4]]<|end_of_box|>",
        "[[1,2,3,4]] without any span",
    ],
    ids=["boxed-answer", "json", "three-numbers", "unclosed-outer", "extra-close", "triple-nesting", "six-numbers",
         "letters", "prefix-text", "empty", "no-end-marker", "no-begin-marker", "no-span"],
)
def test_malformed_spans_are_ignored(text):
    assert parse_boxes(text) == []


def test_malformed_span_does_not_hide_the_next_one():
    assert len(parse_boxes(span("[[1,2,3]]") + span("[[1,2,3,4]]"))) == 1


def test_full_range_maps_to_the_whole_image():
    assert Box(0, 0, 1000, 1000).to_pixels(640, 480) == (0, 0, 640, 480)


def test_to_pixels_rounds_halves_up():
    # 500/1000 of 101 px is 50.5 -> 51; 250/1000 of 10 px is 2.5 -> 3.
    assert Box(500, 250, 500, 250).to_pixels(101, 10) == (51, 3, 51, 3)


def test_to_pixels_clamps_boxes_to_the_image_edges():
    assert Box(-20, -5, 1200, 1001).to_pixels(300, 200) == (0, 0, 300, 200)


def test_points_clamp_to_the_last_pixel():
    assert Box(1000, 1000, 1000, 1000, point=True).to_pixels(300, 200) == (299, 199, 299, 199)


def test_to_pixels_orders_corners():
    assert Box(800, 900, 100, 200).to_pixels(1000, 1000) == (100, 200, 800, 900)


@pytest.mark.parametrize("size", [(640, 480), (37, 1999), (4000, 3000), (1, 1)])
def test_pixels_round_trip_through_normalised_text(size):
    """A pixel box written as the model writes it (round(1000 * px / size)) comes back within W/2000 + 0.5 px."""
    width, height = size
    rng = np.random.default_rng(width)
    for _ in range(50):
        xs = np.sort(rng.integers(0, width + 1, 2))
        ys = np.sort(rng.integers(0, height + 1, 2))
        norm = [round(1000 * v / s) for v, s in ((xs[0], width), (ys[0], height), (xs[1], width), (ys[1], height))]
        (box,) = parse_boxes(span(str([norm])))
        got = np.array(box.to_pixels(width, height))
        want = np.array([xs[0], ys[0], xs[1], ys[1]])
        bound = np.array([width, height, width, height]) / 2000 + 0.5
        assert np.all(np.abs(got - want) <= bound)


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (2.5, 10)])
def test_to_pixels_rejects_bad_sizes(size):
    with pytest.raises(ValueError):
        Box(1, 2, 3, 4).to_pixels(*size)


def test_draw_boxes_outlines_the_box_on_a_copy():
    base = Image.fromarray(np.zeros((100, 200, 3), dtype=np.uint8))
    out = np.asarray(draw_boxes(base, [Box(250, 200, 750, 800)], color=(255, 0, 0), width=1))
    assert out.shape == (100, 200, 3)
    assert tuple(out[20, 100]) == (255, 0, 0)  # top edge at y = 200/1000 * 100
    assert tuple(out[50, 50]) == (255, 0, 0)  # left edge at x = 250/1000 * 200
    assert out[50, 100].sum() == 0  # inside stays untouched
    assert np.asarray(base).sum() == 0  # the input is not modified


def test_draw_boxes_marks_points():
    out = np.asarray(draw_boxes(random_image(100, 100) * 0, [Box(500, 500, 500, 500, point=True)], color="white"))
    assert out[40:60, 40:60].any() and not out[:20].any()
