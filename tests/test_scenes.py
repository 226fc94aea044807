"""The built-in scenes: deterministic, split, layered by depth, and sequences whose objects move."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.data.builtin import open_source
from selfsup.data.scenes import (CLASSES, DEPTH_BACKGROUND, DEPTH_OBJECTS, RADIUS_AT_1M, SIZE, SceneObject,
                                 SceneSequence, SceneSet, render_object, scene)
from selfsup.errors import UserError


def test_a_scene_is_a_function_of_split_and_index():
    a, b = scene("test", 7), scene("test", 7)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(scene("train", 7)[0], a[0])  # train and test draw from different seeds
    image, classes, instances, depth = a
    assert image.shape == (3, SIZE, SIZE) and image.dtype == np.uint8
    assert classes.shape == instances.shape == depth.shape == (SIZE, SIZE)
    assert ((classes > 0) == (instances > 0)).all()


def test_objects_stand_in_front_of_a_receding_background():
    for i in range(20):
        _, classes, instances, depth = scene("train", i)
        on = instances > 0
        assert (depth[on] <= DEPTH_OBJECTS[1]).all() and (depth[~on] >= DEPTH_BACKGROUND[0][0]).all()
        if (~on[0]).any() and (~on[-1]).any():  # the background recedes from the bottom row to the top
            assert depth[0][~on[0]].mean() > depth[-1][~on[-1]].mean()
        for k in np.unique(instances[on]):  # one depth per object: the nearest object is the one seen
            assert len(np.unique(depth[instances == k])) == 1


FILL = (np.zeros(3), np.ones(3), 0, 3.0, 0.0, 0)  # two colours, stripes, frequency, orientation, digit


def test_an_object_is_as_large_as_its_depth_says():
    for d in (1.5, 3.0):
        inside, _ = render_object(SceneObject(CLASSES.index("disc"), 32, 32, d, 0.0, FILL), SIZE)
        r = RADIUS_AT_1M / d
        assert inside.sum() == pytest.approx(np.pi * 0.9 * r**2, rel=0.05)  # the disc is u^2 + v^2 < 0.9


def test_splits_as_a_labelled_source_and_as_a_dense_set():
    train, test = open_source("scenes", "train"), open_source("scenes", "test")
    assert (len(train), len(test)) == (2000, 500) and train.classes == list(CLASSES[1:])
    assert open_source("scenes").name == "scenes:train"  # training never sees the test scenes
    assert set(test.labels().tolist()) == set(range(len(CLASSES) - 1))  # every class is some scene's main object
    item = SceneSet("test")[3]
    assert item.image.shape == (3, SIZE, SIZE) and item.mask.dtype == torch.int64 and item.depth.dtype == torch.float32
    assert torch.equal(item.image, test[3][0])
    with pytest.raises(UserError, match="selfsup eval video"):
        open_source("scenes-video")


def test_a_sequence_moves_its_objects_over_a_still_background():
    seq = SceneSequence(0)
    first, last = seq.mask(0), seq.mask(len(seq) - 1)
    ids = sorted(set(first.unique().tolist()) - {0})
    assert len(ids) >= 2 and len(seq) >= 10
    centre = lambda m, k: torch.nonzero(m == k).float().mean(0)  # noqa: E731
    assert any((centre(first, k) - centre(last, k)).norm() > 3 for k in ids if (last == k).any())
    still = (first == 0) & (last == 0)  # background in both frames: the same pixels
    assert torch.equal(seq.frame(0)[:, still], seq.frame(len(seq) - 1)[:, still])
