"""The tuning split: written by grad-bench split, read back by everything that must leave its images unscored."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradad.benchmarks.split import write_split
from gradad.data.datasets import Sample, load_samples
from gradad.data.tuning_split import exclude_held_out, partition_by_paths, read_held_out
from gradad.errors import DatasetError


def test_split_round_trip_and_exclusion(tiny_demo_root: Path, tmp_path: Path):
    split = write_split([str(tiny_demo_root)], 1, tmp_path / "split")
    test = load_samples(tiny_demo_root, "test")
    types = {(s.class_name, s.defect_type) for s in test if s.label == 1}
    held = read_held_out(tmp_path / "split")  # the folder or its split.json
    assert held == read_held_out(tmp_path / "split" / "split.json") == set(split["held_out"])
    assert len(held) == len(types)  # one per (class, defect type)
    kept = exclude_held_out(test, held)
    assert len(kept) == len(test) - len(held) and not {str(s.image_path.resolve()) for s in kept} & held
    # links, not copies: the split folder never holds a dataset image
    assert all(p.is_symlink() for p in (tmp_path / "split" / "defects").rglob("*.png"))


def test_a_large_per_type_never_takes_a_defect_type_out_of_scoring_whole(tiny_demo_root: Path, tmp_path: Path, caplog):
    test = load_samples(tiny_demo_root, "test")
    per_type: dict[tuple[str, str], int] = {}
    for s in test:
        if s.label == 1:
            per_type[(s.class_name, s.defect_type)] = per_type.get((s.class_name, s.defect_type), 0) + 1
    ask = max(per_type.values())
    with caplog.at_level("WARNING"):
        split = write_split([str(tiny_demo_root)], ask, tmp_path / "split")
    for (c, t), n in per_type.items():
        assert split["counts"].get(f"{c}/{t}", 0) == max(0, min(ask, n - 1))
    kept = exclude_held_out(test, read_held_out(tmp_path / "split"))
    assert all(sum(s.class_name == c and s.defect_type == t for s in kept) >= 1 for (c, t) in per_type)
    assert "would leave fewer than 1 scored image(s)" in caplog.text


def test_a_split_of_other_data_or_an_unreadable_file_is_refused(tiny_demo_root: Path, tmp_path: Path):
    test = load_samples(tiny_demo_root, "test")
    with pytest.raises(DatasetError, match="names none of the test images"):
        exclude_held_out(test, {"/elsewhere/a.png"})
    bad = tmp_path / "split.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match=str(bad)):
        read_held_out(bad)


def test_partition_by_paths_matches_resolved_paths_and_keeps_the_order(tmp_path: Path) -> None:
    files = []
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"")
        files.append(tmp_path / name)
    link = tmp_path / "link.png"
    link.symlink_to(files[1])
    samples = [Sample(p, "c", "test", 1, "d", None) for p in (files[0], link, files[2])]
    kept, matched = partition_by_paths(samples, {str(files[1].resolve()), str(files[2].resolve())})
    assert kept == samples[:1] and matched == samples[1:]
