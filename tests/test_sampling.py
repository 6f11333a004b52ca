import numpy as np
import pytest

from bert_finetune.sampling import LengthGroupedSampler, eval_shard, steps_per_epoch


def shards(n, world, batch, epoch=0, seed=1, grouped=True):
    lengths = np.random.default_rng(0).integers(3, 80, n)
    out = []
    for rank in range(world):
        s = LengthGroupedSampler(lengths, batch, world, rank, seed, group_by_length=grouped)
        s.set_epoch(epoch)
        out.append(list(s))
    return lengths, out


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("n,world,batch", [(1000, 1, 32), (1001, 2, 16), (997, 3, 8), (10, 4, 4)])
def test_shards_cover_are_disjoint_and_equal(n, world, batch, grouped):
    _, parts = shards(n, world, batch, grouped=grouped)
    assert len({len(p) for p in parts}) == 1  # same sample (so step) count on every rank
    allidx = np.concatenate(parts)
    assert set(allidx.tolist()) == set(range(n))  # every example seen
    padded = len(allidx) - n
    assert padded < world  # only DistributedSampler's wrap-around duplicates
    if n % world == 0:
        assert len(set(allidx.tolist())) == len(allidx)  # disjoint


def test_deterministic_per_seed_and_epoch_and_changes_across_epochs():
    _, a = shards(500, 2, 16, epoch=3)
    _, b = shards(500, 2, 16, epoch=3)
    _, c = shards(500, 2, 16, epoch=4)
    _, d = shards(500, 2, 16, epoch=3, seed=2)
    assert a == b and a != c and a != d


def test_batches_hold_similar_lengths_and_ranks_step_together():
    lengths, parts = shards(4000, 2, 32)
    pad = []
    for rank_part in parts:
        for i in range(0, len(rank_part), 32):
            batch = lengths[rank_part[i:i + 32]]
            pad.append(1 - batch.sum() / (batch.max() * len(batch)))
    assert np.mean(pad) < 0.05
    # at each step both ranks' batches come from the same sorted run: similar longest lengths
    longest = [[lengths[p[i:i + 32]].max() for i in range(0, len(p), 32)] for p in parts]
    assert np.mean(np.abs(np.subtract(*longest))) < 3


def test_skip_resumes_mid_epoch():
    lengths = np.arange(300) % 50 + 1
    s = LengthGroupedSampler(lengths, 8, 2, 1, seed=5)
    s.set_epoch(2)
    whole = list(s)
    s.skip(5 * 8)
    assert list(s) == whole[40:] and len(s) == len(whole) - 40
    s.set_epoch(3)  # a new epoch starts from its beginning
    assert len(list(s)) == len(whole)


def test_random_mode_matches_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler
    lengths = np.ones(101)
    ours = LengthGroupedSampler(lengths, 8, 2, 1, seed=9, group_by_length=False)
    theirs = DistributedSampler(range(101), num_replicas=2, rank=1, shuffle=True, seed=9)
    ours.set_epoch(4), theirs.set_epoch(4)
    assert list(ours) == list(theirs)


@pytest.mark.parametrize("n,world", [(301, 2), (7, 3), (100, 4), (1, 2)])
def test_eval_shards_count_each_example_once(n, world):
    lengths = np.random.default_rng(1).integers(1, 60, n)
    parts = [eval_shard(lengths, world, r) for r in range(world)]
    allidx = sorted(i for p in parts for i in p)
    assert allidx == list(range(n))


def test_steps_per_epoch_counts_the_short_last_group():
    assert steps_per_epoch(10, 4) == 3 and steps_per_epoch(8, 4) == 2 and steps_per_epoch(1, 1) == 1


def test_padding_under_5_percent_on_rotten_tomatoes():
    from bert_finetune import data, modeling
    tok = modeling.load_tokenizer(data.embedded_model_dir())
    table = data.embedded_table()
    lengths = np.array([len(x) for x in data.tokenize(tok, table["text"].tolist(), 128)])
    s = LengthGroupedSampler(lengths, 32, 1, 0, seed=42)
    s.set_epoch(0)
    order = list(s)
    real = padded = 0
    for i in range(0, len(order), 32):
        b = lengths[order[i:i + 32]]
        real, padded = real + b.sum(), padded + b.max() * len(b)
    assert 1 - real / padded < 0.05


def test_token_cache_round_trips_and_keys_on_inputs(tiny_model, tmp_path):
    from bert_finetune import data, modeling
    tok = modeling.load_tokenizer(tiny_model)
    texts = ["the good movie", "a bad plot indeed", ""]
    first = data.tokenize_cached(tok, texts, 32, str(tmp_path))
    assert len(list(tmp_path.glob("*.tokens"))) == 1
    again = data.tokenize_cached(tok, texts, 32, str(tmp_path))
    assert [x.tolist() for x in again] == [x.tolist() for x in first] == [x.tolist() for x in data.tokenize(tok, texts, 32)]
    data.tokenize_cached(tok, texts, 4, str(tmp_path))  # another max length: another entry
    data.tokenize_cached(tok, texts[:2], 32, str(tmp_path))  # other texts: another entry
    assert len(list(tmp_path.glob("*.tokens"))) == 3, sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("truncation", ["head", "tail", "head_tail", "pairs"])
def test_the_memory_mapped_cache_gives_the_token_ids_of_tokenize(tiny_model, tmp_path, truncation):
    """The cache is flat arrays read memory-mapped; example by example they are tokenize()'s (tokenize_pairs()'s)
    ids, from the run that wrote it and from the next."""
    import numpy as np
    from bert_finetune import data, modeling
    tok = modeling.load_tokenizer(tiny_model)
    texts = [" ".join(["good", "bad", "the", "movie"][i % 4:] * (i % 9)) for i in range(40)]
    pairs = [t[::-1] for t in texts]
    for run in ("written", "read"):
        if truncation == "pairs":
            ids, types = data.tokenize_pairs_cached(tok, texts, pairs, 12, str(tmp_path))
            want_ids, want_types = data.tokenize_pairs(tok, texts, pairs, 12)
            assert [x.tolist() for x in types] == [x.tolist() for x in want_types]
        else:
            ids = data.tokenize_cached(tok, texts, 12, str(tmp_path), truncation, 3)
            want_ids = data.tokenize(tok, texts, 12, truncation, 3)
        assert [x.tolist() for x in ids] == [x.tolist() for x in want_ids]
        assert isinstance(ids.flat, np.memmap) and ids.computed == (run == "written")
        assert max(len(x) for x in ids) == 12  # some were cut


def test_a_cache_entry_left_half_written_is_never_read(tiny_model, tmp_path):
    """A killed writer leaves a temporary folder (ignored) or, on a damaged disk, a short file: both are
    tokenized anew and the entry rewritten whole."""
    import numpy as np
    from bert_finetune import data, modeling
    tok = modeling.load_tokenizer(tiny_model)
    texts = ["the good movie", "a bad plot", "dull"]
    want = [x.tolist() for x in data.tokenize(tok, texts, 32)]
    entry = data.tokenize_cached(tok, texts, 32, str(tmp_path))  # learn the entry's name
    path = next(tmp_path.glob("*.tokens"))
    del entry
    for f in path.iterdir():
        f.unlink()
    path.rmdir()
    half = tmp_path / f"{path.name}.tmp-12345"  # what a writer killed before its rename leaves
    half.mkdir()
    np.save(half / "offsets.npy", np.array([0, 1, 2, 3]))
    np.save(half / "ids.npy", np.array([7, 7, 7], dtype=np.int32))
    again = data.tokenize_cached(tok, texts, 32, str(tmp_path))
    assert again.computed and [x.tolist() for x in again] == want
    ids = path / "ids.npy"  # now a whole entry: cut it short, as a damaged disk would
    ids.write_bytes(ids.read_bytes()[:-4])
    third = data.tokenize_cached(tok, texts, 32, str(tmp_path))
    assert third.computed and [x.tolist() for x in third] == want
    assert not data.tokenize_cached(tok, texts, 32, str(tmp_path)).computed
