"""The tar and CRFS fuzz targets (bench/fuzzing/targets/): their seeds compile, a seeded run of
mutated cases raises nothing but `CfscError`, and every saved crasher replays cleanly.

Saved crashers (`tests/data/fuzz-regressions/<target>/<sha1>.bin`) are inputs that once
raised something else, or broke a target's oracle: a tar layer whose base-256 mtime wrapped
modulo 2^64 (issue #13), a TOC with `entries` twice read differently in slices.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from cfsc.base.errors import CfscError

from bench.fuzzing.targets import crfs as crfs_target
from bench.fuzzing.targets import tar as tar_target

TARGETS = {t.NAME: t for t in (tar_target, crfs_target)}
REGRESSIONS = Path(__file__).parent / "data" / "fuzz-regressions"
CASES = 150


def saved() -> list[tuple[str, Path]]:
    return [(name, path) for name in sorted(TARGETS) for path in sorted((REGRESSIONS / name).glob("*.bin"))]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_seeds_compile(name, tmp_path):
    target = TARGETS[name]
    for i, seed in enumerate(target.seeds()):
        work = tmp_path / str(i)
        work.mkdir()
        target.run(seed, str(work))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutated_cases_raise_only_cfsc_errors(name, tmp_path):
    target = TARGETS[name]
    rng = random.Random(13)
    corpus = target.seeds()
    for i in range(CASES):
        data = rng.choice(corpus)
        for _ in range(rng.choice((1, 2, 3))):
            data = target.mutate(data, rng)
        work = tmp_path / str(i)
        work.mkdir()
        try:
            target.run(data, str(work))
        except CfscError:
            pass


@pytest.mark.parametrize("name, path", saved(), ids=[f"{n}/{p.stem[:12]}" for n, p in saved()])
def test_saved_crashers_replay(name, path, tmp_path):
    try:
        TARGETS[name].run(path.read_bytes(), str(tmp_path))
    except CfscError:
        pass
