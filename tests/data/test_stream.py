"""Streaming webdataset shards (`ldm.data.stream`): disjoint and complete streams, an order that is a function of
(seed, epoch), exact resume from a cursor, bad samples and unreachable shards skipped and counted, HTTP from
127.0.0.1, memory flat in the number of shards."""

import functools
import http.server
import itertools
import threading
import tracemalloc

import pytest
from tiny_models import write_shards

from ldm.data.stream import Cursor, ShardStream, expand_shards, is_shard_spec, stream_shards


def _keys(stream, n, cursor=None):
    return [(c, key) for c, key, _, _ in itertools.islice(stream.samples(cursor), n)]


def test_streams_read_disjoint_shards_and_together_every_sample_once_an_epoch(tmp_path):
    write_shards(tmp_path, num_shards=6, per_shard=5)
    shards = expand_shards(str(tmp_path / "shard-{0000..0005}.tar"))
    assert shards == expand_shards(str(tmp_path)) and is_shard_spec(str(tmp_path))
    seen = []
    for s in range(3):  # e.g. 3 processes x 1 worker: 2 shards (10 samples) each in epoch 0
        got = _keys(ShardStream(shards, seed=7, stream=s, num_streams=3), 12)
        assert [c.epoch for c, _ in got] == [0] * 10 + [1] * 2  # then on to its own next epoch
        seen.append({key for _, key in got[:10]})
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(set.union(*seen)) == 30
    # The shard order is a function of (seed, epoch): another seed or epoch, another order; the same, the same.
    assert stream_shards(6, 7, 0, 0, 3) == stream_shards(6, 7, 0, 0, 3)
    assert [stream_shards(6, 7, e, 0, 1) for e in range(3)] != [stream_shards(6, 8, e, 0, 1) for e in range(3)]
    with pytest.raises(ValueError, match="6 shard\\(s\\) cannot feed 8 streams"):
        ShardStream(shards, seed=7, stream=0, num_streams=8)


def test_a_stream_resumed_from_its_cursor_reads_what_it_would_have_read(tmp_path):
    write_shards(tmp_path, num_shards=4, per_shard=5)
    shards = expand_shards(str(tmp_path / "shard-{0000..0003}.tar"))
    straight = _keys(ShardStream(shards, seed=1, stream=0, num_streams=2), 25)
    for cut in (3, 5, 10, 13):  # inside a shard, at a shard's end, at the epoch's end, in the next epoch
        cursor = straight[cut - 1][0]
        resumed = _keys(ShardStream(shards, seed=1, stream=0, num_streams=2), 25 - cut, cursor)
        assert [k for _, k in resumed] == [k for _, k in straight[cut:]]
    assert straight[9][0] == Cursor(epoch=0, shard=1, sample=5)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    write_shards(tmp_path, num_shards=1, per_shard=6,
                 bad={"s0000_0001": "image", "s0000_0003": "caption", "s0000_0004": "small"})
    stream = ShardStream(expand_shards(str(tmp_path / "shard-0000.tar")), seed=0, stream=0, num_streams=1, min_size=8)
    got = _keys(stream, 3)
    assert sorted(k for _, k in got) == ["s0000_0000", "s0000_0002", "s0000_0005"]
    assert dict(stream.report.bad) == {"undecodable image": 1, "no caption": 1, "too small": 1}
    assert {e["key"] for e in stream.report.bad_examples} == {"s0000_0001", "s0000_0003", "s0000_0004"}


def test_shards_over_http_and_an_unreachable_one_retried_then_skipped_and_counted(tmp_path):
    write_shards(tmp_path, num_shards=3, per_shard=4)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{0000..0003}}.tar"  # shard 3 does not exist
        assert is_shard_spec(url)
        stream = ShardStream(expand_shards(url), seed=0, stream=0, num_streams=1, retries=2, backoff=0.0)
        got = _keys(stream, 13)  # one epoch and the first sample of the next: every shard was tried
    finally:
        server.shutdown()
    assert len({k for _, k in got[:12]}) == 12 and got[12][0].epoch == 1  # the 3 shards that exist, once each
    # Tried once an epoch (1 + 2 retries each time), skipped and counted each time.
    assert {u["shard"].rsplit("/", 1)[1] for u in stream.report.unreachable} == {"shard-0003.tar"}
    assert "404" in stream.report.unreachable[0]["error"] and stream.report.retries == 2 * len(stream.report.unreachable)


def test_missing_local_shards_are_refused_or_warned(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="none of its 2 shard"):
        expand_shards(str(tmp_path / "x-{0..1}.tar"))
    write_shards(tmp_path, num_shards=1, per_shard=1)
    assert len(expand_shards(str(tmp_path / "shard-{0000..0002}.tar"))) == 3
    assert "2 of 3 shards do not exist" in caplog.text


def test_memory_is_flat_in_the_number_of_shards(tmp_path):
    """Reading 40 samples from 10 or from 1,000 shards: what reading allocates grows by less than 100 bytes a shard
    (the epoch's shard order), nothing of any shard's content is kept."""
    write_shards(tmp_path / "many", num_shards=1000, per_shard=2, size=8)
    peaks = {}
    for n in (10, 1000):
        stream = ShardStream(expand_shards(str(tmp_path / "many" / f"shard-{{0000..{n - 1:04d}}}.tar")), seed=0,
                             stream=0, num_streams=1)
        tracemalloc.start()
        _keys(stream, 40)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[1000] - peaks[10] < 100 * 990, peaks


def test_a_shard_that_breaks_off_gives_its_first_samples_once_then_is_skipped(tmp_path):
    paths = write_shards(tmp_path, num_shards=1, per_shard=6)
    data = paths[0].read_bytes()
    # Cut inside a file of a sample. (A tar cut exactly between two files reads as a shorter shard, to Python's
    # tarfile as to webdataset: nothing marks it.)
    paths[0].write_bytes(data[: len(data) // 2 - 300])
    stream = ShardStream([str(paths[0])], seed=0, stream=0, num_streams=1, retries=1, backoff=0.0)
    got = _keys(stream, 8)
    first = [k for c, k in got if c.epoch == 0]
    assert 0 < len(first) < 6 and len(set(first)) == len(first)  # what came before the cut, once
    again = [k for c, k in got if c.epoch == 1]
    assert again and again == first[: len(again)]  # and again next epoch
    assert stream.report.unreachable[0]["shard"] == str(paths[0]) and stream.report.retries >= 1
