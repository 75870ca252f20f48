"""The validation split: held-out subjects, held-out sequences, or none (the paper's protocol)."""

import h5py
import numpy as np
import pytest

from raypose.config import ConfigError, load_config
from raypose.data.dataset import has_validation, validation_rows
from raypose.train.loop import open_splits
from tests.support import tiny_config


def test_validation_rows_hold_out_subjects_and_every_nth_sequence():
    subjects = np.array(["S1", "S1", "S5", "S5", "S6", "S8", "S8"])
    actions = np.array(["eat", "walk", "eat", "walk", "eat", "eat", "walk"])
    # subjects only: the rows of S8
    assert validation_rows(subjects, actions, ["S8"]).tolist() == [0, 0, 0, 0, 0, 1, 1]
    # nothing held out
    assert not validation_rows(subjects, actions).any()
    # sequences of the other subjects in sorted order: S1/eat S1/walk S5/eat S5/walk S6/eat;
    # every 2nd is S1/walk and S5/walk
    assert validation_rows(subjects, actions, ["S8"], every=2).tolist() == [0, 1, 0, 1, 0, 1, 1]
    # without held-out subjects, S8's two sequences join the sorted list (7 sequences: every 3rd
    # is S5/eat and S8/eat)
    assert validation_rows(subjects, actions, [], every=3).tolist() == [0, 0, 1, 0, 0, 1, 0]
    # more than there are: none
    assert not validation_rows(subjects, actions, [], every=99).any()
    assert has_validation([], 0) is False
    assert has_validation(["S8"], 0) and has_validation([], 4)


def test_an_empty_val_subjects_trains_on_every_subject(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, data__val_subjects=[])
    train, val = open_splits(cfg)
    with h5py.File(tiny_data / "train.h5") as f:
        rows = f["images"].shape[0]
        all_subjects = sorted(set(f["subject"].asstr()[:].tolist()))
    assert val is None
    assert len(train) == rows
    assert train.subjects == all_subjects


def test_held_out_sequences_and_actions_split_train_h5_without_overlap(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path, data__val_subjects=[], data__val_sequence_every=3)
    train, val = open_splits(cfg)
    assert set(train.indices.tolist()).isdisjoint(val.indices.tolist())
    with h5py.File(tiny_data / "train.h5") as f:
        assert len(train) + len(val) == f["images"].shape[0]
        subject = f["subject"].asstr()[:]
        action = f["action"].asstr()[:]
    sequences = {(subject[i], action[i]) for i in val.indices}
    assert sequences and not sequences & {(subject[i], action[i]) for i in train.indices}
    # one action only: both sides hold that action alone
    one = train.action_names[0]
    cfg = tiny_config(tiny_data, tmp_path, data__actions=[one])
    train, val = open_splits(cfg)
    assert {train.action_names[a] for a in train.sample_actions} == {one}
    assert {val.action_names[a] for a in val.sample_actions} == {one}


def test_bad_split_settings_name_their_key():
    with pytest.raises(ConfigError, match="data.val_sequence_every"):
        load_config(None, ["data.val_sequence_every=-1"])
    with pytest.raises(ConfigError, match="data.val_subjects"):
        load_config(None, ["data.val_subjects=[' ']"])


def test_a_config_stored_before_a_setting_existed_resumes_as_the_default():
    """A checkpoint's or sweep's config from before data.val_sequence_every and data.actions
    existed compares equal to today's defaults, so `--name` still resumes it."""
    from raypose.cluster.driver import stored_settings
    from raypose.config import Config, flatten

    old = Config().to_dict()
    del old["data"]["val_sequence_every"], old["data"]["actions"]
    assert stored_settings(old) == flatten(Config().to_dict())
    old["data"]["batch_size"] = 7  # what the stored config does say still counts
    assert stored_settings(old)["data.batch_size"] == 7
