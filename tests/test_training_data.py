"""The training corpus: stdlib default, tokenization cache, per-peer windows."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from swarm.training.data import WindowSampler, default_corpus_dir, list_text_files, tokenize_corpus


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["def main():\n    return 0\n" * 20], trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_default_corpus_is_the_standard_library():
    files = list_text_files(default_corpus_dir())
    assert any(f.name == "os.py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert list_text_files(default_corpus_dir()) == files  # a fixed order, so every peer agrees


def test_tokenize_reads_budget_and_caches(tmp_path, tokenizer_path):
    files = list_text_files(default_corpus_dir())
    tokens = tokenize_corpus(files, tokenizer_path, max_bytes=200_000, cache_dir=tmp_path)
    assert tokens.dtype == np.int32 and len(tokens) > 10_000
    assert len(list(tmp_path.glob("tokens-*.npy"))) == 1
    again = tokenize_corpus(files, tokenizer_path, max_bytes=200_000, cache_dir=tmp_path)
    np.testing.assert_array_equal(tokens, again)


def test_peers_see_different_windows_and_resume_from_position():
    tokens = np.arange(10_000, dtype=np.int32)
    a, b = WindowSampler(tokens, 15, seed=1), WindowSampler(tokens, 15, seed=2)
    first_a, first_b = a.next_batch(4), b.next_batch(4)
    assert first_a.shape == (4, 16)
    assert not np.array_equal(first_a.numpy(), first_b.numpy())
    continued = a.next_batch(3)
    resumed = WindowSampler(tokens, 15, seed=1, position=4)
    np.testing.assert_array_equal(resumed.next_batch(3).numpy(), continued.numpy())


def test_holdout_is_never_sampled():
    tokens = np.arange(16 * 10, dtype=np.int32)
    sampler = WindowSampler(tokens, 15, seed=0, holdout_windows=2)
    seen = {int(row[0]) for _ in range(8) for row in sampler.next_batch(4)}
    held = {int(row[0]) for row in sampler.holdout_batch(2)}
    assert held == {128, 144} and not (seen & held)


def test_missing_directory_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--data"):
        list_text_files(tmp_path / "nope")
