"""Shard schema, writer and checked reader, on tiny shards written in a temp dir."""

from __future__ import annotations

import io
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from popalign.data import PopulationGroup, PopulationShardWriter, ShardError, expand_shards, read_groups
from popalign.data.shards import BadSampleCounter
from popalign.errors import UserError

LATENT = (4, 4, 4)


def make_group(
    index: int, kp: int = 4, kd: int = 5, per_member_time_ids: bool = False, latent: tuple = LATENT
) -> PopulationGroup:
    """A tiny valid group; values depend on ``index`` so groups are told apart."""
    rng = np.random.default_rng(index)
    time_ids = np.array([32, 32, 0, 0, 32, 32], np.float32)
    if per_member_time_ids:
        time_ids = np.tile(time_ids, (kp + kd, 1)) + np.arange(kp + kd, dtype=np.float32)[:, None]
    return PopulationGroup(
        key=f"p{index:04d}-g0000",
        preferred=rng.standard_normal((kp, *latent)).astype(np.float16),
        dispreferred=rng.standard_normal((kd, *latent)).astype(np.float16),
        prompt_embeds=rng.standard_normal((77, 8)).astype(np.float16),
        pooled_prompt_embeds=rng.standard_normal(4).astype(np.float16),
        time_ids=time_ids,
        meta={
            "prompt": "a photo of a doctor",
            "prompt_id": index,
            "axes": ["gender"],
            "preferred_labels": [{"gender": ["female", "male"][i % 2]} for i in range(kp)],
            "dispreferred_labels": [{"gender": "male"}] * kd,
            "preferred_sources": ["a photo of a female doctor"] * kp,
            "dispreferred_sources": ["a photo of a doctor"] * kd,
            "seeds": list(range(kp + kd)),
            "extra": {"note": "free key"},
        },
    )


def write_shards(directory: Path, n: int, maxcount: int = 3, **kw) -> list[str]:
    with PopulationShardWriter(directory, maxcount=maxcount) as writer:
        for i in range(n):
            writer.write(make_group(i, **kw))
    return writer.paths


def write_raw(path: Path, samples: list[dict]) -> str:
    """A tar of already-encoded samples (bypasses the writer's checks)."""
    from webdataset import TarWriter

    with open(path, "wb") as f, TarWriter(f, encoder=False) as tar:
        for sample in samples:
            tar.write(sample)
    return str(path)


def read_all(urls, max_bad_fraction: float = 0.99, **kw) -> tuple[list[PopulationGroup], BadSampleCounter]:
    counter = BadSampleCounter(max_bad_fraction)
    return list(read_groups(urls, counter, **kw)), counter


def test_round_trip_values_and_count_cap(tmp_path):
    paths = write_shards(tmp_path, 10, maxcount=3, per_member_time_ids=True)
    # 10 groups, 3 per shard -> 3 + 3 + 3 + 1 in four shards
    assert [Path(p).name for p in paths] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert [len(tarfile.open(p).getnames()) // 6 for p in paths] == [3, 3, 3, 1]
    groups, counter = read_all(paths)
    assert (counter.seen, counter.bad) == (10, 0)
    for i, got in enumerate(groups):
        want = make_group(i, per_member_time_ids=True)
        assert got.key == want.key and got.meta == want.meta
        for name in ("preferred", "dispreferred", "prompt_embeds", "pooled_prompt_embeds", "time_ids"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
            assert getattr(got, name).dtype == getattr(want, name).dtype


def with_sources(group: PopulationGroup) -> PopulationGroup:
    """Give ``group`` two identity-specific source captions, alternating over its preferred members."""
    rng = np.random.default_rng(100 + group.meta["prompt_id"])
    sources = ["a photo of a female doctor", "a photo of a male doctor"]
    group.meta["preferred_sources"] = [sources[i % 2] for i in range(group.num_preferred)]
    group.meta["sources"] = sources
    group.source_prompt_embeds = rng.standard_normal((2, *group.prompt_embeds.shape)).astype(np.float16)
    group.source_pooled_prompt_embeds = rng.standard_normal((2, *group.pooled_prompt_embeds.shape)).astype(
        np.float16
    )
    return group


def test_source_embeddings_round_trip(tmp_path):
    with PopulationShardWriter(tmp_path, maxcount=10) as writer:
        writer.write(with_sources(make_group(0)))
        writer.write(make_group(1))  # groups without them may share a shard
    (got, plain), _ = read_all(writer.paths)
    want = with_sources(make_group(0))
    assert got.has_sources and not plain.has_sources and got.meta == want.meta
    np.testing.assert_array_equal(got.source_prompt_embeds, want.source_prompt_embeds)
    np.testing.assert_array_equal(got.source_pooled_prompt_embeds, want.source_pooled_prompt_embeds)
    assert got.preferred_source_index().tolist() == [0, 1, 0, 1]


def _sources_changed(change) -> PopulationGroup:
    group = with_sources(make_group(1))
    change(group)
    return group


BAD_SOURCES = {
    "one_array": (lambda g: setattr(g, "source_pooled_prompt_embeds", None), "come together"),
    "dtype": (
        lambda g: setattr(g, "source_prompt_embeds", g.source_prompt_embeds.astype(np.float32)),
        "expected float16",
    ),
    "shape": (
        lambda g: setattr(g, "source_prompt_embeds", g.source_prompt_embeds[:, :5]),
        "source_prompt_embeds has shape [2, 5, 8] and prompt_embeds [77, 8]: they must agree",
    ),
    # the neutral caption's array the odd one: not blamed on the (good) source array alone
    "neutral_shape": (
        lambda g: setattr(g, "prompt_embeds", g.prompt_embeds[:5]),
        "source_prompt_embeds has shape [2, 77, 8] and prompt_embeds [5, 8]: they must agree",
    ),
    "count": (lambda g: g.meta.update(sources=["a photo of a female doctor"]), "the 2 distinct captions"),
    "unknown": (
        lambda g: g.meta["preferred_sources"].__setitem__(0, "a photo of a dog"),
        "missing from 'sources'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_bad_source_embeddings_are_refused(tmp_path, case):
    change, problem = BAD_SOURCES[case]
    with pytest.raises(ShardError, match=re.escape(problem)):
        _sources_changed(change).validate()


def test_size_cap_and_listing(tmp_path):
    # one group in tar: 6 headers (6 x 512) + data padded to 512 (dispreferred 768 -> 1024, json
    # 653 -> 1024, pooled 136 -> 512, preferred 640 -> 1024, prompt_embeds 1360 -> 1536,
    # time_ids 152 -> 512) = 3072 + 5632 = 8704 B. Two groups + 1024 B end blocks = 18432 B, padded
    # to tar's 10240 B records = 20480 B: fits a 20480 B cap; a third group would not.
    with PopulationShardWriter(tmp_path, prefix="s", maxsize=20480) as writer:
        for i in range(5):
            writer.write(make_group(i))
    assert writer.close() == [str(tmp_path / f"s-{i:06d}.tar") for i in range(3)]
    assert [Path(p).stat().st_size for p in writer.paths] == [20480, 20480, 10240]
    assert [len(tarfile.open(p).getnames()) for p in writer.paths] == [12, 12, 6]
    names = tarfile.open(writer.paths[0]).getnames()
    assert names[:6] == [
        f"p0000-g0000.{ext}"
        for ext in ("dispreferred.npy", "json", "pooled_prompt_embeds.npy", "preferred.npy")
        + ("prompt_embeds.npy", "time_ids.npy")
    ]


def test_writer_refuses_existing_shards_and_bad_groups(tmp_path):
    write_shards(tmp_path, 2)
    with PopulationShardWriter(tmp_path, prefix="shard-val") as other:  # another prefix: no clash
        other.write(make_group(9))
    with pytest.raises(UserError, match="already exist"):
        PopulationShardWriter(tmp_path)
    with PopulationShardWriter(tmp_path, overwrite=True) as writer:
        writer.write(make_group(7))
        with pytest.raises(ShardError, match="duplicate key"):
            writer.write(make_group(7))
        bad = make_group(8)
        bad.preferred = bad.preferred.astype(np.float32)
        with pytest.raises(ShardError, match="preferred has dtype float32"):
            writer.write(bad)
    assert [g.key for g in read_all(writer.paths)[0]] == ["p0007-g0000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar", "shard-val-000000.tar"]


def test_interrupted_writer_leaves_no_tar(tmp_path):
    # a crash (no close at all): only the temporary name exists
    writer = PopulationShardWriter(tmp_path / "crash")
    writer.write(make_group(0))
    assert list((tmp_path / "crash").glob("*.tar")) == []
    assert [p.name for p in (tmp_path / "crash").iterdir()] == ["shard-000000.tar.tmp"]
    writer.abort()
    # an exception inside the context: the unfinished shard is removed
    with pytest.raises(RuntimeError), PopulationShardWriter(tmp_path / "exc") as writer:
        writer.write(make_group(0))
        raise RuntimeError("interrupted")
    assert list((tmp_path / "exc").iterdir()) == []
    # interrupted in the second shard: the first, complete shard stays and reads back whole
    with pytest.raises(RuntimeError), PopulationShardWriter(tmp_path / "two", maxcount=2) as writer:
        for i in range(3):
            writer.write(make_group(i))
        raise RuntimeError("interrupted")
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["shard-000000.tar"]
    assert [g.key for g in read_all(writer.paths)[0]] == ["p0000-g0000", "p0001-g0000"]


def test_expand_shards_forms(tmp_path):
    paths = write_shards(tmp_path, 9)  # 3 shards
    assert expand_shards(f"{tmp_path}/shard-{{000000..000002}}.tar") == paths
    assert expand_shards(str(tmp_path)) == paths  # directory: its *.tar, sorted
    (tmp_path / "shard-000003.tar.tmp").write_bytes(b"")  # unfinished shards are not listed
    assert expand_shards(f"{tmp_path}/") == paths
    assert expand_shards(f"{paths[2]}, {tmp_path}/shard-{{000000,000001}}.tar") == [paths[2], *paths[:2]]
    assert expand_shards(f"{tmp_path}/*-00000[01].tar") == paths[:2]
    assert expand_shards("pipe:cat a-{0..1}.tar") == ["pipe:cat a-0.tar", "pipe:cat a-1.tar"]
    with pytest.raises(UserError, match="shard-000003.tar: shard not found"):
        expand_shards(f"{tmp_path}/shard-{{000002..000003}}.tar")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no \\*.tar"):
        expand_shards(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no shards given"):
        expand_shards(" , ")


def test_pipe_url_reads(tmp_path):
    paths = write_shards(tmp_path, 2)
    groups, counter = read_all([f"pipe:cat {paths[0]}"])
    assert [g.key for g in groups] == ["p0000-g0000", "p0001-g0000"] and counter.bad == 0


class _Trap:
    """Unpickling this would record the call; the reader must never get that far."""

    called: list[str] = []

    def __reduce__(self):
        return (_Trap.called.append, ("unpickled",))


def _encoded(index: int, **changes) -> dict:
    group = make_group(index)
    sample = group.to_sample()
    for name, value in changes.items():
        if value is None:
            del sample[name]
        else:
            sample[name] = value
    return sample


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _group_bytes(index: int, **fields) -> dict:
    group = make_group(index)
    for name, value in fields.items():
        setattr(group, name, value)
    sample = group.to_sample()
    return sample


BAD_SAMPLES = {
    "missing": (
        lambda: _encoded(1, **{"pooled_prompt_embeds.npy": None}),
        "missing pooled_prompt_embeds.npy",
    ),
    "dtype": (lambda: _group_bytes(1, preferred=np.zeros((4, *LATENT), np.float32)), "dtype float32"),
    "shape": (lambda: _group_bytes(1, preferred=np.zeros((4, 4, 8, 8), np.float16)), "member shapes differ"),
    "nan": (
        lambda: _encoded(1, **{"dispreferred.npy": _npy(np.full((5, *LATENT), np.nan, np.float16))}),
        "NaN",
    ),
    "inf": (
        lambda: _encoded(1, **{"prompt_embeds.npy": _npy(np.full((77, 8), np.inf, np.float16))}),
        "NaN or inf",
    ),
    "empty": (lambda: _encoded(1, **{"preferred.npy": _npy(np.zeros((0, *LATENT), np.float16))}), "is empty"),
    "pickle": (
        lambda: _encoded(1, **{"preferred.npy": _npy(np.array([_Trap()], dtype=object), allow_pickle=True)}),
        "Object arrays cannot be loaded",
    ),
    "not_npy": (lambda: _encoded(1, **{"time_ids.npy": b"\x80\x04K\x01."}), "not a .npy"),
    "json": (lambda: _encoded(1, json=b"{not json"), "not valid JSON"),
    "labels": (lambda: _encoded(1, json=b'{"prompt": "x", "prompt_id": 1, "axes": []}'), "preferred_labels"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAMPLES))
def test_bad_sample_is_skipped_and_logged(tmp_path, caplog, case):
    make_bad, problem = BAD_SAMPLES[case]
    url = write_raw(tmp_path / "mixed.tar", [_encoded(0), make_bad(), _encoded(2)])
    with caplog.at_level(logging.WARNING, logger="popalign.data.shards"):
        groups, counter = read_all([url])
    assert [g.key for g in groups] == ["p0000-g0000", "p0002-g0000"]
    assert (counter.seen, counter.bad) == (3, 1)
    assert url in caplog.text and "'p0001-g0000'" in caplog.text and problem in caplog.text
    assert _Trap.called == []


def test_latent_shape_and_member_count_checks(tmp_path, caplog):
    paths = write_shards(tmp_path / "a", 2)  # K = 4 preferred, 5 dispreferred, latents 4x4x4
    with PopulationShardWriter(tmp_path / "b") as writer:
        writer.write(make_group(5, kp=3))  # only 3 preferred members
        writer.write(make_group(6, latent=(4, 8, 8)))  # another resolution than the first group's
    groups, counter = read_all(paths + writer.paths, min_members=4)  # 3 < 4 pairs: skipped
    assert [g.key for g in groups] == ["p0000-g0000", "p0001-g0000"]
    assert counter.bad == 2 and counter.last.key == "p0006-g0000"
    assert counter.last.problem == "latents have member shape [4, 8, 8], expected [4, 4, 4]"
    assert "sample 'p0005-g0000': preferred has 3 members, fewer than the 4 needed" in caplog.text
    # every sample of another resolution is bad: 2 of 2 is above even 99%
    with pytest.raises(ShardError, match=r"latents have member shape \[4, 4, 4\], expected \[4, 8, 8\]"):
        read_all(paths, latent_shape=(4, 8, 8))
    assert len(read_all(paths, latent_shape=LATENT)[0]) == 2


def test_damaged_shards(tmp_path):
    good = write_shards(tmp_path / "good", 3, maxcount=3)[0]
    data = Path(good).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    groups, counter = read_all([str(cut)])
    assert counter.bad == 1 and counter.last.url == str(cut) and counter.last.key is not None
    assert "unreadable" in counter.last.problem
    # cut exactly after the second sample: every file is whole, only the end blocks are missing
    end = max(m.offset_data + m.size for m in tarfile.open(good) if m.name.startswith("p0001"))
    boundary = tmp_path / "boundary.tar"
    boundary.write_bytes(data[: (end + 511) // 512 * 512])
    groups, counter = read_all([str(boundary)])
    assert [g.key for g in groups] == ["p0000-g0000"] and counter.bad == 1
    assert counter.last.key == "p0001-g0000" and "truncated" in counter.last.problem
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    groups, counter = read_all([str(junk), good, str(tmp_path / "missing.tar")])
    assert len(groups) == 3 and counter.bad == 2 and (counter.seen, counter.last.key) == (5, None)


def test_any_cut_is_caught(tmp_path):
    good = write_shards(tmp_path / "good", 3, maxcount=3)[0]
    data = Path(good).read_bytes()
    last = tarfile.open(good).getmembers()[-1]
    data_end = last.offset_data + last.size  # after this only zero padding and end blocks follow
    end_blocks = -(-data_end // 512) * 512
    keys = ["p0000-g0000", "p0001-g0000", "p0002-g0000"]
    for cut in range(0, len(data), 331):  # odd step: cuts inside headers, data and padding
        path = tmp_path / "cut.tar"
        path.write_bytes(data[:cut])
        groups, counter = read_all([str(path)], max_bad_fraction=1.0)  # never abort
        got = [g.key for g in groups]
        assert got == keys[: len(got)] and counter.bad in (0, 1), cut  # never a damaged group
        if cut < data_end:  # a file is cut short: exactly one bad sample, the rest of the shard lost
            assert len(got) < 3 and counter.bad == 1, cut
        elif cut >= end_blocks + 1024:  # both end-of-archive blocks present: the shard is whole
            assert (got, counter.bad) == (keys, 0), cut
        # in between every file is whole and only zeros are missing: either answer is safe


def test_duplicate_key_in_shard(tmp_path):
    url = write_raw(tmp_path / "dup.tar", [_encoded(0), _encoded(1), _encoded(0)])
    groups, counter = read_all([url])
    assert [g.key for g in groups] == ["p0000-g0000", "p0001-g0000"]
    assert counter.last.problem == "key appears twice in the shard"


def test_bad_fraction_grace_and_end_of_data():
    bad = ShardError("broken", url="s-000001.tar", key="p0001-g0000")
    counter = BadSampleCounter(0.01, grace=100)
    counter.record_bad(bad)
    for _ in range(99):  # 1 of 100 = 1%, not above 1%
        counter.good()
    counter.finish()
    counter = BadSampleCounter(0.01, grace=100)
    counter.record_bad(bad)
    counter.record_bad(bad)
    for _ in range(97):  # 99 seen: still inside the grace
        counter.good()
    with pytest.raises(ShardError, match=r"s-000001.tar: sample 'p0001-g0000': 2 of 100 samples bad"):
        counter.good()  # 2 of 100 = 2% > 1%
    counter = BadSampleCounter(0.01)
    counter.record_bad(bad)
    for _ in range(9):
        counter.good()
    with pytest.raises(ShardError, match="1 of 10 samples bad"):  # end of data: 10% > 1%
        counter.finish()
    with pytest.raises(ShardError, match="max_bad_fraction=0"):
        BadSampleCounter(0.0).record_bad(bad)  # zero tolerance: the first bad sample fails


def test_a_bad_sample_read_again_gets_one_line(caplog):
    # resampled epochs reread the same few bad groups: 100 identical lines before the abort, before
    counter = BadSampleCounter(0.01, grace=100)
    bad = ShardError("broken", url="s-000001.tar", key="p0001-g0000")
    with caplog.at_level(logging.WARNING, logger="popalign.data.shards"):
        for _ in range(99):
            counter.record_bad(bad)
        with pytest.raises(ShardError, match=r"100 of 100 samples bad \(1 distinct, read again\)"):
            counter.record_bad(bad)
    assert [r.getMessage() for r in caplog.records] == [
        "skipping bad sample (1 of 1 bad so far): s-000001.tar: sample 'p0001-g0000': broken"
    ]
    # many distinct bad samples: the first LOGGED get a line, then one line says the rest are counted
    caplog.clear()
    counter = BadSampleCounter(0.5, grace=1000)
    with caplog.at_level(logging.WARNING, logger="popalign.data.shards"):
        for i in range(30):
            counter.record_bad(ShardError("broken", url="s.tar", key=f"k{i}"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == BadSampleCounter.LOGGED + 1 and lines[-1].startswith(
        "further bad samples are counted"
    )


def test_bad_fraction_abort_names_shard_and_key(tmp_path):
    url = write_raw(tmp_path / "mixed.tar", [_encoded(0), _encoded(1, json=b"[]")])
    with pytest.raises(ShardError) as err:
        read_all([url], max_bad_fraction=0.01)
    assert str(err.value).startswith(f"{url}: sample 'p0001-g0000': 1 of 2 samples bad")
    assert "json metadata must be an object" in str(err.value)


def test_image_shards_given_for_training_are_one_error(tmp_path, caplog):
    # `popalign generate`'s output passed as --data.train_shards: one error saying so, not a warning
    # per sample ("missing preferred.npy ...") followed by the bad-fraction abort
    import webdataset as wds

    from popalign.data.images import encode_image

    url = str(tmp_path / "images-r0-000000.tar")
    with wds.TarWriter(url) as sink:
        for i in range(5):
            image = np.zeros((8, 8, 3), np.uint8)
            sink.write(
                encode_image(f"p0000-n0000-{i:04d}", image, np.zeros((4, 1, 1)), {"prompt": "a doctor"})
            )
    with caplog.at_level(logging.WARNING), pytest.raises(ShardError) as err:
        list(read_groups([url], BadSampleCounter(max_bad_fraction=0.5)))
    assert str(err.value) == (
        f"{url}: an image shard of popalign generate, not population shards; train on the --out of "
        "popalign build (which groups the images into populations)"
    )
    assert not caplog.records
