"""A trained model exports to a Hugging Face checkpoint that loads back span by span."""

import pytest
import torch

from kernels.checkpoint import load_blocks, load_client_pieces, load_local_model
from kernels.tiny import write_tiny_checkpoint
from swarm.training.training_model import export_checkpoint, init_model


@pytest.mark.parametrize("tied", [False, True])
def test_exported_checkpoint_reproduces_the_model(tmp_path, tied):
    config = write_tiny_checkpoint(
        tmp_path / "source", num_layers=3, hidden_size=64, tie_word_embeddings=tied
    )
    model = init_model(config, seed=7)
    export_checkpoint(model, tmp_path / "source", tmp_path / "out", num_shards=2)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
        assert torch.equal(load_local_model(tmp_path / "out")(ids), expected)
        client = load_client_pieces(tmp_path / "out")
        hidden = client.embed(ids)
        for start in range(3):
            hidden = load_blocks(tmp_path / "out", start, start + 1)(hidden)
        assert torch.equal(client.logits(hidden), expected)
    assert (tmp_path / "out" / "tokenizer.json").exists()
